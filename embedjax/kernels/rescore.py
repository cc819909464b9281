"""Exact rescoring of candidate ids (the second stage of two-stage search).

``rescore_topk(q_float, candidates, x, k)`` gathers each query's candidate
vectors and scores them against the float query:

* float corpus [N, D] (float32/bfloat16/float16): ``<q, x>``;
* int8 corpus [N, D]: ``x_scale[j] * <q, x_j> + q_offset`` (pass the query
  already transformed by ``quant.scalar.affine_query_transform`` for
  per-dimension codes);
* packed binary corpus uint32 [N, W]: ``<q, signs(x_j)>`` with signs in {-1, +1}.

Returns the k best candidates (scores float32 [Q, k], ids int32 [Q, k]), ties ->
smaller id. Candidate id -1 means "no candidate" (a filtered first stage that found
fewer rows): it is never returned, and when fewer than k real candidates remain the
missing results are id -1 with score -inf. The Pallas variant gathers in XLA and runs the scoring + running
top-k in the kernel (one program per query block).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from embedjax.kernels.dispatch import pallas_compiler_params, resolve_impl
from embedjax.kernels.pallas_topk import next_pow2, pad_axis
from embedjax.kernels.row_filter import NEG_INF, mark_missing
from embedjax.kernels.topk import check_k, sort_by_score_then_id
from embedjax.quant.binary import WORD_BITS


def _decode_candidates(x_gathered, dim):
    """Gathered corpus rows [Q, C, *] -> float32 [Q, C, dim]."""
    if x_gathered.dtype == jnp.uint32:
        shifts = jnp.arange(WORD_BITS, dtype=jnp.uint32)
        bits = (x_gathered[..., None] >> shifts) & jnp.uint32(1)
        bits = bits.reshape(*x_gathered.shape[:2], -1)[..., :dim]
        return jnp.where(bits == 1, 1.0, -1.0).astype(jnp.float32)
    return x_gathered.astype(jnp.float32)


def _check(q, cand, x, k, x_scale, q_offset):
    if q.ndim != 2 or not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"q_float must be a 2-D float array [Q, D]; got {q.dtype} {q.shape}")
    if cand.ndim != 2 or cand.shape[0] != q.shape[0] or not jnp.issubdtype(cand.dtype, jnp.integer):
        raise ValueError(f"candidates must be integer ids [Q, C] with Q = {q.shape[0]}; got {cand.dtype} {cand.shape}")
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty 2-D corpus [N, *]; got shape {x.shape}")
    if x.dtype == jnp.uint32:
        if -(-q.shape[1] // WORD_BITS) != x.shape[1]:
            raise ValueError(f"binary corpus has {x.shape[1]} words but the query has {q.shape[1]} dims")
    elif x.dtype == jnp.int8 or jnp.issubdtype(x.dtype, jnp.floating):
        if x.shape[1] != q.shape[1]:
            raise ValueError(f"corpus has {x.shape[1]} dims but the query has {q.shape[1]}")
    else:
        raise TypeError(f"x must be float, int8 or uint32 packed codes; got {x.dtype}")
    check_k(k, cand.shape[1], what="candidate list")
    if x_scale is not None and (x_scale.ndim != 1 or x_scale.shape[0] != x.shape[0]):
        raise ValueError(f"x_scale must be [N] = [{x.shape[0]}]; got {x_scale.shape}")
    if q_offset is not None and (q_offset.ndim != 1 or q_offset.shape[0] != q.shape[0]):
        raise ValueError(f"q_offset must be [Q] = [{q.shape[0]}]; got {q_offset.shape}")


@functools.partial(jax.jit, static_argnames=("k",))
def _rescore_xla(q, cand, x, x_scale, q_offset, k):
    safe = jnp.maximum(cand, 0)
    xg = _decode_candidates(jnp.take(x, safe, axis=0), q.shape[1])  # [Q, C, D]
    s = jnp.einsum("qd,qcd->qc", q.astype(jnp.float32), xg, precision=lax.Precision.HIGHEST)
    s = s * jnp.take(x_scale, safe, axis=0) + q_offset[:, None]
    return _select(s, cand, k)


def _select(scores_qc, cand, k):
    scores_qc = jnp.where(cand >= 0, scores_qc, NEG_INF)
    return mark_missing(*sort_by_score_then_id(scores_qc, cand.astype(jnp.int32), k))


def _rescore_kernel(q_ref, xg_ref, xs_ref, qo_ref, s_ref):
    # One query per program: scores of its C candidates, [1, Cp]. A broadcast
    # multiply + row sum instead of a dot: Triton dots need >= 16 rows.
    s = jnp.sum(xg_ref[...] * q_ref[...], axis=1)[None, :]
    s_ref[...] = s * xs_ref[...] + qo_ref[...]


@functools.partial(jax.jit, static_argnames=("k", "interpret"))
def _rescore_pallas(q, cand, x, x_scale, q_offset, k, interpret=False):
    nq, c = cand.shape
    dp = next_pow2(q.shape[1])
    cp = next_pow2(c)
    safe = jnp.maximum(cand, 0)
    xg = pad_axis(pad_axis(_decode_candidates(jnp.take(x, safe, axis=0), q.shape[1]), 2, dp), 1, cp)
    xs = pad_axis(jnp.take(x_scale, safe, axis=0), 1, cp)
    qf = pad_axis(q.astype(jnp.float32), 1, dp)
    s = pl.pallas_call(
        _rescore_kernel,
        grid=(nq,),
        in_specs=[
            pl.BlockSpec((1, dp), lambda i: (i, 0)),
            pl.BlockSpec((pl.squeezed, cp, dp), lambda i: (i, 0, 0)),
            pl.BlockSpec((1, cp), lambda i: (i, 0)),
            pl.BlockSpec((1, 1), lambda i: (i, 0)),
        ],
        out_specs=pl.BlockSpec((1, cp), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((nq, cp), jnp.float32),
        interpret=interpret,
        compiler_params=pallas_compiler_params(),
        name="rescore",
    )(qf, xg, xs, q_offset[:, None])
    return _select(s[:, :c], cand, k)


def rescore_topk(q_float, candidates, x_codes_or_float, k, impl="auto", *, x_scale=None, q_offset=None):
    """Rescore candidate ids [Q, C] against float queries [Q, D]; see the module docstring."""
    q = jnp.asarray(q_float)
    cand = jnp.asarray(candidates)
    x = jnp.asarray(x_codes_or_float)
    x_scale = None if x_scale is None else jnp.asarray(x_scale, jnp.float32)
    q_offset = None if q_offset is None else jnp.asarray(q_offset, jnp.float32)
    _check(q, cand, x, k, x_scale, q_offset)
    x_scale = jnp.ones((x.shape[0],), jnp.float32) if x_scale is None else x_scale
    q_offset = jnp.zeros((q.shape[0],), jnp.float32) if q_offset is None else q_offset
    impl, interpret = resolve_impl(impl)
    if impl == "pallas":
        return _rescore_pallas(q, cand, x, x_scale, q_offset, k, interpret=interpret)
    return _rescore_xla(q, cand, x, x_scale, q_offset, k)

"""Exact MaxSim re-ranking of candidate documents (the last stage of multi-vector search).

``maxsim_rerank(q_tokens, q_mask, candidates, doc_tokens, doc_mask, k)`` gathers each
query's candidate documents' token vectors and scores them by MaxSim
(`embedjax.multivector.maxsim`: masked document tokens -inf, masked query tokens 0):

* float token store [N, Ld, D] (float32 / bfloat16 / float16);
* int8 token store [N, Ld, D] with per-token scales ``doc_scales`` float32 [N, Ld]
  (``quantize_tokens_int8``): a token is ``codes * scale``, so each token similarity is
  ``scale * <q, codes>`` (the scale is applied after the dot product).

Returns the k best candidates (scores float32 [Q, k], ids int32 [Q, k]), ties -> smaller id;
candidate id -1 ("no candidate") is never returned and missing results are id -1 with score
-inf. The Pallas kernel scores one query's candidates per program (gathering stays in XLA);
its twin is plain jnp with the same signature.
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
from embedjax.multivector.maxsim import reduce_token_sims
from embedjax.quant.scalar import quantize_symmetric_int8


def quantize_tokens_int8(tokens_nld):
    """Symmetric per-token int8: ``(codes int8 [N, L, D], scales float32 [N, L])``, tokens ~= codes * scale."""
    x = jnp.asarray(tokens_nld, jnp.float32)
    if x.ndim != 3:
        raise ValueError(f"tokens_nld must be [docs, tokens, dim]; got shape {x.shape}")
    codes, scales = quantize_symmetric_int8(x.reshape(-1, x.shape[2]))  # each token is one vector
    return codes.reshape(x.shape), scales.reshape(x.shape[:2])


def _check(q, q_mask, cand, x, x_mask, x_scale, k):
    if q.ndim != 3 or not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"q_tokens must be float [Q, Lq, D]; got {q.dtype} {q.shape}")
    if q_mask.shape != q.shape[:2]:
        raise ValueError(f"q_mask must have shape {q.shape[:2]} to match q_tokens {q.shape}; got {q_mask.shape}")
    if cand.ndim != 2 or cand.shape[0] != q.shape[0] or not jnp.issubdtype(cand.dtype, jnp.integer):
        raise ValueError(f"candidates must be integer ids [Q, C] with Q = {q.shape[0]}; got {cand.dtype} {cand.shape}")
    if x.ndim != 3 or x.shape[0] == 0 or x.shape[2] != q.shape[2]:
        raise ValueError(f"doc_tokens must be [N, Ld, D] with D = {q.shape[2]} (the queries' dim); got {x.shape}")
    if x_mask.shape != x.shape[:2]:
        raise ValueError(f"doc_mask must have shape {x.shape[:2]} to match doc_tokens {x.shape}; got {x_mask.shape}")
    if x.dtype == jnp.int8:
        if x_scale is None or x_scale.shape != x.shape[:2]:
            raise ValueError(f"int8 doc_tokens need doc_scales [N, Ld] = {x.shape[:2]} (quantize_tokens_int8); "
                             f"got {None if x_scale is None else x_scale.shape}")
    elif not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"doc_tokens must be float or int8 codes; got {x.dtype}")
    elif x_scale is not None:
        raise ValueError("doc_scales are for int8 doc_tokens only")
    check_k(k, cand.shape[1], what="candidate list")


def _gather(cand, x, x_mask, x_scale):
    """Candidate documents' tokens [Q, C, Ld, D] (stored dtype), masks and scales [Q, C, Ld]."""
    safe = jnp.maximum(cand, 0)
    return jnp.take(x, safe, axis=0), jnp.take(x_mask, safe, axis=0), jnp.take(x_scale, safe, axis=0)


def _select(scores_qc, cand, k):
    scores_qc = jnp.where(cand >= 0, scores_qc, NEG_INF)
    return mark_missing(*sort_by_score_then_id(scores_qc, cand.astype(jnp.int32), k))


@functools.partial(jax.jit, static_argnames=("k",))
def _rerank_xla(q, q_mask, cand, x, x_mask, x_scale, k):
    xg, mg, sg = _gather(cand, x, x_mask, x_scale)
    sims = jnp.einsum("qad,qcbd->qcab", q.astype(jnp.float32), xg.astype(jnp.float32),
                      precision=lax.Precision.HIGHEST) * sg[:, :, None, :]
    return _select(reduce_token_sims(sims, q_mask[:, None, :], mg), cand, k)


def _maxsim_kernel(q_ref, qm_ref, x_ref, xm_ref, xs_ref, s_ref):
    # One query per program: [Cp * Ldp, D] tokens x [Lqp, D] query -> [Cp, Ldp, Lqp] similarities.
    cp, ldp, d = x_ref.shape
    x = x_ref[...].astype(jnp.float32).reshape(cp * ldp, d)
    sims = jnp.dot(x, q_ref[...].T, preferred_element_type=jnp.float32).reshape(cp, ldp, -1)
    sims = sims * xs_ref[...][:, :, None]
    best = jnp.max(jnp.where(xm_ref[...][:, :, None] != 0, sims, NEG_INF), axis=1)  # [Cp, Lqp]
    s_ref[...] = jnp.sum(jnp.where(qm_ref[...] != 0, best, 0.0), axis=1)[None, :]


@functools.partial(jax.jit, static_argnames=("k", "interpret"))
def _rerank_pallas(q, q_mask, cand, x, x_mask, x_scale, k, interpret=False):
    nq, c = cand.shape
    # Power-of-two blocks (and >= 16 rows on the query side, as Triton's dots need).
    lqp, dp = max(16, next_pow2(q.shape[1])), next_pow2(q.shape[2])
    cp, ldp = next_pow2(c), next_pow2(x.shape[1])
    xg, mg, sg = _gather(cand, x, x_mask, x_scale)
    xg = pad_axis(pad_axis(pad_axis(xg, 3, dp), 2, ldp), 1, cp)
    mg = pad_axis(pad_axis(mg.astype(jnp.int32), 2, ldp), 1, cp)
    sg = pad_axis(pad_axis(sg, 2, ldp), 1, cp)
    qf = pad_axis(pad_axis(q.astype(jnp.float32), 2, dp), 1, lqp)
    qm = pad_axis(q_mask.astype(jnp.int32), 1, lqp)
    s = pl.pallas_call(
        _maxsim_kernel,
        grid=(nq,),
        in_specs=[
            pl.BlockSpec((pl.squeezed, lqp, dp), lambda i: (i, 0, 0)),
            pl.BlockSpec((1, lqp), lambda i: (i, 0)),
            pl.BlockSpec((pl.squeezed, cp, ldp, dp), lambda i: (i, 0, 0, 0)),
            pl.BlockSpec((pl.squeezed, cp, ldp), lambda i: (i, 0, 0)),
            pl.BlockSpec((pl.squeezed, cp, ldp), lambda i: (i, 0, 0)),
        ],
        out_specs=pl.BlockSpec((1, cp), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((nq, cp), jnp.float32),
        interpret=interpret,
        compiler_params=pallas_compiler_params(),
        name="maxsim_rerank",
    )(qf, qm, xg, mg, sg)
    return _select(s[:, :c], cand, k)


def maxsim_rerank(q_tokens, q_mask, candidates, doc_tokens, doc_mask, k, impl="auto", *, doc_scales=None):
    """Re-rank candidate ids [Q, C] by exact MaxSim; see the module docstring."""
    q = jnp.asarray(q_tokens)
    q_mask = jnp.asarray(q_mask, bool)
    cand = jnp.asarray(candidates)
    x = jnp.asarray(doc_tokens)
    x_mask = jnp.asarray(doc_mask, bool)
    x_scale = None if doc_scales is None else jnp.asarray(doc_scales, jnp.float32)
    _check(q, q_mask, cand, x, x_mask, x_scale, k)
    x_scale = jnp.ones(x.shape[:2], jnp.float32) if x_scale is None else x_scale
    impl, interpret = resolve_impl(impl)
    if impl == "pallas":
        return _rerank_pallas(q, q_mask, cand, x, x_mask, x_scale, k, interpret=interpret)
    return _rerank_xla(q, q_mask, cand, x, x_mask, x_scale, k)

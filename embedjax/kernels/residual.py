"""Scoring and top-k search of multi-plane (residual) binary codes.

Codes: uint32 [N, P, W] (plane p packed with ``quant.binary.pack_bits``; a set bit
is +1, a clear bit -1). Two modes:

* asymmetric (float query vs code): ``q_proj`` float32 [Q, P, D] holds one
  projected query per plane, score ``sum_p <q_proj[:, p], signs(x_p)>``. For the
  greedy residual quantiser ``q_proj[:, p] = w_p * q``; for the trained head it
  is ``q @ decoder_p^T`` (``quant.residual_head.project_queries``).
* symmetric (code vs code): ``q_codes`` uint32 [Q, P, W] and per-plane weights
  ``w``: ``sum_{p,p'} w_p w_p' <signs(q_p), signs(x_p')>`` with
  ``<s, s'> = D - 2 * hamming``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from embedjax.kernels.dispatch import device_array, resolve_impl
from embedjax.kernels.pallas_topk import next_pow2, pad_axis, running_topk_call
from embedjax.kernels.row_filter import as_row_filter
from embedjax.kernels.topk import check_k, chunked_topk, resolve_n_valid
from embedjax.quant.binary import WORD_BITS



def _unpack_planes(x_cpw):
    """[C, P, W] uint32 -> {0, 1} float32 [C, P, W*32]."""
    shifts = jnp.arange(WORD_BITS, dtype=jnp.uint32)
    bits = (x_cpw[..., None] >> shifts) & jnp.uint32(1)
    return bits.reshape(*x_cpw.shape[:2], -1).astype(jnp.float32)


def _asym_chunk(q_args, x_args):
    (q_proj,), (x,) = q_args, x_args  # q_proj [Q, P, W*32] zero-padded
    bits = _unpack_planes(x)
    dot = jnp.einsum("qpd,cpd->qc", q_proj, bits, precision=lax.Precision.HIGHEST)
    return 2.0 * dot - jnp.sum(q_proj, axis=(1, 2))[:, None]


def _sym_chunk(weights, dim):
    def fn(q_args, x_args):
        (q,), (x,) = q_args, x_args  # [Q, P, W], [C, P, W]
        total = 0.0
        for p, wp in enumerate(weights):
            for r, wr in enumerate(weights):
                ham = jnp.sum(lax.population_count(q[:, None, p, :] ^ x[None, :, r, :]).astype(jnp.int32), axis=-1)
                total = total + (wp * wr) * (dim - 2 * ham).astype(jnp.float32)
        return total

    return fn


def _check(q, x, dim, weights):
    if x.ndim != 3 or x.dtype != jnp.uint32:
        raise TypeError(f"x_codes must be uint32 [N, P, W]; got {x.dtype} {x.shape}")
    if x.shape[0] == 0:
        raise ValueError("the corpus is empty (0 vectors)")
    if -(-dim // WORD_BITS) != x.shape[2]:
        raise ValueError(f"dim={dim} needs {-(-dim // WORD_BITS)} words per plane but x_codes has {x.shape[2]}")
    if q.ndim != 3 or q.shape[1] != x.shape[1]:
        raise ValueError(f"queries must be [Q, P={x.shape[1]}, *]; got shape {q.shape}")
    if q.dtype == jnp.uint32:
        if weights is None or len(weights) != x.shape[1]:
            raise ValueError(f"symmetric scoring needs one weight per plane ({x.shape[1]}); got {weights}")
        if q.shape[2] != x.shape[2]:
            raise ValueError(f"code widths differ: queries {q.shape[2]} words, corpus {x.shape[2]}")
        return "sym"
    if jnp.issubdtype(q.dtype, jnp.floating):
        if q.shape[2] != dim:
            raise ValueError(f"projected queries have {q.shape[2]} dims; expected dim={dim}")
        return "asym"
    raise TypeError(f"queries must be uint32 codes (symmetric) or float projections (asymmetric); got {q.dtype}")


def residual_bits_score(q, x_codes, *, dim, weights=None):
    """All-pairs scores float32 [Q, N] (plain jnp; see the module docstring for the modes)."""
    q, x = jnp.asarray(q), device_array(x_codes)
    mode = _check(q, x, dim, weights)
    if mode == "asym":
        qp = pad_axis(q.astype(jnp.float32), 2, x.shape[2] * WORD_BITS)
        return _asym_chunk((qp,), (x,))
    return _sym_chunk(tuple(float(w) for w in weights), dim)((q,), (x,))


@functools.partial(jax.jit, static_argnames=("k", "weights", "dim", "chunk_size"))
def _residual_xla(q, x, k, n_valid, *, dim, weights, chunk_size, row_filter=None):
    if weights is None:
        qp = pad_axis(q.astype(jnp.float32), 2, x.shape[2] * WORD_BITS)
        return chunked_topk(_asym_chunk, (qp,), (x,), k, n_valid=n_valid, chunk_size=chunk_size,
                            row_filter=row_filter)
    return chunked_topk(_sym_chunk(weights, dim), (q,), (x,), k, n_valid=n_valid, chunk_size=chunk_size,
                        row_filter=row_filter)


def _asym_tile(q_refs, x_refs, offset, block_n):
    q_ref, qsum_ref = q_refs  # [bq, P*Wp*32], [bq, 1]
    (x_ref,) = x_refs  # [P*Wp, N]
    shifts = lax.broadcasted_iota(jnp.uint32, (WORD_BITS, 1), 0)

    def word(w, acc):
        xw = x_ref[pl.ds(w, 1), pl.ds(offset, block_n)]  # [1, bn]
        bits = ((xw >> shifts) & jnp.uint32(1)).astype(jnp.float32)  # [32, bn]
        qw = q_ref[:, pl.ds(pl.multiple_of(w * WORD_BITS, WORD_BITS), WORD_BITS)]
        return acc + jnp.dot(qw, bits, preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, x_ref.shape[0], word, jnp.zeros((q_ref.shape[0], block_n), jnp.float32))
    return 2.0 * acc - qsum_ref[...]


def _sym_tile(weights, dim, words):
    def tile(q_refs, x_refs, offset, block_n):
        (q_ref,), (x_ref,) = q_refs, x_refs  # [bq, P*words], [P*words, N]
        total = jnp.zeros((q_ref.shape[0], block_n), jnp.float32)
        for p, wp in enumerate(weights):
            for r, wr in enumerate(weights):
                def word(w, acc, p=p, r=r):
                    qw = q_ref[:, pl.ds(p * words + w, 1)]
                    xw = x_ref[pl.ds(r * words + w, 1), pl.ds(offset, block_n)]
                    return acc + lax.population_count(qw ^ xw).astype(jnp.int32)

                ham = lax.fori_loop(0, words, word, jnp.zeros((q_ref.shape[0], block_n), jnp.int32))
                total = total + (wp * wr) * (dim - 2 * ham).astype(jnp.float32)
        return total

    return tile


@functools.partial(jax.jit, static_argnames=("k", "weights", "dim", "interpret"))
def _residual_pallas(q, x, k, n_valid, *, dim, weights, interpret, row_filter=None):
    n, planes, words = x.shape
    wp = next_pow2(words)
    xp = pad_axis(x, 2, wp)
    x_t = xp.reshape(n, planes * wp).T
    if weights is None:
        qp = pad_axis(q.astype(jnp.float32), 2, wp * WORD_BITS).reshape(q.shape[0], -1)
        q_ops = (qp, jnp.sum(qp, axis=1, keepdims=True))
        tile = _asym_tile
    else:
        q_ops = (pad_axis(q, 2, wp).reshape(q.shape[0], -1),)
        tile = _sym_tile(weights, dim, wp)
    return running_topk_call(tile, q_ops, (x_t,), n_valid, k, block_q=16, block_n=128, target_splits=64,
                             interpret=interpret, row_filter=row_filter)


def residual_topk(q, x_codes, k, impl="auto", *, dim, weights=None, n_valid=None, chunk_size=4096, filter=None):
    """Top-k (scores float32 [Q, k], ids int32 [Q, k]) of multi-plane codes, ties -> smaller id.

    ``filter``: mask [N] / [Q, N] or ``RowPredicates`` (``kernels.row_filter``); when
    fewer than k rows pass, the missing results are id -1 with score -inf.
    """
    q, x = jnp.asarray(q), device_array(x_codes)
    mode = _check(q, x, dim, weights)
    n_valid = resolve_n_valid(n_valid, x.shape[0])
    check_k(k, n_valid)
    row_filter = as_row_filter(filter, q.shape[0], x.shape[0])
    weights = None if mode == "asym" else tuple(float(w) for w in weights)
    impl, interpret = resolve_impl(impl)
    if impl == "pallas":
        return _residual_pallas(q, x, k, n_valid, dim=dim, weights=weights, interpret=interpret,
                                row_filter=row_filter)
    return _residual_xla(q, x, k, n_valid, dim=dim, weights=weights, chunk_size=chunk_size, row_filter=row_filter)

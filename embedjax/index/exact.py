"""Exact inner-product top-k over a corpus scanned in fixed-size chunks.

Memory stays bounded by ``Q x chunk_size`` scores whatever the corpus size: each
chunk's top-k is merged into a running top-k. Ties go to the smaller document index.
``filter=`` (mask [N] / [Q, N] or ``RowPredicates``, see ``kernels.row_filter``)
removes rows before selection; when fewer than k rows pass, the missing results are
id -1 with score -inf.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from embedjax.kernels.row_filter import as_row_filter, mark_missing, rows_pass, slice_rows


def merge_topk(scores_a, ids_a, scores_b, ids_b, k: int):
    """Merge two (score, id) candidate lists [Q, *] into the best k, ties -> smaller id."""
    scores = jnp.concatenate([scores_a, scores_b], axis=1)
    ids = jnp.concatenate([ids_a, ids_b], axis=1)
    # lexsort by (-score, id): sort by id first, then a stable sort by score keeps id order within ties.
    by_id = jnp.argsort(ids, axis=1, stable=True)
    scores, ids = jnp.take_along_axis(scores, by_id, 1), jnp.take_along_axis(ids, by_id, 1)
    by_score = jnp.argsort(-scores, axis=1, stable=True)[:, :k]
    return jnp.take_along_axis(scores, by_score, 1), jnp.take_along_axis(ids, by_score, 1)


@functools.partial(jax.jit, static_argnames=("k",))
def _chunk_step(q_qd, chunk_cd, offset, n_valid, best_scores, best_ids, k: int, chunk_filter=None):
    scores_qc = jnp.einsum("qd,cd->qc", q_qd, chunk_cd, preferred_element_type=jnp.float32)
    ids_c = offset + jnp.arange(chunk_cd.shape[0], dtype=jnp.int32)
    keep = (ids_c[None, :] < n_valid) & rows_pass(chunk_filter, 0, chunk_cd.shape[0])
    scores_qc = jnp.where(keep, scores_qc, -jnp.inf)
    kk = min(k, chunk_cd.shape[0])
    top_s, top_i = jax.lax.top_k(scores_qc, kk)  # lax.top_k prefers the smaller index on ties
    top_ids = jnp.take(ids_c, top_i)
    return merge_topk(best_scores, best_ids, top_s, top_ids, k)


def exact_search(q_qd, d_nd, k: int, chunk_size: int = 16384, *, filter=None):
    """Top-k documents by inner product.

    Args:
        q_qd: queries [Q, D].
        d_nd: corpus [N, D] (numpy or jax; scanned ``chunk_size`` rows at a time).
        k: results per query, 1 <= k <= N.
        filter: None, a boolean mask [N] or [Q, N], or ``RowPredicates``.

    Returns:
        ``(scores float32 [Q, k], ids int32 [Q, k])`` best first; id -1 / score -inf
        where fewer than k rows pass the filter.
    """
    q_qd = np.asarray(q_qd, dtype=np.float32) if not isinstance(q_qd, jax.Array) else q_qd
    if q_qd.ndim != 2 or d_nd.ndim != 2 or q_qd.shape[1] != d_nd.shape[1]:
        raise ValueError(f"queries {tuple(q_qd.shape)} and corpus {tuple(d_nd.shape)} must be [Q, D] and [N, D] "
                         "with the same D")
    n = d_nd.shape[0]
    if n == 0:
        raise ValueError("the corpus is empty: nothing to search")
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the corpus size {n}")
    row_filter = as_row_filter(filter, q_qd.shape[0], n)
    chunk_size = max(1, min(chunk_size, n))
    best_s = jnp.full((q_qd.shape[0], k), -jnp.inf, jnp.float32)
    best_i = jnp.full((q_qd.shape[0], k), jnp.iinfo(jnp.int32).max, jnp.int32)
    for start in range(0, n, chunk_size):
        chunk = np.asarray(d_nd[start:start + chunk_size], dtype=np.float32)
        if chunk.shape[0] < chunk_size:  # pad the tail so every chunk has one compiled shape
            chunk = np.pad(chunk, ((0, chunk_size - chunk.shape[0]), (0, 0)))
        best_s, best_i = _chunk_step(q_qd, chunk, jnp.int32(start), jnp.int32(n), best_s, best_i, k=k,
                                     chunk_filter=slice_rows(row_filter, start, chunk_size))
    best_s, best_i = mark_missing(best_s, best_i)
    return np.asarray(best_s), np.asarray(best_i)

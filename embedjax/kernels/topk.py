"""Running top-k over a corpus scanned in chunks (the plain-jnp path).

Convention for every kernel in this package: a score is "larger is better";
ties are broken by the smaller corpus index. Hamming distance d is scored as
``-d`` (exact in float32 up to 2^24 bits).

Memory: one chunk of scores [Q, chunk_size] float32 plus the running [Q, k]
lists; the corpus is never copied or padded (the last chunk is clamped to end
at row N and the rows it re-reads are masked).

Filters (``kernels.row_filter``) mask failing rows to -inf before selection; when
fewer than k rows pass, the missing results are id -1 with score -inf.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from embedjax.kernels.row_filter import NEG_INF, RowFilter, mark_missing, rows_pass


MAX_EXACT_ID = 2 ** 24  # ids below it are exact in float32 (tie-breaking by id in top_k_by_score_then_id)


def check_k(k, n_valid: int, what: str = "corpus"):
    if not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"k must be a Python int; got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    if k > n_valid:
        raise ValueError(f"k={k} is larger than the {what} ({n_valid} vectors); ask for at most {n_valid}")


def resolve_n_valid(n_valid, n: int) -> int:
    """The number of searched corpus rows: ``n_valid`` (rows past it are padding) or all rows."""
    if n == 0:
        raise ValueError("the corpus is empty (0 vectors); add vectors before searching")
    if n_valid is None:
        return n
    if not isinstance(n_valid, int) or isinstance(n_valid, bool):
        raise TypeError(f"n_valid must be a Python int or None; got {type(n_valid).__name__}")
    if not 1 <= n_valid <= n:
        raise ValueError(f"n_valid must be in [1, {n}] (the corpus rows); got {n_valid}")
    return n_valid


def sort_by_score_then_id(scores_qm, ids_qm, k: int):
    """Sort each row by (score descending, id ascending) and keep the first k."""
    neg, ids = lax.sort((-scores_qm, ids_qm), dimension=1, num_keys=2)
    return -neg[:, :k], ids[:, :k]


def top_k_by_score_then_id(scores_qc, ids_qc, k: int):
    """Exact top-k by (score descending, id ascending) of candidates [Q, C] with arbitrary ids, sorted.

    Two float32 ``lax.top_k`` passes instead of a sort of all C: the first finds the k-th
    score t (every candidate above t is in), the second the smallest ids among the
    candidates scoring exactly t; only the k chosen entries are then sorted. Ids are
    compared as float32 in the second pass (a float top_k is ~10x faster than an int32
    one on CPU), which is exact for ids below 2^24 (``MAX_EXACT_ID``).
    """
    # The barrier keeps XLA (CPU) from rewriting this top_k as a full sort of [Q, C] (8x slower).
    top_s, pos = lax.optimization_barrier(lax.top_k(scores_qc, k))
    t = top_s[:, k - 1 : k]
    above = jnp.sum(top_s > t, axis=1, keepdims=True)  # all of them are in the first `above` slots
    tie_key = jnp.where(scores_qc == t, -ids_qc.astype(jnp.float32), -jnp.inf)
    _, tie_pos = lax.top_k(tie_key, k)  # the tied candidates with the smallest ids first
    slot = lax.broadcasted_iota(jnp.int32, (1, k), 1)
    take = jnp.where(slot < above, pos, jnp.take_along_axis(tie_pos, jnp.clip(slot - above, 0, k - 1), axis=1))
    return sort_by_score_then_id(jnp.take_along_axis(scores_qc, take, 1), jnp.take_along_axis(ids_qc, take, 1), k)


def top_k_block(num_columns: int, k: int):
    """The block width ``blocked_top_k`` uses for top-k of ``num_columns`` columns, or None where the
    plain ``lax.top_k`` is as fast (the k best blocks would cover more than a quarter of the columns)."""
    for block in ((64, 32) if k <= 16 else (32, 16)):
        if num_columns % block == 0 and 4 * k * block <= num_columns:
            return block
    return None


def _top_k_of_blocks(block_max_qb, candidates_of, k: int, block: int):
    """The k best columns given each block's maximum [Q, C / block] and ``candidates_of(blocks_qk)``,
    the scores [Q, k * block] of the chosen blocks' columns in block order (see ``blocked_top_k``)."""
    _, blocks_qk = lax.top_k(block_max_qb, k)
    blocks_qk = jnp.sort(blocks_qk, axis=1)
    top_s, slot = lax.top_k(candidates_of(blocks_qk), k)
    return top_s, jnp.take_along_axis(blocks_qk, slot // block, axis=1) * block + slot % block


def blocked_top_k(scores, k: int, block: int, layout: str = "qc"):
    """``lax.top_k`` of each query's scores (values float [Q, k], corpus positions int32 [Q, k]), ties
    included, in two small selections: the k blocks of ``block`` columns with the best maxima, then
    the k best of their k * block scores. ``scores`` is [Q, C] (``layout="qc"``) or [C, Q] ("cq").

    Exact: a column outside the chosen blocks has k chosen blocks ahead of it, each holding a score at
    least as large at a smaller position when equal (top_k keeps the earlier block among equal maxima,
    and the chosen blocks are put back in column order so the second top_k's stability still prefers
    the smaller position). On CPU a top_k over [64, 32768] scores costs ~6x this at k = 10: it reads
    the scores once for the maxima, then selects over C / block and k * block columns.
    """
    num_c = scores.shape[0 if layout == "cq" else 1]
    if num_c % block:
        raise ValueError(f"blocked_top_k needs the {num_c} corpus positions to be a multiple of block={block}")
    if layout == "qc":
        s_qbr = scores.reshape(scores.shape[0], num_c // block, block)
        return _top_k_of_blocks(
            jnp.max(s_qbr, axis=2),
            lambda b_qk: jnp.take_along_axis(s_qbr, b_qk[:, :, None], axis=1).reshape(b_qk.shape[0], -1),
            k, block)
    # [C, Q]: the block maxima are elementwise maxima of query vectors (they vectorise over queries).
    s_brq = scores.reshape(num_c // block, block, scores.shape[1])
    return _top_k_of_blocks(
        jnp.max(s_brq, axis=1).T,
        lambda b_qk: jnp.take_along_axis(s_brq, b_qk.T[:, None, :], axis=0).transpose(2, 0, 1).reshape(
            b_qk.shape[0], -1),
        k, block)


def fast_top_k(scores, k: int, layout: str = "qc"):
    """``lax.top_k`` of each query's scores, [Q, C] (``layout="qc"``) or [C, Q] ("cq"), by blocks
    where that is faster."""
    block = top_k_block(scores.shape[0 if layout == "cq" else 1], k)
    if block is None:
        return lax.top_k(scores.T if layout == "cq" else scores, k)
    return blocked_top_k(scores, k, block, layout)


def searched_rows(start, size: int, n_valid, row_filter: RowFilter | None, first_row=None):
    """bool [1 or Q, size]: which corpus rows ``start .. start + size`` a scan counts: those below
    ``n_valid`` that pass ``row_filter`` and, for a chunk clamped to end at row N, not before
    ``first_row`` (the rows it re-reads)."""
    pos = start + lax.broadcasted_iota(jnp.int32, (1, size), 1)
    valid = (pos < n_valid) & rows_pass(row_filter, start, size)
    return valid if first_row is None else valid & (pos >= first_row)


def mask_scores(scores, valid, scores_layout: str = "qc"):
    """Scores [Q, C] ("qc") or [C, Q] ("cq") with the rows ``valid`` [1 or Q, C] leaves out at -inf."""
    return jnp.where(valid.T if scores_layout == "cq" else valid, scores, NEG_INF)


def _merge(best_s, best_i, new_s, new_i, k):
    # Earlier ids come first in the concatenation and top_k is stable, so equal
    # scores keep the smaller id.
    s = jnp.concatenate([best_s, new_s], axis=1)
    i = jnp.concatenate([best_i, new_i], axis=1)
    top_s, pos = lax.top_k(s, k)
    return top_s, jnp.take_along_axis(i, pos, axis=1)


def chunked_topk(
    score_chunk: Callable,
    q_args: Sequence,
    x_args: Sequence,
    k: int,
    *,
    n_valid=None,
    chunk_size: int = 32768,
    id_offset=0,
    row_filter: RowFilter | None = None,
    row_ids=None,
    corpus_axis: int = 0,
    scores_layout: str = "qc",
):
    """Top-k (scores float32 [Q, k], ids int32 [Q, k]) of ``score_chunk(q_args, x_chunk_args)``.

    ``x_args`` are arrays whose axis ``corpus_axis`` (the leading one by default) is the corpus
    axis (length N), sliced into chunks along it;
    ``score_chunk`` returns float32 scores [Q, C] for a chunk of C rows, or [C, Q] with
    ``scores_layout="cq"`` (scorers that vectorise over queries).
    ``n_valid`` (int or traced int32 scalar) limits the search to rows < n_valid;
    ``id_offset`` is added to the returned ids (for shards of a larger corpus).
    ``row_filter`` masks rows per query (``kernels.row_filter``); ``row_ids`` int32 [N]
    replaces the row index as reported id and tie-breaker (negative ids never match).
    Missing results (fewer than k rows pass) are id -1 with score -inf.
    """
    n = x_args[0].shape[corpus_axis]
    chunk = int(min(chunk_size, n))
    if chunk < k:
        chunk = min(n, k)
    num_chunks = -(-n // chunk)
    n_valid = n if n_valid is None else n_valid
    merge = _merge if row_ids is None else _merge_by_id

    def chunk_scores(start):
        xs = [lax.dynamic_slice_in_dim(a, start, chunk, axis=corpus_axis) for a in x_args]
        return score_chunk(q_args, xs).astype(jnp.float32)

    def masked_top(c):
        start = jnp.minimum(c * chunk, n - chunk)
        s = chunk_scores(start)
        # Rows re-read by the clamped last chunk, padding rows and filtered rows never count.
        valid = searched_rows(start, chunk, n_valid, row_filter, first_row=c * chunk)  # [1 or Q, C]
        if row_ids is not None:  # ties must go to the smaller id, not the earlier row
            ids = lax.dynamic_slice_in_dim(row_ids, start, chunk)[None, :]
            s_qc = mask_scores(s.T if scores_layout == "cq" else s, valid & (ids >= 0))
            return top_k_by_score_then_id(s_qc, jnp.broadcast_to(ids, s_qc.shape), k)
        top_s, p = fast_top_k(mask_scores(s, valid, scores_layout), k, scores_layout)
        return top_s, start + p

    def unmasked_top(c):
        # Every row of the chunk counts: no pass over the [Q, chunk] scores for a mask (on CPU that
        # pass cost as much as the whole top-k selection: the scores do not stay in cache).
        top_s, p = fast_top_k(chunk_scores(c * chunk), k, scores_layout)
        return top_s, c * chunk + p

    def chunk_top(c):
        if row_ids is not None or row_filter is not None:
            return masked_top(c)
        return lax.cond((c + 1) * chunk <= n_valid, unmasked_top, masked_top, c)

    best = chunk_top(0)

    def body(c, best):
        return merge(*best, *chunk_top(c), k)

    if num_chunks > 1:
        best = lax.fori_loop(1, num_chunks, body, best)
    return mark_missing(best[0], best[1] + jnp.asarray(id_offset, jnp.int32))


def _merge_by_id(best_s, best_i, new_s, new_i, k):
    return sort_by_score_then_id(jnp.concatenate([best_s, new_s], axis=1), jnp.concatenate([best_i, new_i], axis=1), k)


@functools.partial(jax.jit, static_argnames=("k",))
def merge_topk(scores_qm, ids_qm, k: int):
    """Exact top-k of candidate lists [Q, M] (e.g. per-shard results), ties -> smaller id."""
    return sort_by_score_then_id(scores_qm, ids_qm, k)

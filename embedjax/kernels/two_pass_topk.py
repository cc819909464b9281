"""Two-pass exact top-k for the Pallas scan kernels: tile maxima, then the k best tiles rescored.

The running top-k kernel (`embedjax.kernels.pallas_topk.running_topk_call`) selects inside the
scan: every tile that improves a query's list costs max/min passes, and on an H200 that selection,
not the scoring, bounded the Hamming scan (1.3% of HBM bandwidth; k=100 1.7-2.6x the time of k=10).
This design takes the selection out of the scan:

1. **Tile maxima** (Pallas, `tile_maxima_call`; the corpus is read once): every program scores its
   tiles of ``block_n`` corpus rows with the kernel's ``tile_score`` and writes, per query and tile,
   the tile's best score (and, when row ids replace positions, the smallest id scoring it). One
   max per score, whatever k: scoring dominates.
2. **Tile choice** (XLA): per query, the k best tiles by (best score descending, key ascending),
   the key being the tile index (row ids: the smallest id at the best score).
3. **Rescore** (XLA): the k * block_n rows of the chosen tiles are gathered, scored by the
   kernel's jnp twin (``score_chunk``, the function `embedjax.kernels.topk.chunked_topk` scans
   with), masked like the scan and reduced to the exact top-k by (score descending, id
   ascending). k=100, block_n=128: 12,800 rows per query, 0.13% of a 10M-row corpus.

Exactness: take a row e outside the chosen tiles, in tile u. Each chosen tile c ranks before u by
(best score, key), and e ranks no better than u's best row, so c's best row ranks before e. The k
chosen tiles thus hold k rows that rank before e, and e is not in the top k. Ties are therefore
broken exactly as the twins break them (smaller id first). When the corpus has fewer than k
tiles, all of them are rescored.

On an H200 (2026-12-04, BENCHMARKS.md) both passes compile through Triton and equal the twins at
2M and 10M codes. Its scan is short of parallel work at 64 corpus splits per query block (the
running kernel's default): 38 ms for 1 or 64 queries over 10M 1024-bit codes, whatever k or
selection, against 6.5 / 12.9 ms for the XLA twin. At 2048 splits it took 4.9 / 8.5 ms (1.32x /
1.52x the twin, k=10), at 512 7.5 / 10.9 ms, so `DEFAULT_SPLITS` gives it 2048; the running
kernel gained less from more splits (0.95x / 0.64x at 2048), its selection costing more the
more partial lists it merges. Both remain far from the bandwidth floor (9.6% of 2.7-3.5 TB/s).
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from embedjax.kernels.dispatch import pallas_compiler_params
from embedjax.kernels.pallas_topk import INT_MAX, masked_tile_fn, scan_layout, split_layout
from embedjax.kernels.row_filter import NEG_INF, RowFilter, gathered_pass, mark_missing
from embedjax.kernels.topk import (MAX_EXACT_ID, fast_top_k, mask_scores, searched_rows, sort_by_score_then_id,
                                   top_k_by_score_then_id)

SELECTIONS = ("running", "two_pass")
# Target corpus splits per query block (programs = query blocks x splits), measured on an H200 (above).
DEFAULT_SPLITS = {"running": 64, "two_pass": 2048}


def scan_rows(n: int, block_n: int = 128) -> int:
    """The corpus length (>= n) that both selections' Pallas scans, at their `DEFAULT_SPLITS`, tile
    into whole splits without padding: a corpus stored at this length (the rows past ``n`` being
    padding, searched with ``n_valid=n``) is read in place instead of copied on every call."""
    rows = n
    while True:
        padded = rows
        for target in DEFAULT_SPLITS.values():
            per_split, splits = split_layout(padded, block_n, target)
            padded = per_split * splits * block_n
        if padded == rows:
            return rows
        rows = padded


def check_selection(select: str) -> str:
    if select not in SELECTIONS:
        raise ValueError(f"select={select!r} is not a top-k selection; choose one of {SELECTIONS}")
    return select


def tile_maxima_call(tile_score: Callable, q_ops: Sequence, x_ops: Sequence, n_valid, *, block_q: int,
                     block_n: int, target_splits: int, interpret: bool, row_filter: RowFilter | None = None,
                     row_ids=None, x_axes=None):
    """Per query and corpus tile of ``block_n`` rows: (best score float32 [Q, T], key int32 [Q, T]).

    Same operands as `running_topk_call`. T covers the padded corpus; tiles with no searchable
    row score -inf. The key is the smallest row id scoring the tile's best when ``row_ids`` is
    given, else the tile index (tile order is id order then)."""
    layout = scan_layout(q_ops, x_ops, n_valid, block_q=block_q, block_n=block_n, target_splits=target_splits,
                         row_filter=row_filter, row_ids=row_ids, x_axes=x_axes)
    with_ids = row_ids is not None

    def kernel(*refs):
        outs = refs[-2:] if with_ids else refs[-1:]
        masked_tile = masked_tile_fn(layout, tile_score, refs[:len(refs) - len(outs)], block_q=block_q,
                                     block_n=block_n)

        def tile_step(j, carry):
            scores, ids = masked_tile(j)
            best = jnp.max(scores, axis=1, keepdims=True)
            outs[0][:, pl.ds(j, 1)] = best
            if with_ids:
                outs[1][:, pl.ds(j, 1)] = jnp.min(jnp.where(scores == best, ids, INT_MAX), axis=1, keepdims=True)
            return carry

        lax.fori_loop(0, layout.per_split, tile_step, 0)

    qp, per_split, splits = layout.padded_queries, layout.per_split, layout.splits
    spec = pl.BlockSpec((block_q, per_split), lambda i, s: (i, s))
    shapes = [jax.ShapeDtypeStruct((qp, splits * per_split), jnp.float32)]
    if with_ids:
        shapes.append(jax.ShapeDtypeStruct((qp, splits * per_split), jnp.int32))
    outs = pl.pallas_call(kernel, grid=(qp // block_q, splits), in_specs=layout.in_specs,
                          out_specs=[spec] * len(shapes), out_shape=shapes, interpret=interpret,
                          compiler_params=pallas_compiler_params(), name="tile_maxima")(*layout.operands)
    best = outs[0][:layout.queries]
    if with_ids:
        return best, outs[1][:layout.queries]
    return best, jnp.broadcast_to(jnp.arange(best.shape[1], dtype=jnp.int32), best.shape)


def exact_topk(scores_qc, ids_qc, k: int, *, ids_below_2_24: bool):
    """Sorted top-k by (score descending, id ascending): two ``lax.top_k`` passes where ids are
    exact in float32, a full sort otherwise."""
    if ids_below_2_24:
        return top_k_by_score_then_id(scores_qc, ids_qc, k)
    return sort_by_score_then_id(scores_qc, ids_qc, k)


def rescore_rows(score_chunk: Callable, q_args: Sequence, x_args: Sequence, rows_qc, corpus_axis: int = 0):
    """Scores float32 [Q, C] of each query against its own corpus rows ``rows_qc`` (valid indices),
    with the twin's chunk scorer (``score_chunk(q_args, x_args) -> [Q', C']``; the corpus axis of
    ``x_args`` is ``corpus_axis``)."""
    def one(q_row, rows):
        gathered = tuple(jnp.take(a, rows, axis=corpus_axis) for a in x_args)
        return score_chunk(tuple(a[None] for a in q_row), gathered)[0].astype(jnp.float32)

    return jax.vmap(one)(tuple(q_args), rows_qc)


def rescore_tiles(tiles_qk, block_n: int, score_chunk: Callable, q_args: Sequence, x_args: Sequence, n_valid,
                  k: int, *, row_filter: RowFilter | None = None, row_ids=None, corpus_axis: int = 0):
    """Steps 3 of the module doc: the rows of each query's chosen tiles ``tiles_qk`` int32 [Q, T']
    rescored by the twin, masked like the scan and reduced to the exact top-k (scores float32
    [Q, k], ids int32 [Q, k]; missing: id -1, -inf)."""
    n = x_args[0].shape[corpus_axis]
    rows_qc = (tiles_qk[:, :, None] * block_n + jnp.arange(block_n, dtype=jnp.int32)).reshape(tiles_qk.shape[0], -1)
    searchable = rows_qc < n_valid
    safe_rows = jnp.where(searchable, rows_qc, 0)
    scores = rescore_rows(score_chunk, q_args, x_args, jnp.minimum(safe_rows, n - 1), corpus_axis)
    keep = gathered_pass(row_filter, jnp.where(searchable, rows_qc, -1))
    if row_ids is None:
        ids = rows_qc
    else:
        ids = jnp.take(jnp.asarray(row_ids, jnp.int32), safe_rows)
        keep = keep & (ids >= 0)
    scores = jnp.where(keep, scores, NEG_INF)
    top_s, top_i = exact_topk(scores, ids, k, ids_below_2_24=row_ids is not None or n <= MAX_EXACT_ID)
    return mark_missing(top_s, top_i)


def two_pass_topk(tile_score: Callable, score_chunk: Callable, q_ops: Sequence, x_ops: Sequence, q_args: Sequence,
                  x_args: Sequence, n_valid, k: int, *, block_q: int, block_n: int, target_splits: int,
                  interpret: bool, row_filter: RowFilter | None = None, row_ids=None, corpus_axis: int = 0,
                  x_axes=None):
    """Exact top-k (scores float32 [Q, k], ids int32 [Q, k]) by tile maxima + rescoring (module doc).

    ``tile_score``/``q_ops``/``x_ops``/``x_axes``: the Pallas scan's scorer and operands (`running_topk_call`);
    ``score_chunk``/``q_args``/``x_args``: the same scores from the jnp twin, corpus axis
    ``corpus_axis`` (`chunked_topk`). Missing results (fewer than k rows pass): id -1, -inf."""
    best_qt, key_qt = tile_maxima_call(tile_score, q_ops, x_ops, n_valid, block_q=block_q, block_n=block_n,
                                       target_splits=target_splits, interpret=interpret, row_filter=row_filter,
                                       row_ids=row_ids, x_axes=x_axes)
    num_tiles = best_qt.shape[1]
    chosen = min(k, num_tiles)
    # Keys are tile indices or row ids (both below 2^24 by `check_row_ids`); the top_k pass returns
    # positions in the tile axis through the ids argument.
    tile_index = jnp.broadcast_to(jnp.arange(num_tiles, dtype=jnp.int32), best_qt.shape)
    if row_ids is None:
        _, tiles_qk = exact_topk(best_qt, tile_index, chosen, ids_below_2_24=num_tiles < MAX_EXACT_ID)
    else:
        order = lax.sort((-best_qt, key_qt, tile_index), dimension=1, num_keys=2)
        tiles_qk = order[2][:, :chosen]
    return rescore_tiles(tiles_qk, block_n, score_chunk, q_args, x_args, n_valid, k, row_filter=row_filter,
                         row_ids=row_ids, corpus_axis=corpus_axis)


XLA_TILE = 32  # corpus rows per tile of the XLA scan: 1/32 of the scores kept; k * 32 rows rescored
SCAN_SCORES = 2 ** 21  # scores per chunk of the XLA scan (8 MiB of float32)


def xla_tile_maxima(score_chunk: Callable, q_args: Sequence, x_args: Sequence, n_valid, *, block_n: int = XLA_TILE,
                    chunk_size: int = 32768, row_filter: RowFilter | None = None, corpus_axis: int = 0,
                    scores_layout: str = "qc"):
    """Step 1 of the module doc as a chunked XLA scan (the CPU path): each tile's best score,
    float32 [Q, T] (``scores_layout="qc"``) or [T, Q] ("cq", for scorers returning [C, Q]).

    T = ceil(N / block_n) rounded up to a multiple of 64 (``fast_top_k``'s blocks); tiles past the
    corpus, and tiles with no searchable row, score -inf. Chunks wholly below ``n_valid`` with no
    filter skip the mask pass. Chunks hold at most ``chunk_size`` rows and ``SCAN_SCORES`` scores.
    Memory: the maxima, Q * T floats, plus one chunk of scores."""
    n = x_args[0].shape[corpus_axis]
    num_q = (jax.eval_shape(score_chunk, q_args, [lax.slice_in_dim(a, 0, 1, axis=corpus_axis) for a in x_args])
             .shape[1 if scores_layout == "cq" else 0])
    # At most SCAN_SCORES scores per chunk: 64 queries scan 32,768 rows at a time, 512 queries 4,096
    # (on a 2-core EPYC, 512 queries ran 2.4x faster at 4,096 rows than at 32,768).
    chunk = min(chunk_size, n, max(block_n, SCAN_SCORES // num_q))
    chunk = max(block_n, chunk // block_n * block_n)
    num_full, tail = n // chunk, n % chunk
    num_tiles = -(-n // block_n)
    padded_tiles = -(-num_tiles // 64) * 64
    cq = scores_layout == "cq"
    tiles_axis = 0 if cq else 1

    def maxima(start, size, masked):
        """Tile maxima of rows start .. start + size (size static)."""
        s = score_chunk(q_args, [lax.dynamic_slice_in_dim(a, start, size, axis=corpus_axis) for a in x_args])
        s = s.astype(jnp.float32)
        if masked:
            s = mask_scores(s, searched_rows(start, size, n_valid, row_filter), scores_layout)
        pad = -size % block_n
        if pad:
            s = jnp.pad(s, ((0, pad), (0, 0)) if cq else ((0, 0), (0, pad)), constant_values=NEG_INF)
        if cq:
            return jnp.max(s.reshape(-1, block_n, num_q), axis=1)
        return jnp.max(s.reshape(num_q, -1, block_n), axis=2)

    shape = (padded_tiles, num_q) if cq else (num_q, padded_tiles)
    best = jnp.full(shape, NEG_INF, jnp.float32)

    def body(c, best):
        start = c * chunk
        if row_filter is None:
            tiles = lax.cond((c + 1) * chunk <= n_valid, lambda: maxima(start, chunk, False),
                             lambda: maxima(start, chunk, True))
        else:
            tiles = maxima(start, chunk, True)
        return lax.dynamic_update_slice_in_dim(best, tiles, c * (chunk // block_n), axis=tiles_axis)

    if num_full:  # (a corpus shorter than one tile is all tail)
        best = lax.fori_loop(0, num_full, body, best)
    if tail:
        best = lax.dynamic_update_slice_in_dim(best, maxima(num_full * chunk, tail, True),
                                               num_full * (chunk // block_n), axis=tiles_axis)
    return best


def xla_two_pass_topk(score_chunk: Callable, q_args: Sequence, x_args: Sequence, rescore_chunk: Callable,
                      rescore_q_args: Sequence, n_valid, k: int, *, block_n: int = XLA_TILE, chunk_size: int = 32768,
                      row_filter: RowFilter | None = None, corpus_axis: int = 0, scores_layout: str = "qc"):
    """Exact top-k (scores float32 [Q, k], ids int32 [Q, k]) by an XLA scan of tile maxima, one
    selection of each query's k best tiles, and their rows rescored (module doc; no ``row_ids``).

    ``score_chunk``/``q_args``/``x_args``: the scan's scorer as `chunked_topk` takes it;
    ``rescore_chunk``/``rescore_q_args``: a scorer of the same scores returning [Q, C], applied to
    each query's gathered rows. The two must agree to the bit (integer scores such as Hamming
    distances do): the tiles are chosen by the first and the rows ranked by the second.

    On CPU this replaces the running scan's per-chunk selections (three ``lax.top_k`` per chunk,
    each with a cost that grows with k) by one selection over the tiles and one over k * block_n
    rows per query."""
    best = xla_tile_maxima(score_chunk, q_args, x_args, n_valid, block_n=block_n, chunk_size=chunk_size,
                           row_filter=row_filter, corpus_axis=corpus_axis, scores_layout=scores_layout)
    num_tiles = -(-x_args[0].shape[corpus_axis] // block_n)
    _, tiles_qk = fast_top_k(best, min(k, num_tiles), scores_layout)
    return rescore_tiles(jnp.sort(tiles_qk, axis=1), block_n, rescore_chunk, rescore_q_args, x_args, n_valid, k,
                         row_filter=row_filter, corpus_axis=corpus_axis)

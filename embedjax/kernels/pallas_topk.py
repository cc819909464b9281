"""Pallas skeleton shared by the top-k kernels: score a tile, keep a running top-k.

Grid ``(query blocks, corpus splits)``; every program owns ``block_q`` queries and
one contiguous split of the corpus, walks the split in tiles of ``block_n``
columns (``fori_loop``), scores each tile with the kernel-specific
``tile_score`` and folds it into an unsorted running top-``kp`` list:
repeatedly take the tile's best entry per row and let it replace the row's
worst kept entry while it is better (a ``while_loop`` that stops as soon as no
row improves, so late tiles cost a few passes). Programs write partial lists
[splits, Q, kp]; the caller merges them with one exact sort (score desc, id asc).

Filters (``kernels.row_filter``) are evaluated per tile and turn failing rows' scores
into -inf before the tile reaches the selection; optional per-row ids (``row_ids``,
loaded per tile) replace the column index as reported id and tie-breaker.

Backend constraints followed so the kernel lowers to Triton on GPU: every
loaded tile has a power-of-two number of elements (queries, tile widths and
operand row counts are padded to powers of two), values are never sliced in
registers (tiles are loaded from refs with ``pl.ds``), reductions are
max/min over int32/float32, integer dots take signed operands, and programs
never share an output block (no cross-program accumulation).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from embedjax.kernels.dispatch import pallas_compiler_params
from embedjax.kernels.row_filter import RowFilter, corpus_slice, mark_missing
from embedjax.kernels.topk import sort_by_score_then_id

INT_MAX = jnp.iinfo(jnp.int32).max


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def pad_axis(x, axis: int, size: int):
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def split_layout(n: int, block_n: int, target_splits: int) -> tuple[int, int]:
    """``(blocks_per_split, num_splits)``; blocks_per_split a power of two so splits tile the
    padded corpus with less than one split of padding."""
    blocks = -(-n // block_n)
    per_split = next_pow2(max(1, -(-blocks // max(1, target_splits))))
    return per_split, -(-blocks // per_split)


# Triton addresses an operand with 32-bit element offsets: a larger corpus operand wraps around and the
# scan reads the wrong rows (an H200 returned wrong int8 neighbours for 10M x 384 codes, 3.8e9 bytes).
MAX_SCAN_ELEMENTS = 2 ** 31 - 1


def scan_fits(n: int, width: int, *, block_n: int = 128, target_splits: int = 64) -> bool:
    """Whether a corpus operand of ``width`` words per row and ``n`` rows, padded to whole splits,
    stays within the kernels' 32-bit offsets (`MAX_SCAN_ELEMENTS`)."""
    per_split, splits = split_layout(n, block_n, target_splits)
    return width * splits * per_split * block_n <= MAX_SCAN_ELEMENTS


def addressable_pieces(n: int, width: int, *, block_n: int = 128, target_splits: int = 64) -> int:
    """The fewest equal consecutive pieces of ``n`` corpus rows that each pass `scan_fits`."""
    pieces = 1
    while not scan_fits(-(-n // pieces), width, block_n=block_n, target_splits=target_splits):
        pieces += 1
    return pieces


def search_in_pieces(search: Callable, rows: int, pieces: int, k: int, n_valid, row_filter: RowFilter | None,
                     row_ids):
    """An exact top-k over ``rows`` corpus rows searched as ``pieces`` equal consecutive slices.

    ``search(start, stop, k, n_valid, row_filter, row_ids) -> (scores [Q, k], ids [Q, k])`` searches
    corpus rows [start, stop) with the filter and ids sliced to them (ids are positions within the
    slice when ``row_ids`` is None). The Pallas scans address their corpus operand with 32-bit
    offsets (`MAX_SCAN_ELEMENTS`); a bigger corpus is searched a slice at a time. Each slice's exact
    top-k (ties to the smaller id) holds every row of the overall top-k that lies in it, so sorting
    the slices' lists by (score descending, id ascending) gives the result of one scan.
    """
    if pieces == 1:
        return search(0, rows, k, n_valid, row_filter, row_ids)
    per_piece = -(-rows // pieces)
    scores, ids = [], []
    for start in range(0, rows, per_piece):
        stop = min(start + per_piece, rows)
        piece_ids = None if row_ids is None else row_ids[start:stop]
        s, i = search(start, stop, min(k, stop - start), jnp.clip(n_valid - start, 0, stop - start),
                      corpus_slice(row_filter, start, stop), piece_ids)
        scores.append(s)
        ids.append(i if row_ids is not None else jnp.where(i >= 0, i + start, i))  # slice positions -> corpus rows
    return sort_by_score_then_id(jnp.concatenate(scores, axis=1), jnp.concatenate(ids, axis=1), k)


def _check_addressable(x_ops, x_axes):
    for a, axis in zip(x_ops, x_axes):
        width, rows = a.shape[1 - axis], a.shape[axis]
        if a.size > MAX_SCAN_ELEMENTS:
            raise ValueError(
                f"the Pallas scan addresses its corpus with 32-bit offsets, and this corpus operand is "
                f"{width} words x {rows:,} padded rows ({a.size:,} elements > 2**31 - 1); search it "
                f"with impl='xla' (or impl='auto', which does), or in shards of at most "
                f"{MAX_SCAN_ELEMENTS // width // 2:,} rows")


def _corpus_spec(a, axis: int, split_len: int):
    """The block of one split of a corpus operand whose corpus axis is ``axis`` (1: [r, N], 0: [N, r])."""
    if axis == 1:
        return pl.BlockSpec((a.shape[0], split_len), lambda i, s: (0, s))
    return pl.BlockSpec((split_len, a.shape[1]), lambda i, s: (s, 0))


def filter_operands(row_filter: RowFilter | None, padded_queries: int, padded_rows: int, block_q: int,
                    split_len: int):
    """``(operands, block specs, tile_pass)`` of a row filter for the running-top-k kernel.

    ``tile_pass(refs, offset, block_n)`` returns bool [block_q or 1, block_n] for the
    current tile. Masks travel as int8 [M, N] (1 = pass); predicates as the attribute
    rows [A', N] (A' a power of two; the extra rows always pass) and bounds [Qp or 1, A'].
    """
    if row_filter is None:
        return (), (), None
    if row_filter.mask_mn is not None:
        mask = pad_axis(row_filter.mask_mn.astype(jnp.int8), 1, padded_rows)
        if mask.shape[0] == 1:
            spec = pl.BlockSpec((1, split_len), lambda i, s: (0, s))
        else:
            mask = pad_axis(mask, 0, padded_queries)
            spec = pl.BlockSpec((block_q, split_len), lambda i, s: (i, s))

        def mask_tile(refs, offset, block_n):
            return refs[0][:, pl.ds(offset, block_n)] != 0

        return (mask,), (spec,), mask_tile
    attrs, lo, hi = row_filter.predicates
    a_pad = next_pow2(attrs.shape[0])
    attrs = pad_axis(pad_axis(attrs, 0, a_pad), 1, padded_rows)
    shared = lo.shape[0] == 1
    rows = 1 if shared else padded_queries
    widths = ((0, rows - lo.shape[0]), (0, a_pad - lo.shape[1]))
    lo = jnp.pad(lo, widths, constant_values=-jnp.inf)
    hi = jnp.pad(hi, widths, constant_values=jnp.inf)
    bound_spec = (pl.BlockSpec((1, a_pad), lambda i, s: (0, 0)) if shared
                  else pl.BlockSpec((block_q, a_pad), lambda i, s: (i, 0)))
    specs = (pl.BlockSpec((a_pad, split_len), lambda i, s: (0, s)), bound_spec, bound_spec)

    def predicate_tile(refs, offset, block_n):
        attrs_ref, lo_ref, hi_ref = refs

        def attribute(a, ok):
            v = attrs_ref[pl.ds(a, 1), pl.ds(offset, block_n)]  # [1, block_n]
            return ok & (lo_ref[:, pl.ds(a, 1)] <= v) & (v <= hi_ref[:, pl.ds(a, 1)])

        return lax.fori_loop(0, a_pad, attribute, jnp.ones((lo_ref.shape[0], block_n), jnp.bool_))

    return (attrs, lo, hi), specs, predicate_tile


class ScanLayout(NamedTuple):
    """How a scan kernel lays the corpus out: padded operands, their block specs and sizes."""

    queries: int  # real queries Q
    padded_queries: int
    per_split: int  # tiles per program
    splits: int
    operands: tuple  # n_valid, q_ops, x_ops, filter operands, row ids (in the kernel's ref order)
    in_specs: list
    counts: tuple  # (len q_ops, len x_ops, len filter operands, len id operands)
    tile_pass: Callable | None


def scan_layout(q_ops: Sequence, x_ops: Sequence, n_valid, *, block_q: int, block_n: int, target_splits: int,
                row_filter: RowFilter | None, row_ids, x_axes: Sequence[int] | None = None) -> ScanLayout:
    """Pads queries to ``block_q`` and the corpus to whole splits; grid ``(query blocks, splits)``.
    ``x_axes``: each corpus operand's corpus axis (default 1: corpus-axis-last [r, N]; 0: [N, r],
    row-major). A corpus whose length is already whole splits is not copied."""
    x_axes = tuple(x_axes) if x_axes is not None else (1,) * len(x_ops)
    q = q_ops[0].shape[0]
    n = x_ops[0].shape[x_axes[0]]
    qp = -(-q // block_q) * block_q
    per_split, splits = split_layout(n, block_n, target_splits)
    split_len = per_split * block_n
    np_ = splits * split_len
    q_ops = [pad_axis(a, 0, qp) for a in q_ops]
    x_ops = [pad_axis(a, axis, np_) for a, axis in zip(x_ops, x_axes)]
    _check_addressable(x_ops, x_axes)
    n_valid_arr = jnp.reshape(jnp.asarray(n_valid, jnp.int32), (1,))
    f_ops, f_specs, tile_pass = filter_operands(row_filter, qp, np_, block_q, split_len)
    id_ops = () if row_ids is None else (pad_axis(jnp.asarray(row_ids, jnp.int32)[None, :], 1, np_),)
    in_specs = [pl.BlockSpec((1,), lambda i, s: (0,))]
    in_specs += [pl.BlockSpec((block_q, a.shape[1]), lambda i, s: (i, 0)) for a in q_ops]
    in_specs += [_corpus_spec(a, axis, split_len) for a, axis in zip(x_ops, x_axes)]
    in_specs += list(f_specs)
    in_specs += [pl.BlockSpec((1, split_len), lambda i, s: (0, s)) for _ in id_ops]
    return ScanLayout(q, qp, per_split, splits, (n_valid_arr, *q_ops, *x_ops, *f_ops, *id_ops), in_specs,
                      (len(q_ops), len(x_ops), len(f_ops), len(id_ops)), tile_pass)


def masked_tile_fn(layout: ScanLayout, tile_score: Callable, refs, *, block_q: int, block_n: int):
    """``tile(j) -> (scores float32 [block_q, block_n], ids int32 [block_q, block_n])`` for tile j
    of the current program's split: rows past ``n_valid``, failing the filter or with a negative
    id score -inf; ids are the row ids (or the corpus positions). ``refs``: the kernel's input refs."""
    n_q, n_x, n_f, n_id = layout.counts
    nv_ref, refs = refs[0], refs[1:]
    q_refs, x_refs = refs[:n_q], refs[n_q:n_q + n_x]
    f_refs, id_refs = refs[n_q + n_x:n_q + n_x + n_f], refs[n_q + n_x + n_f:n_q + n_x + n_f + n_id]
    split_len = layout.per_split * block_n
    split = pl.program_id(1)
    col = lax.broadcasted_iota(jnp.int32, (block_q, block_n), 1)

    def tile(j):
        offset = pl.multiple_of(j * block_n, block_n)
        scores = tile_score(q_refs, x_refs, offset, block_n)
        position = split * split_len + offset + col
        keep = position < nv_ref[0]
        if layout.tile_pass is not None:
            keep = keep & layout.tile_pass(f_refs, offset, block_n)
        if id_refs:
            ids = jnp.broadcast_to(id_refs[0][:, pl.ds(offset, block_n)], (block_q, block_n))
            keep = keep & (ids >= 0)
        else:
            ids = position
        return jnp.where(keep, scores, -jnp.inf), ids

    return tile


def running_topk_call(
    tile_score: Callable,
    q_ops: Sequence,
    x_ops: Sequence,
    n_valid,
    k: int,
    *,
    block_q: int,
    block_n: int,
    target_splits: int,
    interpret: bool,
    row_filter: RowFilter | None = None,
    row_ids=None,
    x_axes: Sequence[int] | None = None,
):
    """Top-k (scores float32 [Q, k], ids int32 [Q, k]) with the Pallas running-top-k kernel.

    q_ops: arrays [Q, c_i] (row i = query i); x_ops: corpus operands stored
    corpus-axis-last, [r_i, N], or with ``x_axes`` (`scan_layout`) some of them row-major [N, r_i].
    ``tile_score(q_refs, x_refs, col_offset, block_n)``
    returns float32 scores [block_q, block_n] for corpus columns
    ``col_offset .. col_offset + block_n`` of the current split. ``row_filter``: see
    ``kernels.row_filter``; ``row_ids`` int32 [N]: reported ids and tie-breakers
    (negative = never matches). Missing results (fewer than k rows pass): id -1, -inf.
    """
    kp = next_pow2(k)
    layout = scan_layout(q_ops, x_ops, n_valid, block_q=block_q, block_n=block_n, target_splits=target_splits,
                         row_filter=row_filter, row_ids=row_ids, x_axes=x_axes)
    qp, splits = layout.padded_queries, layout.splits

    def kernel(*refs):
        out_s_ref, out_i_ref = refs[-2:]
        masked_tile = masked_tile_fn(layout, tile_score, refs[:-2], block_q=block_q, block_n=block_n)
        slot = lax.broadcasted_iota(jnp.int32, (block_q, kp), 1)
        init = (jnp.full((block_q, kp), -jnp.inf, jnp.float32), INT_MAX - slot)

        def tile_step(j, best):
            tile, gid = masked_tile(j)

            def candidate(tile, bs, bi):
                t_best = jnp.max(tile, axis=1, keepdims=True)
                t_id = jnp.min(jnp.where(tile == t_best, gid, INT_MAX), axis=1, keepdims=True)
                worst = jnp.min(bs, axis=1, keepdims=True)
                worst_id = jnp.max(jnp.where(bs == worst, bi, -1), axis=1, keepdims=True)
                better = (t_best > -jnp.inf) & ((t_best > worst) | ((t_best == worst) & (t_id < worst_id)))
                return t_best, t_id, worst, worst_id, better

            def cond(carry):
                return carry[3]

            def body(carry):
                tile, bs, bi, _ = carry
                t_best, t_id, worst, worst_id, better = candidate(tile, bs, bi)
                replace = better & (bs == worst) & (bi == worst_id)
                bs = jnp.where(replace, t_best, bs)
                bi = jnp.where(replace, t_id, bi)
                tile = jnp.where(better & (gid == t_id), -jnp.inf, tile)
                go = jnp.max(candidate(tile, bs, bi)[4].astype(jnp.int32)) > 0
                return tile, bs, bi, go

            bs, bi = best
            go = jnp.max(candidate(tile, bs, bi)[4].astype(jnp.int32)) > 0
            _, bs, bi, _ = lax.while_loop(cond, body, (tile, bs, bi, go))
            return bs, bi

        bs, bi = lax.fori_loop(0, layout.per_split, tile_step, init)
        out_s_ref[...] = bs
        out_i_ref[...] = bi

    out_spec = pl.BlockSpec((pl.squeezed, block_q, kp), lambda i, s: (s, i, 0))
    scores, ids = pl.pallas_call(
        kernel,
        grid=(qp // block_q, splits),
        in_specs=layout.in_specs,
        out_specs=[out_spec, out_spec],
        out_shape=[
            jax.ShapeDtypeStruct((splits, qp, kp), jnp.float32),
            jax.ShapeDtypeStruct((splits, qp, kp), jnp.int32),
        ],
        interpret=interpret,
        compiler_params=pallas_compiler_params(),
        name="running_topk",
    )(*layout.operands)
    q = layout.queries
    scores = jnp.transpose(scores, (1, 0, 2)).reshape(qp, splits * kp)[:q]
    ids = jnp.transpose(ids, (1, 0, 2)).reshape(qp, splits * kp)[:q]
    neg, ids = lax.sort((-scores, ids), dimension=1, num_keys=2)
    return mark_missing(-neg[:, :k], ids[:, :k])

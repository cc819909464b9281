"""Flash-style Pallas tiles for the ring losses (InfoNCE, SigLIP): scores, masks, loss statistics
and gradients fused.

The ring loss (`embedjax.losses.ring`) scores each device's rows against a visiting key block
tile by tile. Its XLA tiles run one ``fori_loop`` iteration per t x t tile, and every iteration
launches a handful of kernels (matmul, masks, exp-sums, dynamic slices and updates of the
statistics, the pullback's two matmuls). On an H200 at 32,768 x 768 that path took 90 ms
against the dense loss's 23.5 ms (BENCHMARKS.md): 1,024 tiles per pass at the default tile of
1,024 leave ~8 us of matmul per tile, so launches and loop bookkeeping dominate. These kernels
do one (kind, block) pass in one launch, as flash attention does for attention:

* **Forward** (`tile_statistics`, grid over row tiles of ``block`` anchors): each program walks
  the key tiles, accumulates the tile's dot products over ``block_dim`` chunks of the embedding,
  builds the positive / candidate masks from the ids in registers, and folds the tile into the
  rows' statistics: for InfoNCE the online (max, sum-exp) over the candidates and over the
  positives, for SigLIP the sum of the pairs' sigmoid losses. Column statistics (the documents'
  d->q direction) cannot be accumulated across programs without atomics, so each program (at
  most `MAX_PROGRAMS`, each walking a contiguous run of row tiles) keeps its own partial per
  key: [programs, keys] floats, merged in XLA (`merge_partials`; 264 x 32,768 floats, 35 MiB
  per statistic at 32k keys, against the dense loss's 4 GiB of logits).
* **Backward**, the score cotangent (InfoNCE: ``g * softmax`` over each mask, from the saved
  log-sum-exps; SigLIP: ``g * d softplus``) is recomputed tile by tile, as flash attention's
  backward does:
  `anchor_gradients` (grid over row tiles) accumulates ``cot @ keys`` and the row sums that
  give the inverse-norm, scale and shift gradients; `key_gradients` (grid over key tiles)
  accumulates ``cot^T @ anchors``. Two kernels because a program may not add into another's
  output (no atomics): each recomputes the tile's scores, 10 B^2 d FLOPs per step against the
  XLA tiles' 8 and the dense loss's 6, traded for no [B, B] array in memory and no per-tile
  launches.

Scores are ``scale * <a, k> * ra * rk + shift`` with per-row inverse norms ``ra``/``rk`` (ones
for dot products), so cosine similarity keeps its gradient through the norms. Every loaded
block has a power-of-two size (``block``, ``block_dim``; the caller pads rows, keys and the
embedding), values are never sliced in registers, and products accumulate in float32
(``preferred_element_type``), so the kernels follow the Triton backend's rules; on CPU they
run in interpret mode (`tests/kernels/test_ring_tiles.py` checks them against float64
NumPy on awkward sizes; `tests/kernels/test_gpu_lowering.py` lowers them for CUDA). On an H200
(2026-12-04, BENCHMARKS.md) they lose badly: at the then default block of 64 Triton asks for 400
KiB of shared memory even unpipelined (608 KiB at its default 3 stages; the card has 227 KiB), and
at ``tile=32`` (now the default) they compile, agree with float64 to TF32 rounding (3.8e-4), and take 931 ms at
32k x 768 against the dense loss's 24 ms and the XLA tiles' 39.4 ms at 4096. The backward
kernels hold ``block x embedding`` float32 accumulators (32 x 768 at the defaults), and every
program walks every key tile serially; a faster design needs the embedding split across
programs or a split-K reduction, which is not done. The layout is
Triton's: every program sees the whole key (or anchor) array, which a TPU's VMEM could not hold
at these sizes, so on a TPU the XLA tiles remain the path.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from embedjax.kernels.dispatch import pallas_compiler_params
from embedjax.kernels.pallas_topk import next_pow2, pad_axis

KINDS = ("qd", "qh", "qq", "dd")  # queries x documents / hard negatives / queries, documents x documents
FAMILIES = ("infonce", "siglip")
SAVED = {"infonce": ("lse_all", "g_all", "lse_pos", "g_pos"), "siglip": ("g_sum",)}  # per row, for the backward
NEG_INF = -jnp.inf
# Rows per tile. At 64 the gradient tiles ask 416 KiB of shared memory at 768 dims, over an H100's or
# H200's 227 KiB (the H200 refused them on 2026-12-04; benchmarks/triton_resources.py compiles them
# for sm_90 offline and agrees); 32 asks 208 KiB and ran on the H200. The ask grows with the
# embedding width (~8.7 bytes per row and dimension), so wider embeddings need tile=16.
DEFAULT_BLOCK = 32
MIN_BLOCK = 16  # Triton's dots need at least 16 rows per operand
# Triton's software pipelining keeps this many copies of each loop's loaded tiles in shared memory:
# at its default of 3 the kernels asked an H200 for 608 KiB (block 64) and 288 KiB (block 32) of
# its 227 KiB, so the loops run unpipelined.
PIPELINE_STAGES = 1
MAX_BLOCK_DIM = 128
MAX_PROGRAMS = 264  # forward programs per pass: 2 per SM of an H100 (132 SMs); bounds the per-key partials


def pair_masks(kind: str, row_group, row_doc, row_valid, key_group, key_doc, key_valid):
    """(positives or None, candidates) for broadcastable row [R, 1] and key [1, C] metadata.

    ``kind`` "qd": query i's positives are the documents of its group; its candidates are its
    positives and every document of another group that is not its own document (a duplicate
    document in another group is no negative). "qh": every valid hard negative except those
    whose id (``key_doc``) is the query's own document. "qq"/"dd": same-side terms, every row
    of another group (and, for documents, not the same document). ``*_valid`` are bool; rows
    and keys that are padding are never candidates. The InfoNCE denominator runs over
    candidates, which include the positives.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    both_valid = row_valid & key_valid
    if kind == "qh":
        return None, both_valid & (key_doc != row_doc)
    same_group = row_group == key_group
    if kind == "qq":
        return None, both_valid & ~same_group
    negative = both_valid & ~same_group & (row_doc != key_doc)
    if kind == "dd":
        return None, negative
    positive = both_valid & same_group
    return positive, negative | positive


def merge_lse(m1, l1, m2, l2):
    """Two online log-sum-exp states (max, sum of exp(x - max)) merged into one; -inf maxima are empty."""
    m = jnp.maximum(m1, m2)
    safe = jnp.where(m == NEG_INF, 0.0, m)
    return m, l1 * jnp.exp(m1 - safe) + l2 * jnp.exp(m2 - safe)


def merge_partials(m_pk, l_pk):
    """Partial (max, sum-exp) [P, C] of P programs merged over axis 0 into [C]."""
    m = jnp.max(m_pk, axis=0)
    safe = jnp.where(m == NEG_INF, 0.0, m)
    return m, jnp.sum(l_pk * jnp.exp(m_pk - safe[None]), axis=0)


# --------------------------------------------------------------------------- tile pieces


def _dims(d: int) -> tuple[int, int]:
    """(block_dim, padded dim): chunks of at most 128 columns, a power of two."""
    block_dim = min(MAX_BLOCK_DIM, next_pow2(max(d, MIN_BLOCK)))
    return block_dim, -(-d // block_dim) * block_dim


def _dot_tile(a_ref, k_ref, a_rows, k_rows, n_chunks, block_dim):
    """<a, k> float32 [len a_rows, len k_rows] accumulated over embedding chunks (loads from refs)."""
    acc = None
    for c in range(n_chunks):
        cols = pl.ds(c * block_dim, block_dim)
        part = lax.dot_general(a_ref[a_rows, cols], k_ref[k_rows, cols], (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)
        acc = part if acc is None else acc + part
    return acc


def lse_partial(logits, mask, axis):
    """The tile's (max, sum-exp) over ``mask`` along ``axis``, kept as a size-1 axis (per row [R, 1] for
    axis 1 of a [R, C] tile, per key [1, C] for axis 0; shared with the XLA tiles)."""
    masked = jnp.where(mask, logits, NEG_INF)
    m = jnp.max(masked, axis=axis, keepdims=True)
    safe = jnp.where(m == NEG_INF, 0.0, m)
    return m, jnp.sum(jnp.exp(masked - safe), axis=axis, keepdims=True)


def softmax_weight(logits, mask, lse, g):
    """g * exp(logits - lse) on ``mask``: the cotangent of g * log-sum-exp over the mask
    (``lse`` and ``g`` broadcast against ``logits``; shared with the XLA tiles)."""
    return g * jnp.exp(jnp.where(mask, logits - lse, NEG_INF))


def _labels(logits, positive):
    """SigLIP's +1 (positive pair) / -1 labels of a tile."""
    return jnp.where(positive, 1.0, -1.0) if positive is not None else jnp.full(logits.shape, -1.0, jnp.float32)


def sigmoid_losses(logits, positive, candidates):
    """SigLIP's per-pair losses softplus(-label * logit) on the candidates, 0 elsewhere (positives
    labelled +1; ``positive`` None: all -1)."""
    return jnp.where(candidates, jax.nn.softplus(-_labels(logits, positive) * logits), 0.0)


def sigmoid_weight(logits, positive, candidates, g):
    """g * d sigmoid_losses / d logits (``g`` broadcast against ``logits``)."""
    labels = _labels(logits, positive)
    return g * jnp.where(candidates, -labels * jax.nn.sigmoid(-labels * logits), 0.0)


def _cotangent(family, logits, masks, rows_saved, keys_saved, do_rows, do_cols):
    """d(loss)/d(logits) of a tile: the rows' and the keys' terms (saved: `SAVED`, broadcastable)."""
    positive, candidates = masks
    cot = jnp.zeros(logits.shape, jnp.float32)
    for saved, on in ((rows_saved, do_rows), (keys_saved, do_cols)):
        if not on:
            continue
        if family == "siglip":
            (g_sum,) = saved
            cot = cot + sigmoid_weight(logits, positive, candidates, g_sum)
            continue
        lse_all, g_all, lse_pos, g_pos = saved
        cot = cot + softmax_weight(logits, candidates, lse_all, g_all)
        if positive is not None:
            cot = cot + softmax_weight(logits, positive, lse_pos, g_pos)
    return cot


def _stat_names(family: str, kind: str) -> list[str]:
    if family == "siglip":
        return ["sum"]
    return ["m_all", "l_all"] + (["m_pos", "l_pos"] if kind == "qd" else [])


def _empty_stats(family, kind, shape):
    """Statistics of no pairs at all, each ``shape`` ([block, 1] per row, [1, block] per key)."""
    if family == "siglip":
        return [jnp.zeros(shape, jnp.float32)]
    return [jnp.full(shape, NEG_INF, jnp.float32), jnp.zeros(shape, jnp.float32)] * (
        len(_stat_names(family, kind)) // 2)


def _fold_tile_rows(family, stats, logits, masks):
    """The rows' statistics after one more key tile."""
    if family == "siglip":
        return (stats[0] + jnp.sum(sigmoid_losses(logits, *masks), axis=1, keepdims=True),)
    return tuple(_merge_state(family, list(stats), _tile_partials(family, logits, masks, axis=1)))


def _tile_partials(family, logits, masks, axis):
    """The tile's partial statistics per row (axis 1, [block, 1]) or per key (axis 0, [1, block]),
    in `_stat_names` order."""
    if family == "siglip":
        return [jnp.sum(sigmoid_losses(logits, *masks), axis=axis, keepdims=True)]
    positive, candidates = masks
    parts = list(lse_partial(logits, candidates, axis))
    if positive is not None:
        parts += lse_partial(logits, positive, axis)
    return parts


def _merge_state(family, current, part):
    """Running statistics after one more tile's partials (lists in `_stat_names` order)."""
    if family == "siglip":
        return [current[0] + part[0]]
    out = []
    for i in range(0, len(current), 2):
        out += merge_lse(current[i], current[i + 1], part[i], part[i + 1])
    return out


def _merge_columns(family, names, partial):
    """Per-key statistics [C] from the programs' partials [row tiles, C]."""
    if family == "siglip":
        return {"sum": jnp.sum(partial[0], axis=0)}
    out = {}
    for m_name, l_name, m_pk, l_pk in zip(names[::2], names[1::2], partial[::2], partial[1::2]):
        out[m_name], out[l_name] = merge_partials(m_pk, l_pk)
    return out


# ------------------------------------------------------------------------- operand layout


def _row_vec(x_r, rows):
    """A per-row vector as [rows, 1] (padded with zeros)."""
    return pad_axis(jnp.asarray(x_r)[:, None], 0, rows)


def _key_vec(x_c, keys):
    return pad_axis(jnp.asarray(x_c)[None, :], 1, keys)


def _check_block(block: int, rows: int, keys: int):
    if block < MIN_BLOCK or block & (block - 1):
        raise ValueError(f"block must be a power of two >= {MIN_BLOCK} (Triton's dot sizes); got {block}")
    if rows % block or keys % block:
        raise ValueError(f"rows ({rows}) and keys ({keys}) must be whole blocks of {block}; pad them first")


def _operands(a_rd, k_cd, ra_r, rk_c, row_meta, key_meta):
    """Padded embeddings, [R,1] / [1,C] per-row vectors and the chunking of the embedding dim."""
    block_dim, dp = _dims(a_rd.shape[1])
    rows, keys = a_rd.shape[0], k_cd.shape[0]
    a, k = pad_axis(a_rd, 1, dp), pad_axis(k_cd, 1, dp)
    row_vecs = [_row_vec(ra_r.astype(jnp.float32), rows)] + [_row_vec(x.astype(jnp.int32), rows) for x in row_meta]
    key_vecs = [_key_vec(rk_c.astype(jnp.float32), keys)] + [_key_vec(x.astype(jnp.int32), keys) for x in key_meta]
    return a, k, row_vecs, key_vecs, block_dim, dp // block_dim


def _scalars(scale, shift):
    return (jnp.reshape(jnp.asarray(scale, jnp.float32), (1,)), jnp.reshape(jnp.asarray(shift, jnp.float32), (1,)))


_SCALAR_SPEC = pl.BlockSpec((1,), lambda i: (0,))


def _tile_logits(kind, a_ref, k_ref, a_rows, k_rows, rv, kv, scale, shift, n_chunks, block_dim):
    """(dot products, logits, masks) of one tile. rv / kv: loaded (inverse norm, group, doc, valid)."""
    dot = _dot_tile(a_ref, k_ref, a_rows, k_rows, n_chunks, block_dim)
    (ra, rg, rd, rvalid), (rk, kg, kd, kvalid) = rv, kv
    logits = dot * ra * rk * scale + shift
    return dot, logits, pair_masks(kind, rg, rd, rvalid != 0, kg, kd, kvalid != 0)


# ------------------------------------------------------------------------------ forward


def _check_family(family: str):
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}; got {family!r}")


def _program_count(row_tiles: int, max_programs: int) -> int:
    """The most programs <= max_programs that split the row tiles evenly (each takes a contiguous run)."""
    return max(p for p in range(1, min(row_tiles, max(1, max_programs)) + 1) if row_tiles % p == 0)


@functools.partial(jax.jit, static_argnames=("family", "kind", "do_rows", "do_cols", "block", "max_programs",
                                             "interpret"))
def tile_statistics(a_rd, k_cd, ra_r, rk_c, row_meta, key_meta, scale, shift, *, family: str, kind: str,
                    do_rows: bool, do_cols: bool, block: int = DEFAULT_BLOCK, max_programs: int = MAX_PROGRAMS,
                    interpret: bool = False):
    """The loss statistics of every (anchor, key) tile of one ring pass, in one launch.

    a_rd [R, D] anchors and k_cd [C, D] keys (R, C whole ``block``s), ra_r [R] / rk_c [C]
    inverse norms, row_meta / key_meta (group, doc, valid) int [R] / [C] (see `pair_masks` for
    ``kind``), logits ``scale * <a, k> * ra * rk + shift``.
    Returns ``(rows, cols)``: rows (if ``do_rows``) a dict of [R] vectors, cols (if ``do_cols``)
    the same per key [C], merged from the programs' partials. InfoNCE: the max and sum-exp over
    candidates (``m_all``, ``l_all``) and, for kind "qd", over positives (``m_pos``, ``l_pos``).
    SigLIP: ``sum``, the summed sigmoid losses of the candidate pairs (positives labelled +1).
    At most ``max_programs`` programs each walk a contiguous run of row tiles and keep one
    partial per key, so the partials take [programs, C] floats per statistic whatever R is.
    """
    _check_family(family)
    rows, keys = a_rd.shape[0], k_cd.shape[0]
    _check_block(block, rows, keys)
    a, k, row_vecs, key_vecs, block_dim, n_chunks = _operands(a_rd, k_cd, ra_r, rk_c, row_meta, key_meta)
    names = _stat_names(family, kind)
    n_key_tiles = keys // block
    programs = _program_count(rows // block, max_programs)
    per_program = rows // block // programs  # row tiles each program walks

    def kernel(scale_ref, shift_ref, a_ref, *refs):
        row_refs, key_refs, k_ref = refs[:4], refs[4:8], refs[8]
        outs = refs[9:]
        row_outs, col_outs = (outs[:len(names)] if do_rows else ()), (outs[len(names):] if do_rows else outs)
        scale, shift = scale_ref[0], shift_ref[0]

        def key_tile(j):
            return pl.ds(pl.multiple_of(j * block, block), block)

        def clear_columns(j, carry):  # this program's per-key partials start empty
            for out_ref, value in zip(col_outs, _empty_stats(family, kind, (1, block))):
                out_ref[:, key_tile(j)] = value
            return carry

        def row_tile(g, carry):
            a_rows = pl.ds(pl.multiple_of(g * block, block), block)
            rv = [r[a_rows, :] for r in row_refs]

            def tile(j, stats):
                k_rows = key_tile(j)
                kv = [r[:, k_rows] for r in key_refs]
                _, logits, masks = _tile_logits(kind, a_ref, k_ref, a_rows, k_rows, rv, kv, scale, shift, n_chunks,
                                                block_dim)
                if do_cols:
                    merged = _merge_state(family, [r[:, k_rows] for r in col_outs],
                                          _tile_partials(family, logits, masks, axis=0))
                    for out_ref, value in zip(col_outs, merged):
                        out_ref[:, k_rows] = value
                return _fold_tile_rows(family, stats, logits, masks) if do_rows else stats

            stats = lax.fori_loop(0, n_key_tiles, tile, tuple(_empty_stats(family, kind, (block, 1))))
            for out_ref, value in zip(row_outs, stats if do_rows else ()):
                out_ref[a_rows, :] = value
            return carry

        if do_cols:
            lax.fori_loop(0, n_key_tiles, clear_columns, 0)
        lax.fori_loop(0, per_program, row_tile, 0)

    span = per_program * block  # rows per program
    row_spec = pl.BlockSpec((span, 1), lambda p: (p, 0))
    in_specs = [_SCALAR_SPEC, _SCALAR_SPEC, pl.BlockSpec((span, a.shape[1]), lambda p: (p, 0))]
    in_specs += [row_spec] * 4 + [pl.BlockSpec((1, keys), lambda p: (0, 0))] * 4
    in_specs += [pl.BlockSpec(k.shape, lambda p: (0, 0))]
    out_specs, out_shape = [], []
    if do_rows:
        out_specs += [row_spec] * len(names)
        out_shape += [jax.ShapeDtypeStruct((rows, 1), jnp.float32)] * len(names)
    if do_cols:
        out_specs += [pl.BlockSpec((1, keys), lambda p: (p, 0))] * len(names)
        out_shape += [jax.ShapeDtypeStruct((programs, keys), jnp.float32)] * len(names)
    outs = pl.pallas_call(kernel, grid=(programs,), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                          interpret=interpret, compiler_params=pallas_compiler_params(num_stages=PIPELINE_STAGES),
                          name=f"{family}_stats_{kind}")(
        *_scalars(scale, shift), a, *row_vecs, *key_vecs, k)
    row_stats = dict(zip(names, (x[:, 0] for x in outs[:len(names)]))) if do_rows else None
    col_stats = _merge_columns(family, names, outs[len(names):] if do_rows else outs) if do_cols else None
    return row_stats, col_stats


# ----------------------------------------------------------------------------- backward


def _accumulate_chunks(acc, weights, ref, rows, contract: int, block_dim: int):
    """``acc[c] += weights (contracted on axis ``contract``) @ ref[rows, chunk c]`` for every embedding
    chunk: ``cot @ keys`` (contract 1) or ``cot^T @ anchors`` (contract 0). The weights are rounded to
    the embeddings' dtype first, so bf16 inputs give a bf16 x bf16 product accumulated in float32."""
    weights = weights.astype(ref.dtype)
    return tuple(acc[c] + lax.dot_general(weights, ref[rows, pl.ds(c * block_dim, block_dim)],
                                          (((contract,), (0,)), ((), ())), preferred_element_type=jnp.float32)
                 for c in range(len(acc)))


def _split_refs(refs, n_saved):
    """(row metadata, row saved, key metadata, key saved, keys, outputs) refs of a gradient kernel."""
    rs_end = 4 + n_saved
    ks_end = rs_end + 4 + n_saved
    return refs[:4], refs[4:rs_end], refs[rs_end:ks_end - n_saved], refs[ks_end - n_saved:ks_end], refs[ks_end], \
        refs[ks_end + 1:]


def _saved_operands(family, saved, n, as_rows):
    """The `SAVED` vectors as [n, 1] (rows) or [1, n] (keys); zeros when absent."""
    vec = _row_vec if as_rows else _key_vec
    return [vec(jnp.zeros((n,), jnp.float32) if saved is None or name not in saved
                else saved[name].astype(jnp.float32), n) for name in SAVED[family]]


@functools.partial(jax.jit, static_argnames=("family", "kind", "do_rows", "do_cols", "block", "interpret"))
def tile_gradients(a_rd, k_cd, ra_r, rk_c, row_meta, key_meta, scale, shift, rows_saved, keys_saved, *,
                   family: str, kind: str, do_rows: bool, do_cols: bool, block: int = DEFAULT_BLOCK,
                   interpret: bool = False):
    """Gradients of ``sum_i g_i * stat_i`` over the pass's rows (and keys) w.r.t. its inputs.

    Same operands as `tile_statistics`, plus the saved values (`SAVED`): ``rows_saved`` (used
    when ``do_rows``) and ``keys_saved`` (when ``do_cols``) are dicts of [R] / [C] vectors.
    InfoNCE: ``lse_all``, ``g_all`` and, for kind "qd", ``lse_pos``, ``g_pos`` (the forward's
    log-sum-exps and their cotangents). SigLIP: ``g_sum``, the cotangent of each summed loss.
    Returns a dict: ``a`` [R, D] and ``k`` [C, D] (float32), ``ra`` [R], ``rk`` [C], and scalars
    ``scale``, ``shift``.
    """
    _check_family(family)
    rows, keys = a_rd.shape[0], k_cd.shape[0]
    _check_block(block, rows, keys)
    d = a_rd.shape[1]
    a, k, row_vecs, key_vecs, block_dim, n_chunks = _operands(a_rd, k_cd, ra_r, rk_c, row_meta, key_meta)
    row_saved = _saved_operands(family, rows_saved if do_rows else None, rows, True)
    key_saved = _saved_operands(family, keys_saved if do_cols else None, keys, False)
    n_saved = len(SAVED[family])
    dp = a.shape[1]

    def anchor_kernel(scale_ref, shift_ref, a_ref, *refs):
        """One program per row tile: walk the key tiles, accumulate cot @ keys."""
        row_refs, rs_refs, key_refs, ks_refs, k_ref, outs = _split_refs(refs, n_saved)
        da_ref, dra_ref, dscale_ref, dshift_ref = outs
        scale, shift = scale_ref[0], shift_ref[0]
        rv = [r[...] for r in row_refs]
        rs = [r[...] for r in rs_refs]
        all_rows = pl.ds(0, block)

        def tile(j, carry):
            w, total, acc = carry
            k_rows = pl.ds(pl.multiple_of(j * block, block), block)
            kv = [r[:, k_rows] for r in key_refs]
            ks = [r[:, k_rows] for r in ks_refs]
            dot, logits, masks = _tile_logits(kind, a_ref, k_ref, all_rows, k_rows, rv, kv, scale, shift, n_chunks,
                                              block_dim)
            cot = _cotangent(family, logits, masks, rs, ks, do_rows, do_cols)
            cot_rk = cot * kv[0]
            w = w + jnp.sum(cot_rk * dot, axis=1, keepdims=True)
            total = total + jnp.sum(cot, axis=1, keepdims=True)
            return w, total, _accumulate_chunks(acc, cot_rk, k_ref, k_rows, 1, block_dim)

        zero = jnp.zeros((block, 1), jnp.float32)
        acc0 = tuple(jnp.zeros((block, block_dim), jnp.float32) for _ in range(n_chunks))
        w, total, acc = lax.fori_loop(0, keys // block, tile, (zero, zero, acc0))
        ra = rv[0]
        for c in range(n_chunks):
            da_ref[:, pl.ds(c * block_dim, block_dim)] = scale * ra * acc[c]
        dra_ref[...] = scale * w
        dscale_ref[...] = ra * w
        dshift_ref[...] = total

    def key_kernel(scale_ref, shift_ref, a_ref, *refs):
        """One program per key tile: walk the row tiles, accumulate cot^T @ anchors."""
        row_refs, rs_refs, key_refs, ks_refs, k_ref, outs = _split_refs(refs, n_saved)
        dk_ref, drk_ref = outs
        scale, shift = scale_ref[0], shift_ref[0]
        kv = [r[...] for r in key_refs]
        ks = [r[...] for r in ks_refs]
        all_keys = pl.ds(0, block)

        def tile(i, carry):
            v, acc = carry
            a_rows = pl.ds(pl.multiple_of(i * block, block), block)
            rv = [r[a_rows, :] for r in row_refs]
            rs = [r[a_rows, :] for r in rs_refs]
            dot, logits, masks = _tile_logits(kind, a_ref, k_ref, a_rows, all_keys, rv, kv, scale, shift, n_chunks,
                                              block_dim)
            cot_ra = _cotangent(family, logits, masks, rs, ks, do_rows, do_cols) * rv[0]
            v = v + jnp.sum(cot_ra * dot, axis=0, keepdims=True)
            return v, _accumulate_chunks(acc, cot_ra, a_ref, a_rows, 0, block_dim)

        acc0 = tuple(jnp.zeros((block, block_dim), jnp.float32) for _ in range(n_chunks))
        v, acc = lax.fori_loop(0, rows // block, tile, (jnp.zeros((1, block), jnp.float32), acc0))
        for c in range(n_chunks):  # the key rows' scale * rk factor is applied outside (a [1, t] row here)
            dk_ref[:, pl.ds(c * block_dim, block_dim)] = acc[c]
        drk_ref[...] = scale * v

    operands = (*_scalars(scale, shift), a, *row_vecs, *row_saved, *key_vecs, *key_saved, k)
    whole_rows = pl.BlockSpec((rows, 1), lambda i: (0, 0))
    whole_keys = pl.BlockSpec((1, keys), lambda i: (0, 0))
    tile_rows = pl.BlockSpec((block, 1), lambda i: (i, 0))
    tile_keys = pl.BlockSpec((1, block), lambda i: (0, i))
    whole = lambda x: pl.BlockSpec(x.shape, lambda i: (0, 0))  # noqa: E731

    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    da, dra, dscale, dshift = pl.pallas_call(
        anchor_kernel, grid=(rows // block,),
        in_specs=[_SCALAR_SPEC, _SCALAR_SPEC, pl.BlockSpec((block, dp), lambda i: (i, 0))]
        + [tile_rows] * (4 + n_saved) + [whole_keys] * (4 + n_saved) + [whole(k)],
        out_specs=[pl.BlockSpec((block, dp), lambda i: (i, 0))] + [tile_rows] * 3,
        out_shape=[f32(rows, dp)] + [f32(rows, 1)] * 3, interpret=interpret, name=f"{family}_grad_anchors_{kind}",
        compiler_params=pallas_compiler_params(num_stages=PIPELINE_STAGES),
    )(*operands)
    dk, drk = pl.pallas_call(
        key_kernel, grid=(keys // block,),
        in_specs=[_SCALAR_SPEC, _SCALAR_SPEC, whole(a)] + [whole_rows] * (4 + n_saved)
        + [tile_keys] * (4 + n_saved) + [pl.BlockSpec((block, dp), lambda i: (i, 0))],
        out_specs=[pl.BlockSpec((block, dp), lambda i: (i, 0)), tile_keys],
        out_shape=[f32(keys, dp), f32(1, keys)], interpret=interpret, name=f"{family}_grad_keys_{kind}",
        compiler_params=pallas_compiler_params(num_stages=PIPELINE_STAGES),
    )(*operands)
    scale = jnp.asarray(scale, jnp.float32)
    dk = dk[:, :d] * (scale * key_vecs[0][0])[:, None]
    return dict(a=da[:, :d], k=dk, ra=dra[:, 0], rk=drk[0], scale=jnp.sum(dscale), shift=jnp.sum(dshift))

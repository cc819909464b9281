"""Exact memory-tiled ring losses: InfoNCE and SigLIP over the global batch, never
materialising the global [B, B] logits.

Inside ``jax.shard_map`` over one mesh axis (``data``), each of the n devices holds
B/n queries, documents and hard negatives. Key blocks (documents, hard negatives,
queries for same-side terms, with their ids, guide embeddings and pair
similarities) travel around the ring with ``lax.ppermute``; the transfer of the
next block is issued before the tiles of the current block are computed, so
communication overlaps compute. Each device scores its rows against the block
in t x t tiles and folds each tile into an online log-sum-exp (Milakov &
Gimelshein 2018), as Inf-CL (Cheng et al. 2024) does for CLIP, generalised here
to hard negatives, several positives, metadata masks, guided filtering,
same-side terms and Matryoshka prefixes.

One tile pass serves both directions: the q x d tile updates the q->d row
statistics of the local queries and the d->q column statistics of the visiting
documents, which travel with their block and come home after a full turn.

The backward pass (``jax.custom_vjp``) recomputes every tile from the saved
per-row log-sum-exps, turns the loss cotangents into the tile's score cotangent,
and pulls it back through the tile's score function with ``jax.vjp``; key
gradients travel around the ring with their block and come home at the end.
Peak memory per device is O(B/n * D + M * t^2) instead of O(B/n * B).

Matryoshka prefixes come from the same pass: the tile's dot products are
accumulated chunk by chunk over the prefix boundaries, giving every prefix's
similarity for the cost of one full-width matmul. Inputs may be bfloat16; all
tile products, statistics and gradient accumulators are float32.

``impl="pallas"`` (one prefix, no filter) replaces each pass's tile loop by fused kernels
(`embedjax.kernels.ring_tiles`): one launch scores, masks and folds all tiles
of a (tile family, block) pair, and two launches form its gradients; the ring around them is
the same. It is exact (tests against the dense loss) but untimed on a GPU, so "xla" stays the
default.

`ring_infonce` / `ring_siglip` take exactly the options of the dense
`embedjax.losses.contrastive.infonce` / `siglip` (see there for their meaning)
and return the same value and gradients.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from embedjax.kernels import ring_tiles as tiles
from embedjax.kernels import dispatch
from embedjax.kernels.dispatch import resolve_impl
from embedjax.kernels.pallas_topk import next_pow2
from embedjax.losses import contrastive as dense
from embedjax.losses import validation as val
from embedjax.multivector.maxsim import maxsim_paired, reduce_token_sims

DEFAULT_TILE = 1024
# On a GPU a 1024 tile leaves ~8 us of matmul per tile and per-tile launches dominate: on an H200 at
# 32,768 x 768 the ring took 90 ms at 1024 and 39.4 ms at 4096 against the dense loss's 23.5-23.7
# (BENCHMARKS.md, 2026-11-28 and 2026-12-04), for 64 MiB of float32 logits per tile.
GPU_DEFAULT_TILE = 4096


def default_tile() -> int:
    """Rows and keys per tile when the caller names none (before the local batch caps it)."""
    return GPU_DEFAULT_TILE if dispatch.default_backend() == "gpu" else DEFAULT_TILE


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static (hashable) description of one ring loss call."""

    family: str                    # "infonce" or "siglip"
    axis: str
    n: int                         # devices on the ring
    tile: int
    dims: tuple[int, ...]          # Matryoshka prefix ends
    has_h: bool
    guided: bool
    bidirectional: bool
    same_side: bool
    margin: float | None
    guide_margin: float
    maxsim: bool = False           # token vectors with masks; tiles score MaxSim
    impl: str = "xla"              # "xla": fori_loop over t x t tiles; "pallas": one fused launch per pass
    interpret: bool = False        # Pallas in interpret mode (CPU)

    @property
    def chunks(self):
        starts = (0,) + self.dims[:-1]
        return tuple(zip(starts, self.dims))

    def pairs(self):
        """(kind, anchor, key, update rows, update columns) for each tile family."""
        out = [("qd", "q", "d", True, self.bidirectional)]
        if self.has_h:
            out.append(("qh", "q", "h", True, False))
        if self.same_side:
            out.append(("qq", "q", "q", True, False))
            if self.bidirectional:
                out.append(("dd", "d", "d", False, True))
        return out


# ----------------------------------------------------------------------------- tiles


def _tile_logits(a_td, k_td, ra_mt, rk_mt, scale, shift, *, chunks):
    """Logits [M, t, t] of one tile for every Matryoshka prefix, and the raw similarities.

    Prefix m's dot product is the running sum of the chunk products up to chunk m,
    so all prefixes cost one full-width matmul. ``ra``/``rk`` are per-prefix inverse
    norms (ones for dot-product similarity).
    """
    running = None
    cumulative = []
    for lo, hi in chunks:
        part = lax.dot_general(a_td[:, lo:hi], k_td[:, lo:hi], (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)
        running = part if running is None else running + part
        cumulative.append(running)
    sims = jnp.stack(cumulative) * ra_mt[:, :, None] * rk_mt[:, None, :]
    return sims * scale + shift, sims


def _tile_maxsim_logits(a_tld, k_tld, ra_mt, rk_mt, scale, shift, *, a_mask_tl, k_mask_tl, chunks):
    """MaxSim logits [M, t, t] of a tile of token sets, and the raw scores (see `_tile_logits`).

    Prefix m's token dot products are running sums of chunk products, as for single vectors;
    each prefix then takes its own max over key tokens and sum over anchor tokens. Keys with
    no real token (padding rows) score 0 instead of -inf, keeping every product finite: their
    masks already drop them from the loss."""
    running = None
    scores = []
    for lo, hi in chunks:
        part = jnp.einsum("ald,bmd->ablm", a_tld[..., lo:hi], k_tld[..., lo:hi], preferred_element_type=jnp.float32)
        running = part if running is None else running + part
        scores.append(reduce_token_sims(running, a_mask_tl[:, None, :], k_mask_tl[None, :, :]))
    has_tokens = jnp.any(k_mask_tl, axis=1)[None, None, :]
    sims = jnp.where(has_tokens, jnp.stack(scores), 0.0) * ra_mt[:, :, None] * rk_mt[:, None, :]
    return sims * scale + shift, sims


def _score_fn(cfg, rows, keys, anchor, key):
    """The tile's score function of (anchor, key, anchor norms, key norms, scale, shift)."""
    if not cfg.maxsim:
        return functools.partial(_tile_logits, chunks=cfg.chunks)
    return functools.partial(_tile_maxsim_logits, a_mask_tl=rows["m" + anchor], k_mask_tl=keys["m" + key],
                             chunks=cfg.chunks)


def _guide_sims(ga_tg, gk_tg):
    return lax.dot_general(ga_tg, gk_tg, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _pair_masks(kind, rows, keys):
    """Positive and candidate masks [t, t] from per-example metadata only (`tiles.pair_masks`)."""
    key_doc = keys["hnid"] if kind == "qh" else keys["doc"]
    key_group = keys["hnid"] if kind == "qh" else keys["group"]  # unused for hard negatives
    positive, candidates = tiles.pair_masks(kind, rows["group"][:, None], rows["doc"][:, None],
                                            rows["valid"][:, None], key_group[None, :], key_doc[None, :],
                                            keys["valid"][None, :])
    return positive, candidates if positive is None else candidates & ~positive


def _filter_keep(cfg, sims_mtt, guide_tt, diag_mt, gdiag_t, axis):
    """Negatives kept by the margin / guide filters; the pair similarity (diag) belongs to
    the row side (axis=2: tile rows are the loss rows; axis=1: tile columns are)."""
    expand = (lambda x: x[..., :, None]) if axis == 2 else (lambda x: x[..., None, :])
    keep = jnp.ones(sims_mtt.shape, bool)
    if cfg.margin is not None:
        keep &= sims_mtt <= expand(diag_mt) - cfg.margin
    if cfg.guided:
        keep &= (guide_tt <= expand(gdiag_t) - cfg.guide_margin)[None]
    return keep


def _slice_rows(tree, start, size, names):
    """Dynamic slice of the listed per-example arrays along their example axis (last for [M, n])."""
    out = {}
    for name in names:
        x = tree[name]
        if x.ndim == 2 and name in ("diag", "rq", "rd", "rh"):
            out[name] = lax.dynamic_slice_in_dim(x, start, size, axis=1)
        else:
            out[name] = lax.dynamic_slice_in_dim(x, start, size, axis=0)
    return out


_ROW_META = ("group", "doc", "valid", "diag")
_H_META = ("hnid", "hvalid")


def _side_slice(cfg, tree, which, start):
    """Embedding, inverse norms, guide and metadata of one tile side ('q', 'd' or 'h')."""
    names = [which, "r" + which] + (["g" + which] if cfg.guided else []) + (["m" + which] if cfg.maxsim else [])
    if which == "h":
        names += list(_H_META)
    else:
        names += list(_ROW_META) + (["gdiag"] if cfg.guided else [])
    part = _slice_rows(tree, start, cfg.tile, names)
    if which == "h":
        part["valid"] = part.pop("hvalid")
    return part


def _tile_masks(cfg, kind, rows, keys, sims, guide, do_rows, do_cols):
    """(row 'all' mask, row 'pos' mask, column 'all' mask, column 'pos' mask), each [M,t,t] or None."""
    pos, negative = _pair_masks(kind, rows, keys)
    out = [None, None, None, None]
    if do_rows:
        keep = _filter_keep(cfg, sims, guide, rows["diag"], rows.get("gdiag"), axis=2)
        out[0] = negative[None] & keep
        out[1] = None if pos is None else jnp.broadcast_to(pos[None], sims.shape)
    if do_cols:
        keep = _filter_keep(cfg, sims, guide, keys["diag"], keys.get("gdiag"), axis=1)
        out[2] = negative[None] & keep
        out[3] = None if pos is None else jnp.broadcast_to(pos[None], sims.shape)
    if cfg.family == "infonce":  # the log-sum-exp over "all" includes the positives
        if out[0] is not None and out[1] is not None:
            out[0] = out[0] | out[1]
        if out[2] is not None and out[3] is not None:
            out[2] = out[2] | out[3]
    return out


def _tile_count(cfg, local, block, anchor, key):
    n_rows = local[anchor].shape[0] // cfg.tile
    n_keys = block[key].shape[0] // cfg.tile
    return n_rows, n_keys


# ------------------------------------------------------------ online statistics


def _expand(x, axis):
    return x[:, :, None] if axis == 2 else x[:, None, :]


def _lse_fold(m, l, logits, mask, axis):
    """Fold a tile into running (max, sum-exp) along ``axis`` over ``mask``: the tile's own pair,
    merged as the Pallas tiles merge theirs (one online log-sum-exp for both implementations)."""
    tile_m, tile_l = tiles.lse_partial(logits, mask, axis)
    return tiles.merge_lse(m, l, tile_m.squeeze(axis), tile_l.squeeze(axis))


def _lse_finish(m, l):
    """log-sum-exp from (max, sum); rows with nothing in them (padding) give 0."""
    return jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), 0.0)


def _stats_slice(stats, start, size):
    return jax.tree.map(lambda x: lax.dynamic_slice_in_dim(x, start, size, axis=1), stats)


def _stats_put(stats, part, start):
    return jax.tree.map(lambda x, y: lax.dynamic_update_slice_in_dim(x, y, start, axis=1), stats, part)


def _fold_tile(cfg, stats, logits, all_mask, pos_mask, axis):
    if cfg.family == "infonce":
        m_all, l_all = _lse_fold(stats["m_all"], stats["l_all"], logits, all_mask, axis)
        out = dict(m_all=m_all, l_all=l_all, m_pos=stats["m_pos"], l_pos=stats["l_pos"])
        if pos_mask is not None:
            out["m_pos"], out["l_pos"] = _lse_fold(stats["m_pos"], stats["l_pos"], logits, pos_mask, axis)
        return out
    positive = jnp.zeros(logits.shape, bool) if pos_mask is None else pos_mask
    valid = all_mask if pos_mask is None else all_mask | pos_mask
    return dict(sum=stats["sum"] + tiles.sigmoid_losses(logits, positive, valid).sum(axis))


def _tile_cotangent(cfg, saved, logits, all_mask, pos_mask, axis):
    if cfg.family == "infonce":
        cot = tiles.softmax_weight(logits, all_mask, _expand(saved["lse_all"], axis), _expand(saved["g_all"], axis))
        if pos_mask is not None:
            cot = cot + tiles.softmax_weight(logits, pos_mask, _expand(saved["lse_pos"], axis),
                                             _expand(saved["g_pos"], axis))
        return cot
    positive = jnp.zeros(logits.shape, bool) if pos_mask is None else pos_mask
    valid = all_mask if pos_mask is None else all_mask | pos_mask
    return tiles.sigmoid_weight(logits, positive, valid, _expand(saved["g_sum"], axis))


def _empty_stats(cfg, m, size):
    if cfg.family == "infonce":
        neg = jnp.full((m, size), tiles.NEG_INF, jnp.float32)
        zero = jnp.zeros((m, size), jnp.float32)
        return dict(m_all=neg, l_all=zero, m_pos=neg, l_pos=zero)
    return dict(sum=jnp.zeros((m, size), jnp.float32))


def _finish_stats(cfg, stats):
    if cfg.family == "infonce":
        return dict(lse_all=_lse_finish(stats["m_all"], stats["l_all"]),
                    lse_pos=_lse_finish(stats["m_pos"], stats["l_pos"]))
    return dict(sum=stats["sum"])


# ------------------------------------------------------------------- tile passes


def _forward_pass(cfg, local, block, row_stats, col_stats):
    """Fold every tile of (local rows) x (visiting block) into the statistics."""
    if cfg.impl == "pallas":
        return _pallas_forward_pass(cfg, local, block, row_stats, col_stats)
    for kind, anchor, key, do_rows, do_cols in cfg.pairs():
        n_rows, n_keys = _tile_count(cfg, local, block, anchor, key)

        def tile(i, carry, kind=kind, anchor=anchor, key=key, do_rows=do_rows, do_cols=do_cols, n_keys=n_keys):
            row_stats, col_stats = carry
            r0, c0 = (i // n_keys) * cfg.tile, (i % n_keys) * cfg.tile
            rows, keys = _side_slice(cfg, local, anchor, r0), _side_slice(cfg, block, key, c0)
            logits, sims = _score_fn(cfg, rows, keys, anchor, key)(
                rows[anchor], keys[key], rows["r" + anchor], keys["r" + key], local["scale"], local["shift"])
            guide = _guide_sims(rows["g" + anchor], keys["g" + key]) if cfg.guided else None
            all_r, pos_r, all_c, pos_c = _tile_masks(cfg, kind, rows, keys, sims, guide, do_rows, do_cols)
            if do_rows:
                part = _fold_tile(cfg, _stats_slice(row_stats, r0, cfg.tile), logits, all_r, pos_r, axis=2)
                row_stats = _stats_put(row_stats, part, r0)
            if do_cols:
                part = _fold_tile(cfg, _stats_slice(col_stats, c0, cfg.tile), logits, all_c, pos_c, axis=1)
                col_stats = _stats_put(col_stats, part, c0)
            return row_stats, col_stats

        row_stats, col_stats = lax.fori_loop(0, n_rows * n_keys, tile, (row_stats, col_stats))
    return row_stats, col_stats


def _backward_pass(cfg, local, block, local_grads, block_grads):
    """Recompute every tile, form its score cotangent and pull it back to both sides."""
    if cfg.impl == "pallas":
        return _pallas_backward_pass(cfg, local, block, local_grads, block_grads)
    for kind, anchor, key, do_rows, do_cols in cfg.pairs():
        n_rows, n_keys = _tile_count(cfg, local, block, anchor, key)

        def tile(i, carry, kind=kind, anchor=anchor, key=key, do_rows=do_rows, do_cols=do_cols, n_keys=n_keys):
            local_grads, block_grads = carry
            r0, c0 = (i // n_keys) * cfg.tile, (i % n_keys) * cfg.tile
            rows, keys = _side_slice(cfg, local, anchor, r0), _side_slice(cfg, block, key, c0)
            score = _score_fn(cfg, rows, keys, anchor, key)
            (logits, sims), pullback = jax.vjp(
                score, rows[anchor], keys[key], rows["r" + anchor], keys["r" + key], local["scale"], local["shift"])
            guide = _guide_sims(rows["g" + anchor], keys["g" + key]) if cfg.guided else None
            all_r, pos_r, all_c, pos_c = _tile_masks(cfg, kind, rows, keys, sims, guide, do_rows, do_cols)
            cot = jnp.zeros(logits.shape, jnp.float32)
            if do_rows:
                saved = _stats_slice(local["row_saved"], r0, cfg.tile)
                cot = cot + _tile_cotangent(cfg, saved, logits, all_r, pos_r, axis=2)
            if do_cols:
                saved = _stats_slice(block["col_saved"], c0, cfg.tile)
                cot = cot + _tile_cotangent(cfg, saved, logits, all_c, pos_c, axis=1)
            d_a, d_k, d_ra, d_rk, d_scale, d_shift = pullback((cot, jnp.zeros_like(sims)))

            def add(grads, name, start, value, axis):
                cur = lax.dynamic_slice_in_dim(grads[name], start, cfg.tile, axis=axis)
                return {**grads, name: lax.dynamic_update_slice_in_dim(grads[name], cur + value, start, axis=axis)}

            local_grads = add(local_grads, anchor, r0, d_a.astype(jnp.float32), 0)
            local_grads = add(local_grads, "r" + anchor, r0, d_ra, 1)
            local_grads = {**local_grads, "scale": local_grads["scale"] + d_scale,
                           "shift": local_grads["shift"] + d_shift}
            block_grads = add(block_grads, key, c0, d_k.astype(jnp.float32), 0)
            block_grads = add(block_grads, "r" + key, c0, d_rk, 1)
            return local_grads, block_grads

        local_grads, block_grads = lax.fori_loop(0, n_rows * n_keys, tile, (local_grads, block_grads))
    return local_grads, block_grads


# ------------------------------------------------- fused passes (Pallas, `tiles`)


def _pallas_sides(local, block, anchor, key):
    """(anchor, inverse norms, metadata) of the local rows and of the visiting keys for one tile family."""
    row_meta = (local["group"], local["doc"], local["valid"])
    if key == "h":  # a hard negative's id plays the document id; it has no group
        key_meta = (block["hnid"], block["hnid"], block["hvalid"])
    else:
        key_meta = (block["group"], block["doc"], block["valid"])
    return (local[anchor], local["r" + anchor][0], row_meta), (block[key], block["r" + key][0], key_meta)


def _merge_stats(stats, part):
    """Fold a pass's statistics into the running [1, n] ones: (max, sum-exp) pairs, or summed losses."""
    out = dict(stats)
    if "sum" in part:
        out["sum"] = stats["sum"] + part["sum"][None]
    for which in ("all", "pos"):
        if "m_" + which in part:
            m, l = tiles.merge_lse(stats["m_" + which][0], stats["l_" + which][0], part["m_" + which],
                                   part["l_" + which])
            out["m_" + which], out["l_" + which] = m[None], l[None]
    return out


def _pallas_forward_pass(cfg, local, block, row_stats, col_stats):
    """`_forward_pass` with one fused kernel launch per tile family (single prefix)."""
    for kind, anchor, key, do_rows, do_cols in cfg.pairs():
        (a, ra, row_meta), (k, rk, key_meta) = _pallas_sides(local, block, anchor, key)
        rows, cols = tiles.tile_statistics(a, k, ra, rk, row_meta, key_meta, local["scale"], local["shift"],
                                           family=cfg.family, kind=kind, do_rows=do_rows, do_cols=do_cols,
                                           block=cfg.tile, interpret=cfg.interpret)
        if do_rows:
            row_stats = _merge_stats(row_stats, rows)
        if do_cols:
            col_stats = _merge_stats(col_stats, cols)
    return row_stats, col_stats


def _pallas_backward_pass(cfg, local, block, local_grads, block_grads):
    """`_backward_pass` with the fused gradient kernels: anchor-side and key-side launches per family."""
    first = lambda saved: {name: value[0] for name, value in saved.items()}  # noqa: E731  [1, n] -> [n]
    for kind, anchor, key, do_rows, do_cols in cfg.pairs():
        (a, ra, row_meta), (k, rk, key_meta) = _pallas_sides(local, block, anchor, key)
        rows_saved = first(local["row_saved"]) if do_rows else None
        keys_saved = first(block["col_saved"]) if do_cols else None
        grads = tiles.tile_gradients(a, k, ra, rk, row_meta, key_meta, local["scale"], local["shift"], rows_saved,
                                     keys_saved, family=cfg.family, kind=kind, do_rows=do_rows, do_cols=do_cols,
                                     block=cfg.tile, interpret=cfg.interpret)
        local_grads = {**local_grads, anchor: local_grads[anchor] + grads["a"],
                       "r" + anchor: local_grads["r" + anchor] + grads["ra"][None],
                       "scale": local_grads["scale"] + grads["scale"], "shift": local_grads["shift"] + grads["shift"]}
        block_grads = {**block_grads, key: block_grads[key] + grads["k"],
                       "r" + key: block_grads["r" + key] + grads["rk"][None]}
    return local_grads, block_grads


def _ring(cfg, static, travelling, carry, step):
    """Run ``step(static_block, travelling, carry)`` once per device on the ring.

    The static part of the visiting block (embeddings, ids) is sent on *before* the
    step computes on it, so the transfer overlaps the tile compute; the travelling
    part (column statistics or key gradients) is updated by the step and sent after.
    After the last step the travelling part is one hop from its owner and makes that hop.
    """
    perm = [(i, (i + 1) % cfg.n) for i in range(cfg.n)]

    def body(_, state):
        static, travelling, carry = state
        upcoming = lax.ppermute(static, cfg.axis, perm)
        travelling, carry = step(static, travelling, carry)
        return upcoming, lax.ppermute(travelling, cfg.axis, perm), carry

    static, travelling, carry = lax.fori_loop(0, cfg.n - 1, body, (static, travelling, carry))
    travelling, carry = step(static, travelling, carry)
    return lax.ppermute(travelling, cfg.axis, perm), carry


# ----------------------------------------------------------------- custom_vjp core


_KEY_FIELDS = ("d", "rd", "group", "doc", "valid", "diag")


def _pair_diag(cfg, x, y, rx, ry, x_mask=None, y_mask=None):
    """Per-prefix similarity of each row with its pair partner, [M, n] (no gradient needed:
    it only feeds the margin filter's masks)."""
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    if cfg.maxsim:
        return jnp.stack([maxsim_paired(x[..., :dim], x_mask, y[..., :dim], y_mask) for dim in cfg.dims]) * rx * ry
    cumulative = jnp.cumsum(jnp.stack([jnp.sum(x[:, lo:hi] * y[:, lo:hi], axis=1) for lo, hi in cfg.chunks]), 0)
    return cumulative * rx * ry


def _local_and_block(cfg, diff, meta):
    local = {**diff, **meta}
    local["diag"] = _pair_diag(cfg, diff["q"], diff["d"], diff["rq"], diff["rd"], meta.get("mq"), meta.get("md"))
    if cfg.guided:
        local["gdiag"] = jnp.sum(meta["gq"].astype(jnp.float32) * meta["gd"].astype(jnp.float32), axis=1)
    names = list(_KEY_FIELDS) + (["gd", "gdiag"] if cfg.guided else []) + (["md"] if cfg.maxsim else [])
    if cfg.has_h:
        names += ["h", "rh", "hnid", "hvalid"] + (["gh"] if cfg.guided else []) + (["mh"] if cfg.maxsim else [])
    if cfg.same_side:
        names += ["q", "rq"] + (["gq"] if cfg.guided else []) + (["mq"] if cfg.maxsim else [])
    return local, {name: local[name] for name in names}


def _core_forward(cfg, diff, meta):
    local, block = _local_and_block(cfg, diff, meta)
    m, rows = len(cfg.dims), diff["q"].shape[0]
    row_stats = _empty_stats(cfg, m, rows)
    col_stats = _empty_stats(cfg, m, rows) if cfg.bidirectional else {}

    def step(static, col_stats, row_stats):
        row_stats, col_stats = _forward_pass(cfg, local, static, row_stats, col_stats)
        return col_stats, row_stats

    col_stats, row_stats = _ring(cfg, block, col_stats, row_stats, step)
    out = {"rows": _finish_stats(cfg, row_stats)}
    if cfg.bidirectional:
        out["cols"] = _finish_stats(cfg, col_stats)
    return out


def _zero_cotangent(x):
    if jnp.issubdtype(x.dtype, jnp.floating):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)


def _saved_with_cotangent(cfg, stats, cot):
    if cfg.family == "infonce":
        return dict(lse_all=stats["lse_all"], lse_pos=stats["lse_pos"], g_all=cot["lse_all"], g_pos=cot["lse_pos"])
    return dict(g_sum=cot["sum"])


def _make_core(cfg):
    @jax.custom_vjp
    def core(diff, meta):
        return _core_forward(cfg, diff, meta)

    def fwd(diff, meta):
        out = _core_forward(cfg, diff, meta)
        return out, (diff, meta, out)

    def bwd(res, cot):
        diff, meta, out = res
        local, block = _local_and_block(cfg, diff, meta)
        local["row_saved"] = _saved_with_cotangent(cfg, out["rows"], cot["rows"])
        if cfg.bidirectional:
            block["col_saved"] = _saved_with_cotangent(cfg, out["cols"], cot["cols"])
        f32 = functools.partial(jnp.zeros_like, dtype=jnp.float32)
        local_grads = {name: f32(diff[name]) for name in ("q", "d", "rq", "rd", "scale", "shift")}
        key_names = ["d", "rd"] + (["h", "rh"] if cfg.has_h else []) + (["q", "rq"] if cfg.same_side else [])
        block_grads = {name: f32(diff[name]) for name in key_names}

        def step(static, block_grads, local_grads):
            local_grads, block_grads = _backward_pass(cfg, local, static, local_grads, block_grads)
            return block_grads, local_grads

        block_grads, local_grads = _ring(cfg, block, block_grads, local_grads, step)
        grads = dict(local_grads)
        for name, value in block_grads.items():
            grads[name] = grads.get(name, 0.0) + value
        # scale/shift enter replicated (in_specs P()); shard_map's transpose sums the
        # per-device cotangents over the ring, so each device returns only its own part.
        d_diff = {name: grads[name].astype(diff[name].dtype) for name in diff}
        return d_diff, jax.tree.map(_zero_cotangent, meta)

    core.defvjp(fwd, bwd)
    return core


# ------------------------------------------------------------------- per device


def _pad_rows(x, rows):
    pad = rows - x.shape[0]
    return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) if pad else x


def _inverse_norms(cfg, x_nd, similarity):
    if similarity in ("dot", "maxsim"):  # MaxSim tokens come normalised from their head
        return jnp.ones((len(cfg.dims), x_nd.shape[0]), jnp.float32)
    return jnp.stack([dense.inverse_norm(x_nd[:, :dim]) for dim in cfg.dims])


def _device_loss(cfg, similarity, weights, focal_gamma, global_batch, x):
    """Per-device body inside shard_map: pad to whole tiles, run the core, reduce to the loss."""
    local_b = x["q"].shape[0]
    rows = math.ceil(local_b / cfg.tile) * cfg.tile
    q, d = _pad_rows(x["q"], rows), _pad_rows(x["d"], rows)
    diff = dict(q=q, d=d, rq=_inverse_norms(cfg, q, similarity), rd=_inverse_norms(cfg, d, similarity),
                scale=x["scale"], shift=x["shift"])
    meta = dict(group=_pad_rows(x["group"], rows), doc=_pad_rows(x["doc"], rows),
                valid=jnp.arange(rows) < local_b)
    if cfg.guided:
        meta["gq"], meta["gd"] = _pad_rows(x["gq"], rows), _pad_rows(x["gd"], rows)
    if cfg.maxsim:  # padded rows get no real token
        meta["mq"], meta["md"] = _pad_rows(x["mq"], rows), _pad_rows(x["md"], rows)
    if cfg.has_h:
        h = x["h"].reshape((-1,) + x["h"].shape[2:])
        h_rows = math.ceil(h.shape[0] / cfg.tile) * cfg.tile
        diff["h"] = _pad_rows(h, h_rows)
        diff["rh"] = _inverse_norms(cfg, diff["h"], similarity)
        meta["hnid"] = _pad_rows(x["hnid"].reshape(-1), h_rows)
        meta["hvalid"] = jnp.arange(h_rows) < h.shape[0]
        if cfg.maxsim:
            meta["mh"] = _pad_rows(x["mh"].reshape((-1,) + x["mh"].shape[2:]), h_rows)
        if cfg.guided:
            meta["gh"] = _pad_rows(x["gh"].reshape(-1, x["gh"].shape[-1]), h_rows)
    out = _make_core(cfg)(diff, meta)
    valid = meta["valid"]
    weights = jnp.asarray(weights, jnp.float32)

    def direction_loss(stats):
        if cfg.family == "infonce":
            ce = dense.focal_weighted(stats["lse_all"] - stats["lse_pos"], focal_gamma)
        else:
            ce = stats["sum"]
        per_prefix = jnp.sum(jnp.where(valid[None], ce, 0.0), axis=1)
        return jnp.sum(weights * lax.psum(per_prefix, cfg.axis)) / global_batch

    loss = direction_loss(out["rows"])
    if cfg.bidirectional:
        loss = 0.5 * (loss + direction_loss(out["cols"]))
    return loss


# ------------------------------------------------------------------- public API


def _check_mesh(mesh, axis, global_batch):
    if not isinstance(mesh, (jax.sharding.Mesh, jax.sharding.AbstractMesh)):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (e.g. from jax.make_mesh), got {type(mesh).__name__}")
    if axis not in mesh.axis_names:
        raise ValueError(f"axis {axis!r} is not a mesh axis; the mesh has axes {mesh.axis_names}")
    n = mesh.shape[axis]
    if global_batch % n:
        raise ValueError(
            f"global batch {global_batch} is not divisible by the {n} devices of mesh axis {axis!r}; "
            f"use a batch size that is a multiple of {n} (e.g. {global_batch - global_batch % n or n})"
        )
    return n


MAXSIM_TILE_FLOATS = 2**24  # token products per MaxSim tile (t * t * Lq * Ld) the default tile aims at


def _token_pairs(batch) -> int:
    """Token products per (anchor, key) pair of a MaxSim loss (1 for single vectors)."""
    if batch.q_mask is None:
        return 1
    lengths = [batch.q_bd.shape[1], batch.d_bd.shape[1]] + ([batch.h_bkd.shape[2]] if batch.h_bkd is not None else [])
    return max(lengths) ** 2


def _check_tile(tile, local_batch, token_pairs: int = 1):
    if tile is None:
        return max(1, min(default_tile(), local_batch, math.isqrt(MAXSIM_TILE_FLOATS // token_pairs)))
    return val.check_positive_int("tile", tile, "rows/keys per tile")


TILE_IMPLS = ("xla", "pallas")


def _with_tile_impl(cfg, impl, tile, local_batch):
    """``cfg`` with its tile implementation; the fused Pallas tiles take single vectors with one
    prefix and no similarity filter, in blocks of a power of two >= 16 rows (Triton's dot sizes)."""
    if impl not in TILE_IMPLS:
        raise ValueError(f"impl must be one of {TILE_IMPLS}; got {impl!r}")
    if impl == "xla":
        return cfg
    unsupported = [name for name, on in (("several matryoshka_dims", len(cfg.dims) > 1),
                                         ("similarity='maxsim'", cfg.maxsim), ("guide embeddings", cfg.guided),
                                         ("margin", cfg.margin is not None)) if on]
    if unsupported:
        raise ValueError(f"impl='pallas' fuses single-prefix tiles without filters; "
                         f"{', '.join(unsupported)} need impl='xla'")
    if tile is None:
        tile = min(tiles.DEFAULT_BLOCK, max(tiles.MIN_BLOCK, next_pow2(local_batch)))
    elif tile < tiles.MIN_BLOCK or tile & (tile - 1):
        raise ValueError(f"impl='pallas' needs tile to be a power of two >= {tiles.MIN_BLOCK} "
                         f"(Triton's dot sizes); got {tile}")
    return dataclasses.replace(cfg, tile=tile, impl="pallas", interpret=resolve_impl("pallas")[1])


def _context_mesh(mesh):
    """The mesh to run the shard_map on.

    Inside ``with jax.set_mesh(mesh):`` the given mesh is used as is. Outside any mesh
    context, Explicit axes would make the sharding part of the result's type, and eager
    autodiff then mixes mesh-typed cotangents with single-device values (an error in
    current JAX); the same devices with Auto axes give identical numbers without that.
    """
    if not jax.sharding.get_abstract_mesh().empty:
        return mesh
    auto = (jax.sharding.AxisType.Auto,) * len(mesh.axis_names)
    return jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=auto)


def _place(x, specs, mesh):
    """Lay the inputs out as the shard_map expects: with Explicit mesh axes the sharding is
    part of an array's type and must match ``in_specs`` exactly, so reshard; with Auto axes
    a sharding constraint (inside jit) or device_put (eagerly) does the same."""
    shardings = {name: jax.sharding.NamedSharding(mesh, spec) for name, spec in specs.items()}
    explicit = any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
    if explicit:
        return jax.reshard(x, shardings)
    if any(isinstance(v, jax.core.Tracer) for v in x.values()):
        return jax.lax.with_sharding_constraint(x, shardings)
    return jax.device_put(x, shardings)


def _run(cfg, mesh, batch, similarity, weights, focal_gamma, scale, shift):
    x = dict(q=batch.q_bd, d=batch.d_bd, group=batch.group_b, doc=batch.doc_b)
    if batch.h_bkd is not None:
        x["h"], x["hnid"] = batch.h_bkd, batch.hnid_bk
    if cfg.maxsim:
        x["mq"], x["md"] = batch.q_mask, batch.d_mask
        if batch.h_bkd is not None:
            x["mh"] = batch.h_mask
    if batch.guide_q_bg is not None:
        x["gq"], x["gd"] = batch.guide_q_bg, batch.guide_d_bg
        if batch.guide_h_bkg is not None:
            x["gh"] = batch.guide_h_bkg
    specs = {name: P(cfg.axis) for name in x}
    x["scale"], x["shift"] = jnp.asarray(scale, jnp.float32), jnp.asarray(shift, jnp.float32)
    specs["scale"] = specs["shift"] = P()
    mesh = _context_mesh(mesh)
    x = _place(x, specs, mesh)
    body = functools.partial(_device_loss, cfg, similarity, weights, focal_gamma, batch.q_bd.shape[0])
    return jax.shard_map(body, mesh=mesh, in_specs=(specs,), out_specs=P(), check_vma=False)(x)


def ring_infonce(q_bd, d_bd, *, mesh, axis: str = "data", temperature, hard_negatives_bkd=None, tile=None,
                 group_ids_b=None, doc_ids_b=None, hard_negative_ids_bk=None, bidirectional: bool = False,
                 same_side: bool = False, margin: float | None = None, guide_q_bg=None, guide_d_bg=None,
                 guide_hard_negatives_bkg=None, guide_margin: float = 0.0, focal_gamma: float = 0.0,
                 similarity: str = "dot", matryoshka_dims=None, matryoshka_weights=None, q_mask_bl=None,
                 d_mask_bl=None, hard_negatives_mask_bkl=None, impl: str = "xla"):
    """InfoNCE over the global batch sharded on mesh axis ``axis``, exact and memory-tiled.

    Same options, value and gradients as `embedjax.losses.contrastive.infonce`.
    q_bd, d_bd: [B, D]; hard_negatives_bkd: [B, K, D] (B divisible by the axis size); with
    ``similarity="maxsim"`` token vectors [B, L, D] / [B, K, L, D] with their masks, each tile
    scoring MaxSim.
    ``tile``: rows and keys per tile (default min(1024, B / n), 4096 for 1024 on a GPU; smaller for
    MaxSim so a tile's token products stay near 2**24 floats); any positive size works (the local
    batch is padded to whole tiles with masked rows).
    Per-device memory is O(B/n * D + M * tile^2) and no [B, B] array exists.
    ``impl``: "xla" (default) loops over tiles in XLA; "pallas" runs each pass's tiles in fused
    kernels (`embedjax.kernels.ring_tiles`: one prefix, no margin, guide or MaxSim; ``tile`` is
    the kernel block, default min(64, B / n), a power of two >= 16; interpret mode on CPU; with
    ``bidirectional`` its per-key partials add [264, B / n] floats per statistic). Not the
    default until a GPU has timed it against the XLA tiles.
    """
    val.check_similarity(similarity)
    batch = dense.prepare_pairs(q_bd, d_bd, hard_negatives_bkd, group_ids_b, doc_ids_b, hard_negative_ids_bk,
                                guide_q_bg, guide_d_bg, guide_hard_negatives_bkg, matryoshka_dims,
                                matryoshka_weights, similarity, q_mask_bl, d_mask_bl, hard_negatives_mask_bkl)
    temperature = val.check_positive_scalar("temperature", temperature)
    if focal_gamma < 0:
        raise ValueError(f"focal_gamma must be >= 0, got {focal_gamma}")
    n = _check_mesh(mesh, axis, batch.q_bd.shape[0])
    cfg = _Config("infonce", axis, n, _check_tile(tile, batch.q_bd.shape[0] // n, _token_pairs(batch)), batch.dims,
                  batch.h_bkd is not None, batch.guide_q_bg is not None, bool(bidirectional), bool(same_side),
                  None if margin is None else float(margin), float(guide_margin), similarity == "maxsim")
    cfg = _with_tile_impl(cfg, impl, tile, batch.q_bd.shape[0] // n)
    return _run(cfg, mesh, batch, similarity, batch.weights, float(focal_gamma), 1.0 / temperature, 0.0)


def ring_siglip(q_bd, d_bd, *, mesh, axis: str = "data", temperature, bias, hard_negatives_bkd=None, tile=None,
                group_ids_b=None, doc_ids_b=None, hard_negative_ids_bk=None, similarity: str = "dot",
                matryoshka_dims=None, matryoshka_weights=None, impl: str = "xla"):
    """SigLIP sigmoid loss over the global batch sharded on ``axis``, exact and memory-tiled.

    Same options, value and gradients (including ``bias``) as
    `embedjax.losses.contrastive.siglip`; see `ring_infonce` for ``mesh``/``tile``/``impl``.
    """
    val.check_similarity(similarity, ("dot", "cos"))
    batch = dense.prepare_pairs(q_bd, d_bd, hard_negatives_bkd, group_ids_b, doc_ids_b, hard_negative_ids_bk,
                                matryoshka_dims=matryoshka_dims, matryoshka_weights=matryoshka_weights)
    temperature = val.check_positive_scalar("temperature", temperature)
    if jnp.ndim(bias) != 0:
        raise ValueError(f"bias must be a scalar, got shape {jnp.shape(bias)}")
    n = _check_mesh(mesh, axis, batch.q_bd.shape[0])
    cfg = _Config("siglip", axis, n, _check_tile(tile, batch.q_bd.shape[0] // n), batch.dims,
                  batch.h_bkd is not None, False, False, False, None, 0.0)
    cfg = _with_tile_impl(cfg, impl, tile, batch.q_bd.shape[0] // n)
    return _run(cfg, mesh, batch, similarity, batch.weights, 0.0, 1.0 / temperature, bias)

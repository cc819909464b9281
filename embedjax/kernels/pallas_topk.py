"""Pallas skeleton shared by the top-k kernels: score a tile, keep a running top-k.

Grid ``(query blocks, corpus splits)``; every program owns ``block_q`` queries and
one contiguous split of the corpus, walks the split in tiles of ``block_n``
columns (``fori_loop``), scores each tile with the kernel-specific
``tile_score`` and folds it into an unsorted running top-``kp`` list:
repeatedly take the tile's best entry per row and let it replace the row's
worst kept entry while it is better (a ``while_loop`` that stops as soon as no
row improves, so late tiles cost a few passes). Programs write partial lists
[splits, Q, kp]; the caller merges them with one exact sort (score desc, id asc).

Backend constraints followed so the kernel lowers to Triton on GPU: every
loaded tile has a power-of-two number of elements (queries, tile widths and
operand row counts are padded to powers of two), values are never sliced in
registers (tiles are loaded from refs with ``pl.ds``), reductions are
max/min over int32/float32, integer dots take signed operands, and programs
never share an output block (no cross-program accumulation).
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

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
):
    """Top-k (scores float32 [Q, k], ids int32 [Q, k]) with the Pallas running-top-k kernel.

    q_ops: arrays [Q, c_i] (row i = query i); x_ops: corpus operands stored
    corpus-axis-last, [r_i, N]. ``tile_score(q_refs, x_refs, col_offset, block_n)``
    returns float32 scores [block_q, block_n] for corpus columns
    ``col_offset .. col_offset + block_n`` of the current split.
    """
    q = q_ops[0].shape[0]
    n = x_ops[0].shape[1]
    kp = next_pow2(k)
    qp = -(-q // block_q) * block_q
    per_split, splits = split_layout(n, block_n, target_splits)
    split_len = per_split * block_n
    np_ = splits * split_len
    q_ops = [pad_axis(a, 0, qp) for a in q_ops]
    x_ops = [pad_axis(a, 1, np_) for a in x_ops]
    n_valid_arr = jnp.reshape(jnp.asarray(n_valid, jnp.int32), (1,))

    def kernel(nv_ref, *refs):
        q_refs = refs[: len(q_ops)]
        x_refs = refs[len(q_ops) : len(q_ops) + len(x_ops)]
        out_s_ref, out_i_ref = refs[-2:]
        split = pl.program_id(1)
        limit = nv_ref[0]
        col = lax.broadcasted_iota(jnp.int32, (block_q, block_n), 1)
        slot = lax.broadcasted_iota(jnp.int32, (block_q, kp), 1)
        init = (jnp.full((block_q, kp), -jnp.inf, jnp.float32), INT_MAX - slot)

        def tile_step(j, best):
            offset = pl.multiple_of(j * block_n, block_n)
            tile = tile_score(q_refs, x_refs, offset, block_n)
            gid = split * split_len + offset + col
            tile = jnp.where(gid < limit, tile, -jnp.inf)

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

        bs, bi = lax.fori_loop(0, per_split, tile_step, init)
        out_s_ref[...] = bs
        out_i_ref[...] = bi

    in_specs = [pl.BlockSpec((1,), lambda i, s: (0,))]
    in_specs += [pl.BlockSpec((block_q, a.shape[1]), lambda i, s: (i, 0)) for a in q_ops]
    in_specs += [pl.BlockSpec((a.shape[0], split_len), lambda i, s: (0, s)) for a in x_ops]
    out_spec = pl.BlockSpec((pl.squeezed, block_q, kp), lambda i, s: (s, i, 0))
    scores, ids = pl.pallas_call(
        kernel,
        grid=(qp // block_q, splits),
        in_specs=in_specs,
        out_specs=[out_spec, out_spec],
        out_shape=[
            jax.ShapeDtypeStruct((splits, qp, kp), jnp.float32),
            jax.ShapeDtypeStruct((splits, qp, kp), jnp.int32),
        ],
        interpret=interpret,
        name="running_topk",
    )(n_valid_arr, *q_ops, *x_ops)
    scores = jnp.transpose(scores, (1, 0, 2)).reshape(qp, splits * kp)[:q]
    ids = jnp.transpose(ids, (1, 0, 2)).reshape(qp, splits * kp)[:q]
    neg, ids = lax.sort((-scores, ids), dimension=1, num_keys=2)
    return -neg[:, :k], ids[:, :k]

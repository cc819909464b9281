"""MUVERA fixed-dimensional encodings (Dhulipala et al. 2024): one vector per token set whose
inner product approximates Chamfer (MaxSim) similarity.

Semantics follow google/graph-mining's ``fixed_dimensional_encoding.cc`` (the authors'
reference), batched and jitted here:

* Each of ``reps`` repetitions draws ``k_sim`` Gaussian hyperplanes. A token's partition is
  built from its sign bits, projection 0 first, as a Gray code:
  ``g = (g << 1) + (bit ^ (g & 1))``. The bits of partition ``p`` are therefore
  ``p ^ (p >> 1)`` (projection 0 is the most significant bit).
* Tokens are projected to ``d_proj`` dims by a CountSketch (each input dim goes to one random
  output dim with a random sign), or kept as they are when ``d_proj`` is None.
* Queries sum their projected tokens per partition; documents average them. An empty
  document partition takes the projected token whose sign bits are nearest (Hamming) to the
  partition's bits, ties to the lowest token index (the reference's strict ``<`` scan).
  Queries are never filled (the reference rejects filling queries).
* Output layout: repetition-major, then partition, then projected dim:
  ``[B, reps * 2**k_sim * d_proj]``; an optional final CountSketch maps it to ``final_dim``.

The random matrices come from ``jax.random`` keyed by ``seed`` and the repetition index, so
queries and documents encoded with the same arguments share partitions and projections (the
reference's own numbers come from C++ ``std::mt19937`` and are not reproduced bit for bit).

The FDE inner product sums one Chamfer estimate per repetition: compare ``fde_q @ fde_d / reps``
with Chamfer, never the raw score.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

MAX_K_SIM = 30  # the reference rejects >= 31 projections (partition ids are 32-bit)
KINDS = ("query", "document")
FINAL_STREAM = 2**31 - 1  # random stream of the final projection (repetitions use 0..reps-1)


def fde_dim(dim: int, *, reps: int, k_sim: int, d_proj: int | None = None, final_dim: int | None = None) -> int:
    """Width of the encoding ``fde`` returns for token vectors of ``dim`` dims."""
    if final_dim is not None:
        return int(final_dim)
    return int(reps) * (2 ** int(k_sim)) * int(dim if d_proj is None else d_proj)


def _check_args(tokens_bld, mask_bl, kind, reps, k_sim, d_proj, final_dim):
    if getattr(tokens_bld, "ndim", None) != 3:
        raise ValueError(f"tokens_bld must be [batch, tokens, dim]; got shape {getattr(tokens_bld, 'shape', None)}")
    if getattr(mask_bl, "shape", None) is None or tuple(mask_bl.shape) != tuple(tokens_bld.shape[:2]):
        raise ValueError(f"mask_bl must have shape {tuple(tokens_bld.shape[:2])} (batch, tokens) to match tokens_bld "
                         f"{tuple(tokens_bld.shape)}; got {getattr(mask_bl, 'shape', None)}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if int(reps) < 1:
        raise ValueError(f"reps={reps} must be at least 1")
    if not 0 <= int(k_sim) <= MAX_K_SIM:
        raise ValueError(f"k_sim={k_sim} must lie in [0, {MAX_K_SIM}] (2**k_sim partitions per repetition)")
    if d_proj is not None and int(d_proj) < 1:
        raise ValueError(f"d_proj={d_proj} must be a positive int, or None for no inner projection")
    if final_dim is not None and int(final_dim) < 1:
        raise ValueError(f"final_dim={final_dim} must be a positive int, or None for no final projection")


def count_sketch_matrix(key, dim_in: int, dim_out: int):
    """float32 [dim_in, dim_out]: each row has one +-1 at a uniformly random column."""
    col_key, sign_key = jax.random.split(key)
    cols = jax.random.randint(col_key, (dim_in,), 0, dim_out)
    signs = jnp.where(jax.random.bernoulli(sign_key, 0.5, (dim_in,)), 1.0, -1.0)
    return jax.nn.one_hot(cols, dim_out, dtype=jnp.float32) * signs[:, None]


def gray_partition(bits_blk):
    """Partition ids int32 [B, L] from sign bits bool [B, L, k] (projection 0 first)."""
    g = jnp.zeros(bits_blk.shape[:2], jnp.int32)
    for j in range(bits_blk.shape[2]):
        g = (g << 1) + (bits_blk[..., j].astype(jnp.int32) ^ (g & 1))
    return g


def partition_bits(k_sim: int):
    """bool [2**k_sim, k_sim]: the sign bits each partition id stands for (``p ^ (p >> 1)``,
    projection 0 the most significant bit)."""
    p = np.arange(2 ** k_sim, dtype=np.int64)
    binary = p ^ (p >> 1)
    shifts = np.arange(k_sim - 1, -1, -1)
    return jnp.asarray((binary[:, None] >> shifts[None, :]) & 1, dtype=bool)


def repetition_matrices(seed: int, rep: int, dim: int, k_sim: int, d_proj: int | None):
    """(hyperplanes float32 [dim, k_sim], inner projection [dim, d_proj] or None) of repetition ``rep``."""
    hyper_key, proj_key = jax.random.split(jax.random.fold_in(jax.random.key(seed), rep))
    hyperplanes = jax.random.normal(hyper_key, (dim, k_sim), jnp.float32)
    return hyperplanes, None if d_proj is None else count_sketch_matrix(proj_key, dim, d_proj)


def final_projection(seed: int, width: int, final_dim: int):
    """(column int32 [width], sign float32 [width]) of the final CountSketch."""
    col_key, sign_key = jax.random.split(jax.random.fold_in(jax.random.key(seed), FINAL_STREAM))
    cols = jax.random.randint(col_key, (width,), 0, final_dim)
    return cols, jnp.where(jax.random.bernoulli(sign_key, 0.5, (width,)), 1.0, -1.0)


def _one_repetition(tokens_bld, mask_bl, hyperplanes_dk, projection_dp, *, document, k_sim, d_proj, fill_empty):
    """[B, 2**k_sim, d_proj] block of one repetition (its random matrices given)."""
    x = tokens_bld.astype(jnp.float32)
    projected_bld = x if d_proj is None else jnp.einsum(
        "bld,dp->blp", x, projection_dp, precision=lax.Precision.HIGHEST)
    weight_bl = mask_bl.astype(jnp.float32)
    if k_sim == 0:
        sums = jnp.einsum("bl,blp->bp", weight_bl, projected_bld, precision=lax.Precision.HIGHEST)[:, None]
        counts = jnp.sum(weight_bl, axis=1)[:, None]
        return sums / jnp.maximum(counts, 1.0)[..., None] if document else sums
    sketch_blk = jnp.einsum("bld,dk->blk", x, hyperplanes_dk, precision=lax.Precision.HIGHEST)
    bits_blk = sketch_blk > 0
    onehot_blp = jax.nn.one_hot(gray_partition(bits_blk), 2 ** k_sim, dtype=jnp.float32) * weight_bl[..., None]
    sums_bpd = jnp.einsum("blp,bld->bpd", onehot_blp, projected_bld, precision=lax.Precision.HIGHEST)
    if not document:
        return sums_bpd
    counts_bp = jnp.sum(onehot_blp, axis=1)
    block = sums_bpd / jnp.maximum(counts_bp, 1.0)[..., None]
    if not fill_empty:
        return block
    # Hamming distance of every token's sign bits to every partition's bits; padding never wins.
    dist_blp = jnp.sum(bits_blk[:, :, None, :] != partition_bits(k_sim)[None, None], axis=-1)
    dist_blp = jnp.where(mask_bl[..., None], dist_blp, k_sim + 1)
    nearest_bp = jnp.argmin(dist_blp, axis=1)  # first minimum: the lowest token index
    filler_bpd = jnp.take_along_axis(projected_bld, nearest_bp[..., None], axis=1)
    has_tokens_b = jnp.any(mask_bl, axis=1)
    empty_bp = (counts_bp == 0) & has_tokens_b[:, None]
    return jnp.where(empty_bp[..., None], filler_bpd, block)


@functools.partial(jax.jit, static_argnames=("kind", "reps", "k_sim", "d_proj", "final_dim", "fill_empty", "seed"))
def _fde(tokens_bld, mask_bl, *, kind, reps, k_sim, d_proj, final_dim, fill_empty, seed):
    # One traced repetition mapped over the stacked random matrices: compile time does not grow with reps.
    dim = tokens_bld.shape[-1]
    hyperplanes_rdk, projection_rdp = jax.vmap(
        lambda r: repetition_matrices(seed, r, dim, k_sim, d_proj))(jnp.arange(reps))
    one = functools.partial(_one_repetition, document=kind == "document", k_sim=k_sim, d_proj=d_proj,
                            fill_empty=fill_empty)
    blocks_rbpd = jax.vmap(lambda g, p: one(tokens_bld, mask_bl, g, p))(hyperplanes_rdk, projection_rdp)
    out = jnp.moveaxis(blocks_rbpd, 0, 1).reshape(tokens_bld.shape[0], -1)  # repetition-major per row
    if final_dim is None:
        return out
    cols, signs = final_projection(seed, out.shape[1], final_dim)
    return jnp.zeros((out.shape[0], final_dim), jnp.float32).at[:, cols].add(out * signs)


def fde(tokens_bld, mask_bl, *, kind: str = "query", reps: int, k_sim: int, d_proj: int | None = None,
        final_dim: int | None = None, fill_empty: bool = True, seed: int = 0):
    """Fixed-dimensional encodings of token sets.

    Args:
      tokens_bld: float [B, L, D] token vectors (a multi-vector encoder's output).
      mask_bl: bool [B, L], True for real tokens; masked tokens take no part.
      kind: "query" (sum per partition) or "document" (mean per partition, empty ones filled).
      reps: independent repetitions (each adds one Chamfer estimate to the inner product).
      k_sim: SimHash hyperplanes per repetition (2**k_sim partitions), 0..30.
      d_proj: CountSketch inner projection width, or None to keep the D dims.
      final_dim: optional final CountSketch width of the whole encoding.
      fill_empty: fill empty document partitions from the nearest token (documents only).
      seed: queries and documents must share it.

    Returns:
      float32 [B, reps * 2**k_sim * (d_proj or D)], or [B, final_dim].
    """
    _check_args(tokens_bld, mask_bl, kind, reps, k_sim, d_proj, final_dim)
    return _fde(jnp.asarray(tokens_bld), jnp.asarray(mask_bl, bool), kind=kind, reps=int(reps), k_sim=int(k_sim),
                d_proj=None if d_proj is None else int(d_proj), final_dim=None if final_dim is None else int(final_dim),
                fill_empty=bool(fill_empty), seed=int(seed))

"""Fewer vectors per text: CRISP's in-training clustering (Veneroso et al. 2025) and the post-hoc
baselines it is compared with.

``cluster_tokens`` runs k-means on each text's real tokens with static shapes: ``k`` centroids
per text (fixed per side), initialised from evenly spaced real tokens, ``iters`` Lloyd steps.
Assignments are taken under ``stop_gradient`` (the argmax is not differentiable) and the
gradient flows through the centroid means, as CRISP trains. A text with fewer than ``k`` real
tokens gets padded centroids whose mask is False, so every batch keeps one shape. Centroids are
L2-normalised like the token vectors they replace.

Post-hoc baselines act on a trained model's token masks: ``tail_prune`` keeps the first ``keep``
real tokens, ``k_spacing`` keeps every ``every``-th real token; clustering after training is
``cluster_tokens`` on frozen outputs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def _initial_centroids(tokens_bld, mask_bl, k: int):
    """k evenly spaced real tokens per text (rank r = floor(i * n / k)); [B, k, D] and mask [B, k]."""
    n_b = jnp.sum(mask_bl, axis=1)
    rank_bl = jnp.cumsum(mask_bl, axis=1) - 1  # index among real tokens
    want_bk = (jnp.arange(k)[None, :] * n_b[:, None]) // k
    valid_bk = jnp.arange(k)[None, :] < n_b[:, None]
    hit_bkl = (rank_bl[:, None, :] == want_bk[:, :, None]) & mask_bl[:, None, :]
    pos_bk = jnp.argmax(hit_bkl, axis=2)
    init = jnp.take_along_axis(tokens_bld, pos_bk[..., None], axis=1)
    return init, valid_bk


def cluster_tokens(tokens_bld, mask_bl, k: int, *, iters: int = 3):
    """CRISP clustering: ``(centroids_bkd float32 [B, k, D], mask_bk bool [B, k])``.

    ``tokens_bld`` [B, L, D] (any float), ``mask_bl`` bool [B, L]. Differentiable through the
    centroid means; the assignments carry no gradient."""
    if getattr(tokens_bld, "ndim", None) != 3 or tuple(mask_bl.shape) != tuple(tokens_bld.shape[:2]):
        raise ValueError(f"tokens_bld must be [B, L, D] with mask_bl [B, L]; got {getattr(tokens_bld, 'shape', None)} "
                         f"and {getattr(mask_bl, 'shape', None)}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r} must be a positive int (centroids per text)")
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters={iters!r} must be an int >= 1 (Lloyd steps)")
    x = tokens_bld.astype(jnp.float32)
    mask_bl = jnp.asarray(mask_bl, bool)
    centroids, valid_bk = _initial_centroids(lax.stop_gradient(x), mask_bl, k)

    def assign(c_bkd):
        d_blk = jnp.einsum("bld,bkd->blk", lax.stop_gradient(x), lax.stop_gradient(c_bkd))
        d_blk = jnp.where(valid_bk[:, None, :], d_blk, -jnp.inf)  # padded centroids take no tokens
        return jax.nn.one_hot(jnp.argmax(d_blk, axis=2), k) * mask_bl[..., None]

    def means(onehot_blk, previous_bkd):
        counts_bk = jnp.sum(onehot_blk, axis=1)
        sums_bkd = jnp.einsum("blk,bld->bkd", onehot_blk, x)
        return jnp.where(counts_bk[..., None] > 0, sums_bkd / jnp.maximum(counts_bk, 1.0)[..., None], previous_bkd), counts_bk

    for _ in range(iters):
        centroids, counts_bk = means(assign(centroids), lax.stop_gradient(centroids))
    keep_bk = valid_bk & (counts_bk > 0)
    norm = jnp.maximum(jnp.linalg.norm(centroids, axis=-1, keepdims=True), 1e-12)
    return jnp.where(keep_bk[..., None], centroids / norm, 0.0), keep_bk


def tail_prune(mask_bl, keep: int):
    """Token mask keeping each text's first ``keep`` real tokens."""
    if not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep={keep!r} must be a positive int")
    mask_bl = jnp.asarray(mask_bl, bool)
    return mask_bl & (jnp.cumsum(mask_bl, axis=1) <= keep)


def k_spacing(mask_bl, every: int):
    """Token mask keeping every ``every``-th real token (the 1st, the every+1-th, ...)."""
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"every={every!r} must be a positive int")
    mask_bl = jnp.asarray(mask_bl, bool)
    return mask_bl & ((jnp.cumsum(mask_bl, axis=1) - 1) % every == 0)

"""Poolers: pure masked reductions from token states [B, L, D] to one vector per text [B, D].

Every pooler takes the attention mask so that padding never reaches the pooled
vector, whichever side the padding is on. Layer selection (last layer, any
layer, or a mean of layers) is a separate step: ``select_layers``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp


def _mask_f(mask_bl, dtype=jnp.float32):
    return mask_bl.astype(dtype)[..., None]


def cls_pool(hidden_bld, mask_bl):
    """The first token's state (BERT's [CLS])."""
    del mask_bl
    return hidden_bld[:, 0]


def mean_pool(hidden_bld, mask_bl):
    """Mean over real tokens; the count is clamped at 1e-9 as sentence-transformers does."""
    m = _mask_f(mask_bl)
    total_bd = jnp.sum(hidden_bld.astype(jnp.float32) * m, axis=1)
    return total_bd / jnp.maximum(jnp.sum(m, axis=1), 1e-9)


def mean_sqrt_len_pool(hidden_bld, mask_bl):
    """Sum over real tokens divided by sqrt(number of real tokens)."""
    m = _mask_f(mask_bl)
    total_bd = jnp.sum(hidden_bld.astype(jnp.float32) * m, axis=1)
    return total_bd / jnp.sqrt(jnp.maximum(jnp.sum(m, axis=1), 1e-9))


def max_pool(hidden_bld, mask_bl):
    """Element-wise max over real tokens (padding can never win)."""
    h = hidden_bld.astype(jnp.float32)
    return jnp.max(jnp.where(mask_bl[..., None].astype(bool), h, -jnp.inf), axis=1)


def last_token_index(mask_bl):
    """Index [B] of the last real token, for left or right padding."""
    length = mask_bl.shape[1]
    return length - 1 - jnp.argmax(mask_bl[:, ::-1].astype(jnp.int32), axis=1)


def last_token_pool(hidden_bld, mask_bl):
    """The last real token's state (the EOS token of decoder-style embedders)."""
    idx_b = last_token_index(mask_bl)
    return jnp.take_along_axis(hidden_bld, idx_b[:, None, None], axis=1)[:, 0].astype(jnp.float32)


def weighted_mean_pool(hidden_bld, mask_bl):
    """Position-weighted mean (SGPT): token at position i of the real tokens gets weight i + 1.

    Weights count real tokens only, so left padding does not shift them.
    """
    m_bl = mask_bl.astype(jnp.float32)
    weights_bl = jnp.cumsum(m_bl, axis=1) * m_bl
    total_bd = jnp.sum(hidden_bld.astype(jnp.float32) * weights_bl[..., None], axis=1)
    return total_bd / jnp.maximum(jnp.sum(weights_bl, axis=1, keepdims=True), 1e-9)


POOLERS: dict[str, Callable] = {
    "cls": cls_pool,
    "mean": mean_pool,
    "mean_sqrt_len": mean_sqrt_len_pool,
    "max": max_pool,
    "lasttoken": last_token_pool,
    "weightedmean": weighted_mean_pool,
}


def get_pooler(method: str) -> Callable:
    """Look up a pooler by name; an unknown name is an error that lists the known ones."""
    try:
        return POOLERS[method]
    except KeyError:
        raise ValueError(f"unknown pooling {method!r}; choose one of {sorted(POOLERS)}") from None


def pool(hidden_bld, mask_bl, method: str):
    """Pool token states [B, L, D] with the attention mask [B, L] into float32 [B, D]."""
    return get_pooler(method)(hidden_bld, mask_bl).astype(jnp.float32)


def select_layers(hidden_states: Sequence[jax.Array], layers: int | Sequence[int] | None):
    """Pick the token states to pool from: ``None`` the last layer, an int that layer
    (0 = embeddings, negative counts from the end), a sequence the mean of those layers."""
    if layers is None:
        return hidden_states[-1]
    if isinstance(layers, int):
        return hidden_states[layers]
    layers = list(layers)
    if not layers:
        raise ValueError("layers is an empty list; pass None for the last layer or at least one index")
    stacked = jnp.stack([hidden_states[i].astype(jnp.float32) for i in layers])
    return jnp.mean(stacked, axis=0)


def l2_normalize(x_bd, eps: float = 1e-12):
    """Unit-length rows; an all-zero row stays zero (norm clamped at ``eps``, as torch's F.normalize)."""
    norm_b1 = jnp.linalg.norm(x_bd, axis=-1, keepdims=True)
    return x_bd / jnp.maximum(norm_b1, eps)

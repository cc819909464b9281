"""Rotary position embeddings (RoPE): inverse frequencies per scaling type, and their application.

The rotation is the half-split form transformers uses (``rotate_half(x) = [-x2, x1]``): pair
``j`` of a head couples coordinates ``j`` and ``j + head_dim / 2`` and turns them by
``position * inv_freq[j]``. Angles, cosines and sines are computed in float32 whatever the
compute dtype, because positions in the thousands times small frequencies lose the phase in
bfloat16.

Scaling types are data (a dict as transformers writes it under ``rope_scaling`` or
``rope_parameters``); each type is one pure function from the unscaled frequencies to scaled
ones, registered in ``INV_FREQ_SCALERS``. An unknown type is an error listing the known ones.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np


def default_inverse_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """float32 [head_dim // 2]: ``theta ** (-2j / head_dim)``, computed as transformers does (float32 pow)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / np.power(np.float32(theta), exponents)).astype(np.float32)


def _linear(inv_freq: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
    """Position interpolation: positions m -> m / factor, i.e. every frequency divided by the factor."""
    return (inv_freq / np.float32(params["factor"])).astype(np.float32)


def _llama3(inv_freq: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
    """Llama 3.1's band-wise scaling: long wavelengths divided by ``factor``, short ones kept,
    the band between them interpolated smoothly."""
    factor = float(params["factor"])
    low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
    old_len = float(params["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = (2 * math.pi / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


INV_FREQ_SCALERS: dict[str, Callable[[np.ndarray, Mapping[str, Any]], np.ndarray]] = {
    "linear": _linear,
    "llama3": _llama3,
}
_REQUIRED = {"linear": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def normalize_scaling(scaling: Mapping[str, Any] | None, where: str = "rope_scaling") -> dict | None:
    """A transformers ``rope_scaling`` / ``rope_parameters`` dict -> ``{"type": ..., params}`` or None.

    Accepts ``type`` or ``rope_type``; ``default`` (or no dict) means no scaling. Unknown types
    and missing parameters are errors naming the dict.
    """
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        return None
    if kind not in INV_FREQ_SCALERS:
        raise ValueError(f"{where} has RoPE scaling type {kind!r}, which embedjax does not implement; "
                         f"supported: {sorted(INV_FREQ_SCALERS)} (or 'default')")
    missing = [key for key in _REQUIRED[kind] if key not in scaling]
    if missing:
        raise ValueError(f"{where} of type {kind!r} lacks {missing}")
    out = {key: value for key, value in scaling.items() if key not in ("type", "rope_type", "rope_theta")}
    if float(out["factor"]) < 1:
        raise ValueError(f"{where} factor={out['factor']} is below 1; RoPE scaling stretches positions (factor >= 1)")
    out["type"] = kind
    return out


def inverse_frequencies(head_dim: int, theta: float, scaling: Mapping[str, Any] | None = None) -> np.ndarray:
    """float32 [head_dim // 2] inverse frequencies with the (normalized) scaling applied."""
    inv_freq = default_inverse_frequencies(head_dim, theta)
    scaling = normalize_scaling(scaling)
    if scaling is None:
        return inv_freq
    return INV_FREQ_SCALERS[scaling["type"]](inv_freq, scaling)


def positions_from_mask(mask_bl) -> jnp.ndarray:
    """int32 [B, L]: each real token's index among the real tokens (0, 1, ...), whichever side the
    padding is on; padding positions get the neighbouring value and are masked anyway."""
    return jnp.maximum(jnp.cumsum(mask_bl.astype(jnp.int32), axis=1) - 1, 0)


def rope_tables(positions_bl, inv_freq_k: np.ndarray):
    """(cos, sin), each float32 [B, L, 2K] for head_dim 2K: the half-split layout's angle per coordinate."""
    angles_blk = positions_bl.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq_k, jnp.float32)
    angles = jnp.concatenate([angles_blk, angles_blk], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_blhk, cos_blk, sin_blk):
    """Rotate ``x`` [B, L, H, head_dim] by the tables (broadcast over heads), in x's dtype."""
    half = x_blhk.shape[-1] // 2
    rotated = jnp.concatenate([-x_blhk[..., half:], x_blhk[..., :half]], axis=-1)
    cos = cos_blk[:, :, None, :].astype(x_blhk.dtype)
    sin = sin_blk[:, :, None, :].astype(x_blhk.dtype)
    return x_blhk * cos + rotated * sin

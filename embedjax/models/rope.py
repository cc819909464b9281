"""Rotary position embeddings (RoPE): inverse frequencies per scaling type, and their application.

The rotation is the half-split form transformers uses (``rotate_half(x) = [-x2, x1]``): pair
``j`` of a head couples coordinates ``j`` and ``j + head_dim / 2`` and turns them by
``position * inv_freq[j]``. Angles, cosines and sines are computed in float32 whatever the
compute dtype, because positions in the thousands times small frequencies lose the phase in
bfloat16.

Scaling types are data (a dict as transformers writes it under ``rope_scaling`` or
``rope_parameters``, or as ``Encoder.from_pretrained(..., rope_scaling=...)`` takes it); each type
is one pure function from the unscaled frequencies to scaled ones, registered in
``INV_FREQ_SCALERS``, with its required keys in ``REQUIRED_KEYS``. An unknown type is an error
listing the known ones. The types, for a model trained on ``L0`` positions:

- ``linear`` (position interpolation): positions m -> m / factor; supports ``L0 * factor``.
- ``ntk`` (NTK-aware): the base theta -> theta * factor ** (d / (d - 2)), so the highest frequency
  is kept and the lowest is divided by ``factor``; supports ``L0 * factor``.
- ``yarn``: per-frequency blend of interpolation (long wavelengths) and extrapolation (short
  ones), plus an attention temperature (`attention_factor`) on cos/sin; as transformers computes it.
- ``llama3``: Llama 3.1's band-wise scaling (the config already states the extended length).
- ``self_extend`` (``group_size`` g, ``window`` w): frequencies unchanged; attention uses normal
  relative positions within w tokens and grouped positions ``floor(p / g)`` beyond (see
  `self_extend_positions` and `embedjax.models.layers.attend`); supports ``g * (L0 - w + w // g)``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple

import jax.numpy as jnp
import numpy as np


def default_inverse_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """float32 [head_dim // 2]: ``theta ** (-2j / head_dim)``, computed as transformers does (float32 pow)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / np.power(np.float32(theta), exponents)).astype(np.float32)


def _linear(inv_freq: np.ndarray, params: Mapping[str, Any], *, head_dim: int, theta: float) -> np.ndarray:
    """Position interpolation: positions m -> m / factor, i.e. every frequency divided by the factor."""
    return (inv_freq / np.float32(params["factor"])).astype(np.float32)


def _ntk(inv_freq: np.ndarray, params: Mapping[str, Any], *, head_dim: int, theta: float) -> np.ndarray:
    """NTK-aware scaling: a larger base, ``theta * factor ** (d / (d - 2))``. Pair 0 (the highest
    frequency) is unchanged and the last pair's frequency is divided by exactly ``factor``: high
    frequencies extrapolate, low ones interpolate."""
    factor = float(params["factor"])
    return default_inverse_frequencies(head_dim, theta * factor ** (head_dim / (head_dim - 2)))


def _yarn(inv_freq: np.ndarray, params: Mapping[str, Any], *, head_dim: int, theta: float) -> np.ndarray:
    """YaRN's frequencies (the temperature is `attention_factor`): pairs that turn fewer than
    ``beta_slow`` times over the original context are interpolated (divided by ``factor``), pairs
    that turn more than ``beta_fast`` times are kept, with a linear ramp between."""
    factor = float(params["factor"])
    if factor == 1.0:  # interpolation and extrapolation agree; skip the blend's rounding
        return inv_freq
    old_len = float(params["original_max_position_embeddings"])
    beta_fast, beta_slow = float(params.get("beta_fast") or 32), float(params.get("beta_slow") or 1)

    def pair_index(rotations: float) -> float:
        # the pair whose wavelength fits ``rotations`` times into the original context
        return head_dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair_index(beta_fast), pair_index(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # a zero-width ramp would divide by zero
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    keep = np.float32(1) - ramp  # 1: extrapolate (keep the frequency), 0: interpolate
    return (inv_freq / np.float32(factor) * (1 - keep) + inv_freq * keep).astype(np.float32)


def _unscaled(inv_freq: np.ndarray, params: Mapping[str, Any], *, head_dim: int, theta: float) -> np.ndarray:
    """SelfExtend keeps the frequencies; it changes which positions attention compares."""
    return inv_freq


def _llama3(inv_freq: np.ndarray, params: Mapping[str, Any], *, head_dim: int, theta: float) -> np.ndarray:
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


INV_FREQ_SCALERS: dict[str, Callable[..., np.ndarray]] = {
    "linear": _linear,
    "ntk": _ntk,
    "yarn": _yarn,
    "llama3": _llama3,
    "self_extend": _unscaled,
}
REQUIRED_KEYS = {"linear": ("factor",),
                 "ntk": ("factor",),
                 "yarn": ("factor", "original_max_position_embeddings"),
                 "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                 "self_extend": ("group_size", "window")}
# Types whose original context length the model config supplies when the dict does not.
NEEDS_ORIGINAL_LENGTH = ("yarn", "llama3")


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
    missing = [key for key in REQUIRED_KEYS[kind] if key not in scaling]
    if missing:
        raise ValueError(f"{where} of type {kind!r} lacks {missing}")
    out = {key: value for key, value in scaling.items() if key not in ("type", "rope_type", "rope_theta")}
    if "factor" in REQUIRED_KEYS[kind] and not float(out["factor"]) >= 1:
        raise ValueError(f"{where} factor={out['factor']} is below 1; RoPE scaling stretches positions (factor >= 1)")
    if kind == "self_extend":
        for key in ("group_size", "window"):
            if isinstance(out[key], bool) or not isinstance(out[key], int) or out[key] < 1:
                raise ValueError(f"{where} self_extend {key}={out[key]!r} must be an integer >= 1")
    out["type"] = kind
    return out


def supported_length(scaling: Mapping[str, Any] | None, trained_length: int) -> int:
    """The longest input a model trained on ``trained_length`` positions supports under ``scaling``
    (normalized). linear / ntk / yarn stretch the context by their factor (yarn from its
    ``original_max_position_embeddings``); llama3 configs state their extended length already;
    SelfExtend keeps every grouped relative distance within the trained range."""
    if not scaling:
        return trained_length
    kind = scaling["type"]
    if kind in ("linear", "ntk"):
        return int(trained_length * float(scaling["factor"]))
    if kind == "yarn":
        return int(float(scaling["original_max_position_embeddings"]) * float(scaling["factor"]))
    if kind == "self_extend":
        group, window = scaling["group_size"], scaling["window"]
        if window >= trained_length:
            # Every relative distance the model meets is then a trained one only up to trained_length.
            return trained_length
        # Largest grouped distance: floor((L - 1) / g) + w - floor(w / g) <= trained_length - 1.
        return group * (trained_length - window + window // group)
    return trained_length


def attention_factor(scaling: Mapping[str, Any] | None) -> float:
    """The factor YaRN multiplies cos and sin by (so attention logits by its square); 1 otherwise.
    Default ``0.1 * ln(factor) + 1``, or the ratio of the two ``mscale`` terms when both are given."""
    if not scaling or scaling["type"] != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = float(scaling["factor"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if scaling.get("mscale") and scaling.get("mscale_all_dim"):
        return mscale(factor, float(scaling["mscale"])) / mscale(factor, float(scaling["mscale_all_dim"]))
    return mscale(factor)


def self_extend_positions(positions_bl, group_size: int, window: int):
    """SelfExtend's grouped positions, int32 [B, L] each: ``(query_before, query_after, key)``.

    For a query at p_q and a key at p_k farther apart than the window, attention compares grouped
    positions: key ``floor(p_k / g)``; query ``floor(p_q / g) + s`` when the key comes before it and
    ``floor(p_q / g) - s`` when after (the bidirectional variant), with the shift
    ``s = w - floor(w / g)`` that makes the grouped distance continue the neighbour distances at
    the window's edge. RoPE scores depend only on position differences, so shifting the query
    instead of the key (as the reference implementation does for keys after the query) is the same.
    """
    grouped = positions_bl // group_size
    shift = window - window // group_size
    return grouped + shift, grouped - shift, grouped


def inverse_frequencies(head_dim: int, theta: float, scaling: Mapping[str, Any] | None = None) -> np.ndarray:
    """float32 [head_dim // 2] inverse frequencies with the (normalized) scaling applied."""
    inv_freq = default_inverse_frequencies(head_dim, theta)
    scaling = normalize_scaling(scaling)
    if scaling is None:
        return inv_freq
    return INV_FREQ_SCALERS[scaling["type"]](inv_freq, scaling, head_dim=head_dim, theta=theta)


def positions_from_mask(mask_bl) -> jnp.ndarray:
    """int32 [B, L]: each real token's index among the real tokens (0, 1, ...), whichever side the
    padding is on; padding positions get the neighbouring value and are masked anyway."""
    return jnp.maximum(jnp.cumsum(mask_bl.astype(jnp.int32), axis=1) - 1, 0)


def rope_tables(positions_bl, inv_freq_k: np.ndarray, scale: float = 1.0):
    """(cos, sin), each float32 [B, L, 2K] for head_dim 2K: the half-split layout's angle per coordinate,
    both multiplied by ``scale`` (YaRN's `attention_factor`; 1 leaves them exact)."""
    angles_blk = positions_bl.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq_k, jnp.float32)
    angles = jnp.concatenate([angles_blk, angles_blk], axis=-1)
    if scale == 1.0:
        return jnp.cos(angles), jnp.sin(angles)
    return jnp.cos(angles) * jnp.float32(scale), jnp.sin(angles) * jnp.float32(scale)


class RotaryTables(NamedTuple):
    """What attention needs to rotate q and k: the normal tables, and for SelfExtend the grouped
    ones and each token's position (to tell neighbours from far tokens)."""

    cos: Any  # float32 [B, L, head_dim]
    sin: Any
    # SelfExtend only: (cos, sin) pairs for queries with keys before them, queries with keys after
    # them, and keys (see `self_extend_positions`), and the positions int32 [B, L].
    query_before: tuple | None = None
    query_after: tuple | None = None
    key_grouped: tuple | None = None
    positions: Any = None

    @property
    def self_extend(self) -> bool:
        return self.key_grouped is not None


def rotary_tables(positions_bl, head_dim: int, theta: float, scaling: Mapping[str, Any] | None = None) -> RotaryTables:
    """The tables for ``positions`` under a (normalized) scaling, SelfExtend's grouped ones included.

    SelfExtend that cannot change anything for this input (group size 1, or a window of at least
    the input's length, so that every pair is a neighbour) gives the plain tables: attention is
    then plain attention exactly, at plain attention's cost.
    """
    inv_freq = inverse_frequencies(head_dim, theta, scaling)
    scale = attention_factor(scaling)
    cos, sin = rope_tables(positions_bl, inv_freq, scale)
    if not scaling or scaling["type"] != "self_extend":
        return RotaryTables(cos, sin)
    if scaling["group_size"] == 1 or scaling["window"] >= positions_bl.shape[1]:
        return RotaryTables(cos, sin)
    before, after, key = self_extend_positions(positions_bl, scaling["group_size"], scaling["window"])
    return RotaryTables(cos, sin, rope_tables(before, inv_freq, scale), rope_tables(after, inv_freq, scale),
                        rope_tables(key, inv_freq, scale), positions_bl)


def apply_rope(x_blhk, cos_blk, sin_blk):
    """Rotate ``x`` [B, L, H, head_dim] by the tables (broadcast over heads), in x's dtype."""
    half = x_blhk.shape[-1] // 2
    rotated = jnp.concatenate([-x_blhk[..., half:], x_blhk[..., :half]], axis=-1)
    cos = cos_blk[:, :, None, :].astype(x_blhk.dtype)
    sin = sin_blk[:, :, None, :].astype(x_blhk.dtype)
    return x_blhk * cos + rotated * sin

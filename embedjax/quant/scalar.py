"""Scalar quantisation to int8 / uint8 / int4 with per-dimension calibrated ranges.

Per-dimension ranges (the sentence-transformers / FAISS SQ8 recipe): each
dimension d gets ``[lo_d, hi_d]`` from calibration embeddings and ``L`` levels
(256 for 8 bits, 16 for 4 bits) spaced ``step_d = (hi_d - lo_d) / (L - 1)``.
A value is stored as the nearest level index, clipped (never wrapped) to the
range, then shifted to signed: ``code = level - L/2``. Decoding:
``x ~= lo_d + (code + L/2) * step_d``.

Symmetric per-vector scales are the alternative for queries or for corpora
without calibration data: ``code = round(x / s)``, ``s = max|x| / 127``.

int4 packing: two codes per byte, the even dimension in the low nibble, the odd
dimension in the high nibble (two's-complement nibbles, -8..7); an odd D gets a
zero high nibble in the last byte.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def _check_embeddings(x, name):
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [N, D]; got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be floating point embeddings; got dtype {x.dtype}")
    return x


def calibrate_ranges(calibration_nd, *, lower_percentile: float = 0.0, upper_percentile: float = 100.0):
    """Per-dimension ``(lo_d, hi_d)`` float32 [D] from calibration embeddings [N, D].

    Percentiles other than 0/100 clip outliers (values outside are clipped at
    quantisation time).
    """
    x = _check_embeddings(calibration_nd, "calibration_nd").astype(jnp.float32)
    if x.shape[0] == 0:
        raise ValueError("calibration_nd is empty; pass at least one embedding to calibrate ranges")
    if not 0.0 <= lower_percentile < upper_percentile <= 100.0:
        raise ValueError(f"need 0 <= lower_percentile < upper_percentile <= 100; got {lower_percentile}, {upper_percentile}")
    lo = jnp.min(x, axis=0) if lower_percentile == 0.0 else jnp.percentile(x, lower_percentile, axis=0)
    hi = jnp.max(x, axis=0) if upper_percentile == 100.0 else jnp.percentile(x, upper_percentile, axis=0)
    return lo.astype(jnp.float32), hi.astype(jnp.float32)


def _levels_step(lo_d, hi_d, levels):
    lo_d = jnp.asarray(lo_d, jnp.float32)
    hi_d = jnp.asarray(hi_d, jnp.float32)
    if lo_d.shape != hi_d.shape or lo_d.ndim != 1:
        raise ValueError(f"lo_d and hi_d must be 1-D of equal length; got {lo_d.shape}, {hi_d.shape}")
    width = hi_d - lo_d
    # A constant dimension (width 0) still needs a nonzero step to avoid 0/0;
    # all its values land on level 0 and decode back to lo exactly.
    step = jnp.where(width > 0, width / (levels - 1), 1.0)
    return lo_d, step


def quantize_levels(x_nd, lo_d, hi_d, levels: int):
    """Level indices int32 [N, D] in ``[0, levels - 1]`` (nearest level, clipped)."""
    x = _check_embeddings(x_nd, "x_nd").astype(jnp.float32)
    lo, step = _levels_step(lo_d, hi_d, levels)
    if x.shape[1] != lo.shape[0]:
        raise ValueError(f"x_nd has {x.shape[1]} dims but the ranges have {lo.shape[0]}")
    return jnp.clip(jnp.round((x - lo) / step), 0, levels - 1).astype(jnp.int32)


def quantize_int8(x_nd, lo_d, hi_d):
    """int8 codes [N, D] = level - 128 (256 levels per dimension)."""
    return (quantize_levels(x_nd, lo_d, hi_d, 256) - 128).astype(jnp.int8)


def quantize_uint8(x_nd, lo_d, hi_d):
    """uint8 codes [N, D] = level (256 levels per dimension)."""
    return quantize_levels(x_nd, lo_d, hi_d, 256).astype(jnp.uint8)


def dequantize_int8(codes_nd, lo_d, hi_d):
    lo, step = _levels_step(lo_d, hi_d, 256)
    return lo + (jnp.asarray(codes_nd).astype(jnp.float32) + 128.0) * step


def dequantize_uint8(codes_nd, lo_d, hi_d):
    lo, step = _levels_step(lo_d, hi_d, 256)
    return lo + jnp.asarray(codes_nd).astype(jnp.float32) * step


def affine_query_transform(q_qd, lo_d, hi_d, levels: int):
    """Fold a per-dimension affine code into the query.

    For a corpus vector decoded as ``x = lo + (c + levels/2) * step`` (``c`` the
    signed code), ``<q, x> = <q * step, c> + <q, lo + (levels/2) * step>``.
    Returns ``(q_scaled_qd, q_offset_q)`` so integer/low-bit kernels score
    ``<q_scaled, c> + q_offset`` and get the dequantised inner product.
    """
    q = _check_embeddings(q_qd, "q_qd").astype(jnp.float32)
    lo, step = _levels_step(lo_d, hi_d, levels)
    return q * step, q @ (lo + (levels // 2) * step)


def quantize_symmetric_int8(x_nd):
    """Symmetric per-vector int8: ``(codes int8 [N, D], scale float32 [N])`` with ``x ~= codes * scale``."""
    x = _check_embeddings(x_nd, "x_nd").astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=1)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    codes = jnp.clip(jnp.round(x / scale[:, None]), -127, 127).astype(jnp.int8)
    return codes, scale.astype(jnp.float32)


# --- int4 ---


def quantize_int4(x_nd, lo_d, hi_d):
    """Signed int4 codes (level - 8, in -8..7) packed two per byte: uint8 [N, ceil(D/2)]."""
    codes = quantize_levels(x_nd, lo_d, hi_d, 16) - 8
    return pack_int4(codes)


def pack_int4(codes_nd):
    """int codes in -8..7 [N, D] -> uint8 [N, ceil(D/2)]; even dim -> low nibble, odd dim -> high nibble."""
    codes = jnp.asarray(codes_nd).astype(jnp.int32)
    if codes.ndim != 2:
        raise ValueError(f"codes_nd must be 2-D; got shape {codes.shape}")
    n, d = codes.shape
    if d % 2:
        codes = jnp.pad(codes, ((0, 0), (0, 1)))
    nibbles = (codes & 0xF).astype(jnp.uint8)
    return (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).astype(jnp.uint8)


def unpack_int4(packed_nb, dim: int):
    """uint8 [N, ceil(dim/2)] -> int8 codes in -8..7 [N, dim]."""
    packed = jnp.asarray(packed_nb)
    if packed.dtype != jnp.uint8 or packed.ndim != 2:
        raise TypeError(f"packed_nb must be a 2-D uint8 array of packed int4 codes; got {packed.dtype} {packed.shape}")
    if packed.shape[1] != -(-dim // 2):
        raise ValueError(f"dim={dim} needs {-(-dim // 2)} bytes per row but packed_nb has {packed.shape[1]}")
    v = packed.astype(jnp.int32)
    # (v ^ 8) - 8 sign-extends a 4-bit two's-complement nibble (plain int32
    # arithmetic; a where() on int8 compiles very slowly on XLA CPU).
    low = ((v & 0xF) ^ 8) - 8
    high = ((v >> 4) ^ 8) - 8
    both = jnp.stack([low, high], axis=-1).reshape(packed.shape[0], -1)
    return both[:, :dim].astype(jnp.int8)


def dequantize_int4(packed_nb, lo_d, hi_d):
    lo, step = _levels_step(lo_d, hi_d, 16)
    codes = unpack_int4(packed_nb, lo.shape[0]).astype(jnp.float32)
    return lo + (codes + 8.0) * step


def np_int4_reference(codes_nd: np.ndarray) -> np.ndarray:
    """Pure numpy int4 packing used by tests as an independent reference."""
    codes_nd = np.asarray(codes_nd, dtype=np.int64)
    n, d = codes_nd.shape
    out = np.zeros((n, -(-d // 2)), dtype=np.uint8)
    for j in range(d):
        nib = (codes_nd[:, j] % 16).astype(np.uint8)
        out[:, j // 2] |= nib << (4 * (j % 2))
    return out

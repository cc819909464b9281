"""float8 codes (e4m3 and e5m2) with a per-vector scale.

A unit-norm embedding has components far below the smallest normal fp8 value
of e4m3 (2^-6), so values are first scaled per vector so the largest magnitude
maps to ``max_finite / 2`` (headroom against rounding up to inf/nan), then cast:
``x ~= codes.astype(float32) * scale``.
"""
from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes

FORMATS = {
    "e4m3": jnp.float8_e4m3fn,
    "e5m2": jnp.float8_e5m2,
}


def fp8_dtype(fmt: str):
    if fmt not in FORMATS:
        raise ValueError(f"unknown fp8 format {fmt!r}; use one of {sorted(FORMATS)}")
    return FORMATS[fmt]


def quantize_fp8(x_nd, fmt: str = "e4m3"):
    """``(codes fp8 [N, D], scale float32 [N])``."""
    dtype = fp8_dtype(fmt)
    x = jnp.asarray(x_nd)
    if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x_nd must be a 2-D float array [N, D]; got {x.dtype} {x.shape}")
    x = x.astype(jnp.float32)
    target = float(ml_dtypes.finfo(dtype).max) / 2
    amax = jnp.max(jnp.abs(x), axis=1)
    scale = jnp.where(amax > 0, amax / target, 1.0).astype(jnp.float32)
    return (x / scale[:, None]).astype(dtype), scale


def dequantize_fp8(codes_nd, scale_n):
    return jnp.asarray(codes_nd).astype(jnp.float32) * jnp.asarray(scale_n, jnp.float32)[:, None]

"""Row storage formats of embedding tables: float32, int8, int4, fp8 (with a float32 scale per row),
and boolean masks.

A codec turns float rows ``x_uw`` (U rows of width w) into the arrays a table stores and back:

- ``float32``: ``{"w": float32 [U, w]}``.
- ``int8``:    ``{"codes": int8 [U, w], "scale": float32 [U]}``; x ~ codes * scale, codes in [-127, 127],
               scale = max|x_row| / 127 (symmetric, so 0 is exact).
- ``int4``:    ``{"codes": uint8 [U, ceil(w / 2)], "scale": float32 [U]}``; codes in [-7, 7] stored
               as (code + 8) in 4 bits, dimension 2j in the low nibble and 2j + 1 in the high nibble
               of byte j (an odd width pads the last high nibble with code 0).
- ``fp8``:     ``{"codes": float8_e4m3fn [U, w], "scale": float32 [U]}``; x ~ codes * scale with
               scale = max|x_row| / 448 (448 is e4m3fn's largest finite value).
- ``mask``:    ``{"mask": bool [U, w]}``: 1 byte per entry while training (frozen, never optimised).

``encode(..., rounding="nearest")`` rounds to the nearest code (ties to even); ``"stochastic"``
rounds up with probability equal to the distance from the lower code (unbiased: E[decode] = x).
Stochastic rounding draws its uniforms from ``fold_in(key, row_id)``, so a row gets the same
random bits whichever device holds it.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

CODECS = ("float32", "int8", "int4", "fp8", "mask")
LOW_BIT = ("int8", "int4", "fp8")
ROUNDINGS = ("nearest", "stochastic")
FP8_MAX = 448.0
_QMAX = {"int8": 127.0, "int4": 7.0}


@dataclasses.dataclass(frozen=True)
class Stored:
    """Shape and dtype of one stored array per row: ``row_shape`` excludes the row dimension."""

    row_shape: tuple[int, ...]
    dtype: np.dtype


def check_codec(codec: str) -> str:
    if codec not in CODECS:
        raise ValueError(f"unknown row codec {codec!r}; choose one of {CODECS}")
    return codec


def layout(codec: str, width: int) -> dict[str, Stored]:
    """The arrays one row of ``width`` floats is stored as."""
    check_codec(codec)
    if width < 1:
        raise ValueError(f"row width must be >= 1, got {width}")
    if codec == "float32":
        return {"w": Stored((width,), np.dtype(np.float32))}
    if codec == "mask":
        return {"mask": Stored((width,), np.dtype(np.bool_))}
    scale = Stored((), np.dtype(np.float32))
    if codec == "int8":
        return {"codes": Stored((width,), np.dtype(np.int8)), "scale": scale}
    if codec == "int4":
        return {"codes": Stored((math.ceil(width / 2),), np.dtype(np.uint8)), "scale": scale}
    return {"codes": Stored((width,), np.dtype(jnp.float8_e4m3fn)), "scale": scale}


def bytes_per_row(codec: str, width: int) -> int:
    """Bytes one stored row takes (the sum over the codec's arrays)."""
    return sum(int(np.prod(s.row_shape, dtype=np.int64)) * s.dtype.itemsize for s in layout(codec, width).values())


def decode(codec: str, stored: dict, width: int) -> jax.Array:
    """Stored arrays with leading dims [...] -> float32 [..., width]."""
    check_codec(codec)
    if codec == "float32":
        return stored["w"]
    if codec == "mask":
        return stored["mask"].astype(jnp.float32)
    scale = stored["scale"][..., None]
    if codec == "int8":
        return stored["codes"].astype(jnp.float32) * scale
    if codec == "int4":
        return unpack_int4(stored["codes"], width).astype(jnp.float32) * scale
    return stored["codes"].astype(jnp.float32) * scale


def pack_int4(codes: jax.Array) -> jax.Array:
    """int codes in [-7, 7] [..., w] -> uint8 [..., ceil(w/2)] (see the module docstring)."""
    w = codes.shape[-1]
    biased = (codes + 8).astype(jnp.uint8)
    if w % 2:
        pad = jnp.full(codes.shape[:-1] + (1,), 8, jnp.uint8)
        biased = jnp.concatenate([biased, pad], axis=-1)
    low, high = biased[..., 0::2], biased[..., 1::2]
    return low | (high << jnp.uint8(4))


def unpack_int4(packed: jax.Array, width: int) -> jax.Array:
    """uint8 [..., ceil(w/2)] -> int8 codes [..., width]."""
    low = (packed & jnp.uint8(0x0F)).astype(jnp.int8) - 8
    high = (packed >> jnp.uint8(4)).astype(jnp.int8) - 8
    both = jnp.stack([low, high], axis=-1).reshape(packed.shape[:-1] + (2 * packed.shape[-1],))
    return both[..., :width]


def row_uniforms(key: jax.Array, row_ids_u: jax.Array, width: int) -> jax.Array:
    """float32 [U, width] uniforms in [0, 1) that depend only on (key, global row id)."""
    return jax.vmap(lambda r: jax.random.uniform(jax.random.fold_in(key, r), (width,)))(row_ids_u)


def _round(v, rounding: str, uniforms):
    if rounding == "nearest":
        return jnp.round(v)
    return jnp.floor(v + uniforms)


def _fp8_neighbours(a):
    """For a >= 0 (float32, <= 448): the e4m3fn values lo <= a <= hi around it."""
    near = a.astype(jnp.float8_e4m3fn)
    bits = jax.lax.bitcast_convert_type(near, jnp.uint8)
    near_f = near.astype(jnp.float32)
    up = jax.lax.bitcast_convert_type(jnp.minimum(bits + 1, 0x7E).astype(jnp.uint8), jnp.float8_e4m3fn)
    down = jax.lax.bitcast_convert_type(jnp.maximum(bits.astype(jnp.int32) - 1, 0).astype(jnp.uint8),
                                        jnp.float8_e4m3fn)
    lo = jnp.where(near_f <= a, near_f, down.astype(jnp.float32))
    hi = jnp.where(near_f >= a, near_f, up.astype(jnp.float32))
    return lo, hi


def encode(codec: str, x_uw: jax.Array, *, rounding: str = "nearest", key: jax.Array | None = None,
           row_ids_u: jax.Array | None = None) -> dict:
    """float32 rows [U, w] -> the codec's stored arrays. ``stochastic`` needs ``key`` and ``row_ids_u``."""
    check_codec(codec)
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding={rounding!r}: choose one of {ROUNDINGS}")
    if codec == "float32":
        return {"w": x_uw.astype(jnp.float32)}
    if codec == "mask":
        return {"mask": x_uw != 0}
    width = x_uw.shape[-1]
    uniforms = None
    if rounding == "stochastic":
        if key is None or row_ids_u is None:
            raise ValueError("stochastic rounding needs a key and the global row ids of the rows")
        uniforms = row_uniforms(key, row_ids_u, width)
    amax = jnp.max(jnp.abs(x_uw), axis=-1)
    if codec in _QMAX:
        qmax = _QMAX[codec]
        scale = amax / qmax
        safe = jnp.where(scale > 0, scale, 1.0)[..., None]
        codes = jnp.clip(_round(x_uw / safe, rounding, uniforms), -qmax, qmax)
        if codec == "int8":
            return {"codes": codes.astype(jnp.int8), "scale": scale}
        return {"codes": pack_int4(codes.astype(jnp.int8)), "scale": scale}
    scale = amax / FP8_MAX
    safe = jnp.where(scale > 0, scale, 1.0)[..., None]
    v = jnp.clip(x_uw / safe, -FP8_MAX, FP8_MAX)
    if rounding == "nearest":
        codes = v.astype(jnp.float8_e4m3fn)
    else:
        a = jnp.abs(v)
        lo, hi = _fp8_neighbours(a)
        gap = hi - lo
        p_up = jnp.where(gap > 0, (a - lo) / jnp.where(gap > 0, gap, 1.0), 0.0)
        mag = jnp.where(uniforms < p_up, hi, lo)
        codes = (jnp.sign(v) * mag).astype(jnp.float8_e4m3fn)
    return {"codes": codes, "scale": scale}


def fake_quantize(codec: str, x: jax.Array) -> jax.Array:
    """Straight-through fake quantisation: forward decode(encode_nearest(x)), backward identity."""
    if codec not in LOW_BIT:
        raise ValueError(f"fake_quantize needs a low-bit codec {LOW_BIT}, got {codec!r}")
    flat = x.reshape(-1, x.shape[-1])
    q = decode(codec, encode(codec, flat), x.shape[-1]).reshape(x.shape)
    return x + jax.lax.stop_gradient(q - x)

"""Binary (1 bit per dimension) codes and converters between bit layouts.

embedjax layout (``pack_bits``): a vector x of D dimensions becomes
``ceil(D / 32)`` uint32 words; dimension ``i`` is bit ``i % 32`` (bit 0 = least
significant) of word ``i // 32``; the bit is set iff ``x[i] > 0``. Unused high
bits of the last word are zero. Read as little-endian bytes this is exactly the
FAISS binary layout (``fvec2bitvec``: dimension ``i`` is bit ``i % 8`` of byte
``i // 8``), so ``to_faiss_bytes`` is a byte view with the padding trimmed.

numpy ``packbits`` (and sentence-transformers' ``ubinary`` precision) uses the
opposite bit order inside a byte: dimension ``i`` is bit ``7 - i % 8`` of byte
``i // 8``. sentence-transformers' ``binary`` precision is ``ubinary - 128``
stored as int8.
"""
from __future__ import annotations

import numpy as np
import jax.numpy as jnp
from jax import lax

WORD_BITS = 32


def num_words(dim: int) -> int:
    """Number of uint32 words that hold ``dim`` bits."""
    return -(-int(dim) // WORD_BITS)


def _check_matrix(x, name: str):
    if getattr(x, "ndim", None) != 2:
        raise ValueError(f"{name} must be a 2-D array [N, D]; got shape {getattr(x, 'shape', None)}")


def pack_bits(x_nd):
    """Sign-binarise and pack: float/int ``x_nd`` [N, D] -> uint32 codes [N, ceil(D/32)].

    Bit ``i % 32`` of word ``i // 32`` is 1 iff ``x_nd[:, i] > 0``.
    """
    x_nd = jnp.asarray(x_nd)
    _check_matrix(x_nd, "x_nd")
    if not (jnp.issubdtype(x_nd.dtype, jnp.floating) or jnp.issubdtype(x_nd.dtype, jnp.integer)):
        raise TypeError(f"x_nd must be a real float or integer array; got dtype {x_nd.dtype}")
    n, d = x_nd.shape
    if d == 0:
        raise ValueError("x_nd has 0 dimensions; nothing to binarise")
    w = num_words(d)
    bits_nd = (x_nd > 0).astype(jnp.uint32)
    bits_nd = jnp.pad(bits_nd, ((0, 0), (0, w * WORD_BITS - d)))
    bits_nwb = bits_nd.reshape(n, w, WORD_BITS)
    shifts_b = jnp.arange(WORD_BITS, dtype=jnp.uint32)
    # Bits are disjoint, so the sum of shifted bits is their bitwise OR.
    return jnp.sum(bits_nwb << shifts_b, axis=-1, dtype=jnp.uint32)


def unpack_bits(codes_nw, dim: int):
    """Inverse of ``pack_bits``: uint32 [N, W] -> bool [N, dim] (True where the bit is set)."""
    codes_nw = jnp.asarray(codes_nw)
    _check_codes(codes_nw, "codes_nw")
    if num_words(dim) != codes_nw.shape[1]:
        raise ValueError(
            f"dim={dim} needs {num_words(dim)} words but codes_nw has {codes_nw.shape[1]}; pass the original dimension"
        )
    shifts_b = jnp.arange(WORD_BITS, dtype=jnp.uint32)
    bits_nwb = (codes_nw[:, :, None] >> shifts_b) & jnp.uint32(1)
    return bits_nwb.reshape(codes_nw.shape[0], -1)[:, :dim].astype(bool)


def bits_to_signs(codes_nw, dim: int, dtype=jnp.float32):
    """uint32 codes [N, W] -> {-1, +1} vectors [N, dim] (set bit -> +1)."""
    return jnp.where(unpack_bits(codes_nw, dim), 1, -1).astype(dtype)


def _check_codes(codes, name: str):
    _check_matrix(codes, name)
    if codes.dtype != np.uint32:
        raise TypeError(f"{name} must be uint32 packed codes (see embedjax.quant.pack_bits); got dtype {codes.dtype}")


def hamming_distances(q_codes_qw, x_codes_nw):
    """All-pairs Hamming distances, int32 [Q, N] (plain jnp; for small inputs and references)."""
    q = jnp.asarray(q_codes_qw)
    x = jnp.asarray(x_codes_nw)
    _check_codes(q, "q_codes_qw")
    _check_codes(x, "x_codes_nw")
    if q.shape[1] != x.shape[1]:
        raise ValueError(f"code widths differ: queries have {q.shape[1]} words, corpus {x.shape[1]}")
    return jnp.sum(lax.population_count(q[:, None, :] ^ x[None, :, :]).astype(jnp.int32), axis=-1)


# --- converters (numpy: these are storage formats, not traced computations) ---


def _byte_bits(codes_nw: np.ndarray, dim: int) -> np.ndarray:
    """uint32 codes -> bool [N, dim] in numpy."""
    codes_nw = np.asarray(codes_nw)
    _check_codes(codes_nw, "codes_nw")
    if num_words(dim) != codes_nw.shape[1]:
        raise ValueError(f"dim={dim} needs {num_words(dim)} words but codes_nw has {codes_nw.shape[1]}")
    shifts = np.arange(WORD_BITS, dtype=np.uint32)
    bits = (codes_nw[:, :, None] >> shifts) & np.uint32(1)
    return bits.reshape(codes_nw.shape[0], -1)[:, :dim].astype(bool)


def _bits_to_codes(bits_nd: np.ndarray) -> np.ndarray:
    n, d = bits_nd.shape
    w = num_words(d)
    padded = np.zeros((n, w * WORD_BITS), dtype=np.uint32)
    padded[:, :d] = bits_nd
    shifts = np.arange(WORD_BITS, dtype=np.uint32)
    return np.bitwise_or.reduce(padded.reshape(n, w, WORD_BITS) << shifts, axis=-1).astype(np.uint32)


def to_numpy_packbits(codes_nw, dim: int) -> np.ndarray:
    """embedjax codes -> ``np.packbits(x > 0, axis=-1)`` layout (uint8 [N, ceil(dim/8)], big bit order).

    This is sentence-transformers' ``ubinary`` precision.
    """
    return np.packbits(_byte_bits(codes_nw, dim), axis=-1)


def from_numpy_packbits(packed_nb, dim: int) -> np.ndarray:
    """``np.packbits`` / sentence-transformers ``ubinary`` uint8 [N, ceil(dim/8)] -> uint32 codes."""
    packed_nb = np.asarray(packed_nb)
    _check_matrix(packed_nb, "packed_nb")
    if packed_nb.dtype != np.uint8:
        raise TypeError(f"packed_nb must be uint8 (np.packbits output); got {packed_nb.dtype}")
    if packed_nb.shape[1] != -(-dim // 8):
        raise ValueError(f"dim={dim} needs {-(-dim // 8)} bytes but packed_nb has {packed_nb.shape[1]}")
    return _bits_to_codes(np.unpackbits(packed_nb, axis=-1)[:, :dim].astype(bool))


def to_st_binary(codes_nw, dim: int) -> np.ndarray:
    """embedjax codes -> sentence-transformers ``binary`` precision (int8 = ubinary - 128)."""
    return (to_numpy_packbits(codes_nw, dim).astype(np.int16) - 128).astype(np.int8)


def from_st_binary(binary_nb, dim: int) -> np.ndarray:
    """sentence-transformers ``binary`` int8 [N, ceil(dim/8)] -> uint32 codes."""
    binary_nb = np.asarray(binary_nb)
    if binary_nb.dtype != np.int8:
        raise TypeError(f"binary_nb must be int8 (sentence-transformers 'binary'); got {binary_nb.dtype}")
    return from_numpy_packbits((binary_nb.astype(np.int16) + 128).astype(np.uint8), dim)


def to_faiss_bytes(codes_nw, dim: int) -> np.ndarray:
    """embedjax codes -> FAISS binary layout uint8 [N, dim/8] (``IndexBinaryFlat``, ``fvec2bitvec``).

    FAISS needs ``dim`` to be a multiple of 8.
    """
    if dim % 8:
        raise ValueError(f"FAISS binary codes need dim to be a multiple of 8; got dim={dim}")
    codes_nw = np.asarray(codes_nw)
    _check_codes(codes_nw, "codes_nw")
    shifts = np.array([0, 8, 16, 24], dtype=np.uint32)
    bytes_nw4 = ((codes_nw[:, :, None] >> shifts) & np.uint32(0xFF)).astype(np.uint8)
    return np.ascontiguousarray(bytes_nw4.reshape(codes_nw.shape[0], -1)[:, : dim // 8])


def from_faiss_bytes(bytes_nb, dim: int) -> np.ndarray:
    """FAISS binary layout uint8 [N, dim/8] -> uint32 codes."""
    bytes_nb = np.asarray(bytes_nb)
    _check_matrix(bytes_nb, "bytes_nb")
    if bytes_nb.dtype != np.uint8:
        raise TypeError(f"bytes_nb must be uint8; got {bytes_nb.dtype}")
    if dim % 8 or bytes_nb.shape[1] != dim // 8:
        raise ValueError(f"dim={dim} must be a multiple of 8 matching bytes_nb width {bytes_nb.shape[1]} * 8")
    bits = np.unpackbits(bytes_nb, axis=-1, bitorder="little")[:, :dim].astype(bool)
    return _bits_to_codes(bits)

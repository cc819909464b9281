"""Deterministic 32-bit hashes of categorical ids: the same buckets on every host and backend.

Python's ``hash()`` is salted per process and ``numpy.random`` streams depend on call order,
so neither may decide where an id lives in a table that several hosts share. These hashes use
only wrapping uint32 arithmetic (xor, shifts, multiplies), which XLA and NumPy compute
bit-identically on every CPU, GPU and TPU. The definition (all arithmetic modulo 2**32):

    fmix32(k):  k ^= k >> 16; k *= 0x85EBCA6B; k ^= k >> 13; k *= 0xC2B2AE35; k ^= k >> 16
                (the MurmurHash3 finaliser: a bijection of uint32 with full avalanche)
    probe_seed(field, probe, hash_seed) = hash_seed * 2**16 + field * 2**8 + probe
                (field < 256, probe < 256, hash_seed < 2**16: every (field, probe) pair of a table
                 has its own seed)
    hash32(id, seed) = fmix32(id ^ fmix32(seed + 0x9E3779B9))
    bucket(id, seed, m) = hash32(id, seed) mod m

``id`` is a non-negative int32 read as uint32. Because ``id -> hash32(id, seed)`` is a bijection,
two ids collide in a bucket only through the final ``mod m``.
"""
from __future__ import annotations

import numpy as np

MAX_FIELDS = 256
MAX_PROBES = 256
MAX_HASH_SEED = 1 << 16
_GOLDEN = 0x9E3779B9
_C1 = 0x85EBCA6B
_C2 = 0xC2B2AE35


def probe_seed(field: int, probe: int, hash_seed: int = 0) -> int:
    """The documented seed of probe ``probe`` of field ``field`` (a Python int < 2**32)."""
    for name, value, limit in (("field", field, MAX_FIELDS), ("probe", probe, MAX_PROBES),
                               ("hash_seed", hash_seed, MAX_HASH_SEED)):
        if not 0 <= value < limit:
            raise ValueError(f"{name}={value} must be in [0, {limit}) for probe_seed")
    return hash_seed * (1 << 16) + field * (1 << 8) + probe


def _fmix32(k, xp):
    k = k ^ (k >> xp.uint32(16))
    k = k * xp.uint32(_C1)
    k = k ^ (k >> xp.uint32(13))
    k = k * xp.uint32(_C2)
    return k ^ (k >> xp.uint32(16))


def _hash32(ids, seed: int, xp):
    key = _fmix32(xp.asarray((seed + _GOLDEN) & 0xFFFFFFFF, dtype=xp.uint32), xp)
    return _fmix32(ids.astype(xp.uint32) ^ key, xp)


def hash32(ids, seed: int):
    """uint32 hash of non-negative int ids (jax or numpy arrays; same array kind back)."""
    if isinstance(ids, np.ndarray):
        with np.errstate(over="ignore"):
            return _hash32(ids, seed, np)
    import jax.numpy as jnp

    return _hash32(ids, seed, jnp)


def bucket(ids, seed: int, num_buckets: int):
    """int32 bucket in [0, num_buckets) of each id (jax or numpy arrays)."""
    if not 0 < num_buckets < (1 << 31):
        raise ValueError(f"num_buckets={num_buckets} must be in [1, 2**31)")
    h = hash32(ids, seed)
    if isinstance(h, np.ndarray):
        return (h % np.uint32(num_buckets)).astype(np.int32)
    import jax.numpy as jnp

    return (h % jnp.uint32(num_buckets)).astype(jnp.int32)


def hash32_python(id_: int, seed: int) -> int:
    """The same hash in plain Python integers (a third implementation, for tests and docs)."""
    def fmix(k: int) -> int:
        k ^= k >> 16
        k = (k * _C1) & 0xFFFFFFFF
        k ^= k >> 13
        k = (k * _C2) & 0xFFFFFFFF
        return k ^ (k >> 16)

    return fmix((id_ & 0xFFFFFFFF) ^ fmix((seed + _GOLDEN) & 0xFFFFFFFF))

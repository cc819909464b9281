"""Timing and roofline ceilings shared by the accelerator benchmarks.

Device work is asynchronous, so every timed call ends in ``jax.block_until_ready``;
the first call (compilation, autotuning) is never timed. The ceilings are measured
on the device in the same run as the code they judge, because datasheet rates are
only leads (a board's clocks, memory and power limit move them).
"""
from __future__ import annotations

import time
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np


def seconds_once(fn: Callable[[], object]) -> float:
    """Wall time of one ``fn()``, until its result is ready."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def interleaved_seconds(calls: Mapping[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Wall times (`seconds_once`) of every call in ``calls``, each once per round in the mapping's
    order, over ``rounds`` rounds: background load and a VM's drift then touch every call alike,
    and round r's times pair up across calls."""
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            times[name].append(seconds_once(fn))
    return times


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    return float(np.median([seconds_once(fn) for _ in range(max(1, repeats))]))


def copy_bandwidth_gbs(nbytes: int, repeats: int = 10) -> float:
    """Device memory bandwidth in GB/s from an elementwise pass over ``nbytes`` of uint32.

    ``x ^ 1`` reads and writes every word once and cannot be elided by XLA; the bytes
    counted are those read plus those written (2 * nbytes).
    """
    words = max(1, nbytes // 4)
    x = jax.random.bits(jax.random.key(0), (words,), jnp.uint32)
    flip = jax.jit(lambda v: v ^ jnp.uint32(1))
    seconds = median_seconds(lambda: flip(x), repeats)
    return 2 * words * 4 / seconds / 1e9


def matmul_tflops(size: int, dtype=jnp.bfloat16, repeats: int = 10) -> float:
    """Dense ``size``^3 matrix product rate in TFLOP/s on random (never zero) operands."""
    ka, kb = jax.random.split(jax.random.key(1))
    a = jax.random.normal(ka, (size, size), jnp.float32).astype(dtype)
    b = jax.random.normal(kb, (size, size), jnp.float32).astype(dtype)
    product = jax.jit(lambda u, v: u @ v)
    seconds = median_seconds(lambda: product(a, b), repeats)
    return 2 * size ** 3 / seconds / 1e12


def popcount_tops(words: int = 1 << 22, per_word: int = 64, repeats: int = 10) -> float:
    """Population counts per second (x 1e12) of an XLA program that loads each uint32 word once
    and counts the bits of ``per_word`` XORs of it with distinct constants: compute bound (64
    popcounts per 4 bytes), so the rate is the device's popcount throughput as XLA reaches it,
    the ceiling of a Hamming scan with many queries (one popcount per query and corpus word)."""
    x = jax.random.bits(jax.random.key(2), (max(1, words),), jnp.uint32)
    constants = jnp.arange(per_word, dtype=jnp.uint32) * jnp.uint32(0x9E3779B9)
    count = jax.jit(lambda v: jnp.sum(jax.lax.population_count(v[:, None] ^ constants[None, :]), dtype=jnp.uint32))
    seconds = median_seconds(lambda: count(x), repeats)
    return x.size * per_word / seconds / 1e12


def sig(value: float, digits: int = 4) -> float:
    """``value`` rounded to ``digits`` significant digits (tiny CPU rates must not print as 0.0)."""
    return float(f"{value:.{digits}g}")

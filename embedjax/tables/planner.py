"""Size any table method to a memory budget: ``build(method, vocab_sizes, dim, budget, **options)``.

The budget is a fraction of the full float32 table (``sum(vocab_sizes) * dim * 4`` bytes) and
bounds the method's **serving** bytes (what lookups need after training; `TableMethod.serve_bytes`).
Each method spends it as follows (fields are sized with a common cap where noted: the largest
``c`` such that giving every field ``min(needed rows, c)`` rows fits; a field that gets all the
rows it needs is addressed directly, the others are hashed):

- ``full``: budget 1 only.
- ``hash``: float32 rows of width d, one probe per field, capped per field.
- ``multiprobe``: ``probes`` hashes per field (``combine`` sum: width d; concat: width d / probes),
  capped per field.
- ``multiplex``: Unified Embedding: one shared table of width d / probes, all fields hashed into it.
- ``lowbit``: ``storage`` int8 / int4 / fp8 rows (+ a float32 scale each), capped per field.
- ``qr``: fields up to the cap are stored whole, the others with m = ceil(sqrt(vocab)) remainder rows.
- ``tt``: the largest rank r such that compressing every field whose TT cores at rank r are smaller
  than its table (the rest stay whole) fits.
- ``mde``: the largest power-of-two low dimension at which every id fits, then full-dimension rows for
  the first ids of each field (the most frequent), in proportion to the field's vocab.
- ``magnitude`` / ``pep``: as many float32 entries as fit beside a bitmap over all entries;
  ``optembed``: as many rows as fit beside a bitmap over all rows.

A budget a method cannot meet raises ValueError naming the smallest budget it can.
"""
from __future__ import annotations

import math
from typing import Sequence

from embedjax.tables import codecs
from embedjax.tables.base import FLOAT_BYTES, TableMethod, full_table_bytes
from embedjax.tables.compositional import QuotientRemainderTable, TensorTrainTable, balanced_factors, exact_factors
from embedjax.tables.hashed import HashedTable
from embedjax.tables.mixed_dim import MixedDimTable
from embedjax.tables.pruned import PrunedTable

# method -> the options it reads (besides vocab_sizes, dim, budget, row_multiple, init_scale)
METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    "full": (),
    "hash": ("hash_seed",),
    "multiprobe": ("probes", "combine", "hash_seed"),
    "multiplex": ("probes", "hash_seed"),
    "lowbit": ("storage", "update", "hash_seed"),
    "qr": (),
    "tt": (),
    "mde": (),
    "magnitude": (),
    "pep": (),
    "optembed": (),
}
METHODS = tuple(METHOD_OPTIONS)
MAX_TT_RANK = 64


class BudgetTooSmall(ValueError):
    """The budget cannot hold even the smallest table of the method."""


def _too_small(method: str, budget: float, budget_bytes: int, full: int, need: int, what: str) -> BudgetTooSmall:
    return BudgetTooSmall(
        f"budget {budget:g} ({budget_bytes} of the {full} bytes of the full table) is too small for {method}: "
        f"{what} needs {need} bytes (budget >= {need / full:.3g}); raise the budget or choose another method")


def cap_allocation(needed: Sequence[int], total: int) -> tuple[int, ...] | None:
    """Rows per field ``min(needed_f, c)`` for the largest c whose sum is <= total (None if c < 1)."""
    if total < len(needed):
        return None
    lo, hi = 1, max(needed)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(n, mid) for n in needed) <= total:
            lo = mid
        else:
            hi = mid - 1
    return tuple(min(n, lo) for n in needed)


def _check_options(method: str, options: dict) -> None:
    if method not in METHOD_OPTIONS:
        raise ValueError(f"unknown table method {method!r}; choose one of {METHODS}")
    common = {"row_multiple", "init_scale"}
    unknown = sorted(set(options) - set(METHOD_OPTIONS[method]) - common)
    if unknown:
        raise ValueError(f"table method {method!r} takes no option(s) {unknown}; it reads "
                         f"{sorted(METHOD_OPTIONS[method]) or 'none'} (besides budget and dim)")


def build(method: str, vocab_sizes: Sequence[int], dim: int, budget: float, **options) -> TableMethod:
    """The ``method`` table for these fields with serving bytes <= budget * full table bytes."""
    _check_options(method, options)
    vocab = tuple(int(v) for v in vocab_sizes)
    if not vocab or min(vocab) < 1:
        raise ValueError(f"vocab_sizes={list(vocab_sizes)} must be a non-empty list of positive sizes")
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget={budget} must be a fraction of the full table in (0, 1]")
    full = full_table_bytes(vocab, dim)
    budget_bytes = int(math.floor(budget * full))
    common = {k: options.pop(k) for k in ("row_multiple", "init_scale") if k in options}
    base = dict(vocab_sizes=vocab, dim=dim, **common)
    num_fields = len(vocab)

    if method == "full":
        if budget < 1.0:
            raise _too_small(method, budget, budget_bytes, full, full, "the full table")
        return HashedTable(buckets=vocab, method="full", **base)

    if method in ("hash", "multiprobe", "lowbit"):
        probes = options.get("probes", 2) if method == "multiprobe" else 1
        combine = options.get("combine", "sum") if method == "multiprobe" else "sum"
        storage = options.get("storage", "int8") if method == "lowbit" else "float32"
        update = options.get("update", "stochastic") if method == "lowbit" else "exact"
        if combine == "concat" and dim % probes:
            raise ValueError(f"multiprobe with concatenated probes needs probes ({probes}) dividing dim ({dim})")
        width = dim if combine == "sum" else dim // probes
        per_row = codecs.bytes_per_row(storage, width)
        needed = [v * (probes if combine == "concat" else 1) for v in vocab]
        buckets = cap_allocation(needed, budget_bytes // per_row)
        if buckets is None:
            raise _too_small(method, budget, budget_bytes, full, num_fields * per_row, "one row per field")
        return HashedTable(buckets=buckets, probes=probes, combine=combine, storage=storage, update=update,
                           hash_seed=options.get("hash_seed", 0), method=method, **base)

    if method == "multiplex":
        probes = options.get("probes", 2)
        if dim % probes:
            raise ValueError(f"multiplex concatenates probes: probes ({probes}) must divide dim ({dim})")
        per_row = (dim // probes) * FLOAT_BYTES
        rows = budget_bytes // per_row
        if rows < 1:
            raise _too_small(method, budget, budget_bytes, full, per_row, "one shared row")
        return HashedTable(buckets=(rows,), probes=probes, combine="concat", shared=True,
                           hash_seed=options.get("hash_seed", 0), method="multiplex", **base)

    if method == "qr":
        return _plan_qr(vocab, dim, budget, budget_bytes, full, base)
    if method == "tt":
        return _plan_tt(vocab, dim, budget, budget_bytes, full, base)
    if method == "mde":
        return _plan_mde(vocab, dim, budget, budget_bytes, full, base)
    return _plan_pruned(method, vocab, dim, budget, budget_bytes, full, base)


def _plan_qr(vocab, dim, budget, budget_bytes, full, base) -> QuotientRemainderTable:
    def remainders(cap: int) -> tuple[int, ...]:
        return tuple(1 if v <= cap else max(1, math.ceil(math.sqrt(v))) for v in vocab)

    def cost(ms) -> int:
        return sum(math.ceil(v / m) + m for v, m in zip(vocab, ms)) * dim * FLOAT_BYTES

    if cost(remainders(0)) > budget_bytes:
        raise _too_small("qr", budget, budget_bytes, full, cost(remainders(0)),
                         "every field split into sqrt(vocab) quotient and remainder rows")
    best = 0
    for cap in sorted(set(vocab)):
        if cost(remainders(cap)) <= budget_bytes:
            best = cap
    return QuotientRemainderTable(remainders=remainders(best), **base)


def tt_field_bytes(vocab_size: int, dim: int, rank: int) -> int:
    v1, v2, v3 = balanced_factors(vocab_size)
    d1, d2, d3 = exact_factors(dim)
    return (v1 * d1 * rank + v2 * rank * d2 * rank + v3 * rank * d3) * FLOAT_BYTES


def _plan_tt(vocab, dim, budget, budget_bytes, full, base) -> TensorTrainTable:
    def layout(rank: int):
        flags = tuple(tt_field_bytes(v, dim, rank) < v * dim * FLOAT_BYTES for v in vocab)
        total = sum(tt_field_bytes(v, dim, rank) if f else v * dim * FLOAT_BYTES for v, f in zip(vocab, flags))
        return flags, total

    flags, total = layout(1)
    if total > budget_bytes:
        raise _too_small("tt", budget, budget_bytes, full, total, "rank-1 tensor-train cores")
    rank = 1
    for r in range(2, MAX_TT_RANK + 1):
        flags_r, total_r = layout(r)
        if total_r > budget_bytes or not any(flags_r):
            break
        rank, flags = r, flags_r
    return TensorTrainTable(rank=rank, tt_fields=flags, **base)


def _plan_mde(vocab, dim, budget, budget_bytes, full, base) -> MixedDimTable:
    total = sum(vocab)
    low = dim // 2 if dim > 1 else 0
    while low >= 1:
        cold_all = (total * low + len(vocab) * low * dim) * FLOAT_BYTES
        if cold_all <= budget_bytes:
            hot_rows = (budget_bytes - cold_all) // ((dim - low) * FLOAT_BYTES)
            hot = tuple(min(v, hot_rows * v // total) for v in vocab)
            return MixedDimTable(hot=hot, low_dim=low, **base)
        low //= 2
    need = (total + len(vocab) * dim) * FLOAT_BYTES
    raise _too_small("mde", budget, budget_bytes, full, need, "one dimension per id (plus the projections)")


def _plan_pruned(method, vocab, dim, budget, budget_bytes, full, base) -> PrunedTable:
    rows = sum(vocab)
    if method == "optembed":
        bitmap, per = math.ceil(rows / 8), dim * FLOAT_BYTES
    else:
        bitmap, per = math.ceil(rows * dim / 8), FLOAT_BYTES
    keep = (budget_bytes - bitmap) // per
    if keep < 1:
        unit = "row" if method == "optembed" else "entry"
        raise _too_small(method, budget, budget_bytes, full, bitmap + per, f"the bitmap plus one kept {unit}")
    limit = rows * (1 if method == "optembed" else dim)
    return PrunedTable(keep=min(keep, limit), method=method, **base)

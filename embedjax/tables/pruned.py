"""Pruned tables: magnitude pruning, PEP-style learned thresholds, OptEmbed-style learned row masks.

All three train a full float32 table with a frozen mask beside it (``mask`` row table, 1 byte per
entry, or per row for row pruning) and end with at most ``keep`` entries (rows) left:

- ``magnitude``: gradual magnitude pruning (Zhu & Gupta 2017): at ``events`` evenly spaced steps
  after ``start`` up to ``end`` (fractions of training) the mask keeps the largest |w| of the
  entries still alive, the density following the cubic ramp from 1 at ``start`` to keep / entries
  at ``end``; the pruned entries are zeroed.
- ``pep``: in the search phase every entry is soft-thresholded with a learned threshold per
  (field, dimension), ``sign(w) * relu(|w| - sigmoid(s))`` (Liu et al. 2021, "Learnable Embedding
  Sizes for Recommender Systems"); at the switch the entries the thresholds zeroed are pruned, then
  the largest survivors are kept if more than ``keep`` remain, and training continues with the
  mask fixed (without PEP's rewinding to the initial weights).
- ``optembed``: a row is gated by ``mean|w_row| > t_field`` with a learned threshold per field and a
  straight-through gradient for the step function, and ``alpha * mean(exp(-t))`` pushes the
  thresholds up (the row-pruning half of Lyu et al. 2022, "OptEmbed"; no dimension search); at the
  switch the gated-off rows are pruned, then the rows with the largest margin are kept if more than
  ``keep`` remain.

Serving stores a bitmap over the entries (rows) and the kept float32 values (rows):
``ceil(entries / 8) + 4 * kept`` bytes (``ceil(rows / 8) + 4 * d * kept_rows``).
Pruning events read the whole table (counts reduce over the shards; no table moves).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from embedjax.tables.base import DenseParam, RowTable, TableMethod

PRUNE_METHODS = ("magnitude", "pep", "optembed")


def kth_largest_cut(values: jax.Array, k) -> jax.Array:
    """int32 bit pattern T such that ``bits(values) > T`` selects the largest entries, at most ``k``
    of them (exactly k unless values tie at the cut). ``values`` must be >= 0 (float32, any shape,
    sharded or not); zeros are never selected when k < the number of entries.

    Non-negative float32 order equals the order of their int32 bit patterns, so a 32-step
    bisection over bit patterns finds the cut with only counts (scalar reductions) per step.
    """
    bits = jax.lax.bitcast_convert_type(values.astype(jnp.float32), jnp.int32)
    k = jnp.asarray(k, jnp.int32)

    def count_above(t):
        return jnp.sum(bits > t, dtype=jnp.int32)

    def body(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        ok = count_above(mid) <= k
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    lo, hi = jnp.int32(-1), jnp.int32(0x7F800000)  # count(> -1) = all entries; count(> +inf bits) = 0
    lo, hi = jax.lax.fori_loop(0, 33, body, (lo, hi))
    return jnp.where(count_above(jnp.int32(-1)) <= k, jnp.int32(-1), hi)


def keep_largest(values: jax.Array, k) -> jax.Array:
    """bool mask of the (at most) k largest entries of non-negative ``values``."""
    cut = kth_largest_cut(values, k)
    return jax.lax.bitcast_convert_type(values.astype(jnp.float32), jnp.int32) > cut


def soft_threshold(w, threshold):
    return jnp.sign(w) * jax.nn.relu(jnp.abs(w) - threshold)


def step_straight_through(x):
    """1[x > 0] forward; gradient 1 backward (the straight-through estimator)."""
    return x + jax.lax.stop_gradient((x > 0).astype(x.dtype) - x)


@dataclasses.dataclass(frozen=True)
class PrunedTable(TableMethod):
    keep: int = 1  # entries (magnitude, pep) or rows (optembed) left after pruning
    init_scale: float = 0.01
    start: float = 0.2  # magnitude: first event (fraction of training); pep/optembed: switch = search_until
    end: float = 0.6
    events: int = 8
    search_until: float = 0.5
    pep_init: float = -15.0  # PEP threshold logit: sigmoid(-15) ~ 3e-7 (prunes nothing at first)
    optembed_alpha: float = 1e-4
    method: str = "magnitude"

    def __post_init__(self):
        super().__post_init__()
        if self.method not in PRUNE_METHODS:
            raise ValueError(f"pruned table method={self.method!r}: choose one of {PRUNE_METHODS}")
        if not 1 <= self.keep <= self.prunable():
            raise ValueError(f"keep={self.keep} must be in [1, {self.prunable()}] ({self.unit}s of the table)")
        if not (0.0 <= self.start <= self.end < 1.0 and 0.0 < self.search_until < 1.0 and self.events >= 1):
            raise ValueError(f"pruning schedule start={self.start}, end={self.end}, search_until="
                             f"{self.search_until}, events={self.events}: need 0 <= start <= end < 1, "
                             "0 < search_until < 1, events >= 1")

    @property
    def phases(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("masked",) if self.method == "magnitude" else ("search", "masked")

    @property
    def unit(self) -> str:
        return "row" if self.method == "optembed" else "entry"

    @property
    def rows(self) -> int:
        return sum(self.vocab_sizes)

    def prunable(self) -> int:
        return self.rows * (1 if self.unit == "row" else self.dim)

    def row_tables(self) -> tuple[RowTable, ...]:
        mask_width = 1 if self.unit == "row" else self.dim
        return (RowTable("embedding", self.rows, self.dim, init_scale=self.init_scale, row_multiple=self.row_multiple),
                RowTable("mask", self.rows, mask_width, codec="mask", init="true", trainable=False,
                         row_multiple=self.row_multiple))

    def dense_params(self) -> dict[str, DenseParam]:
        if self.method == "pep":
            return {"threshold": DenseParam((self.num_fields, self.dim), init="constant", init_scale=self.pep_init)}
        if self.method == "optembed":
            return {"threshold": DenseParam((self.num_fields,), init="constant", init_scale=0.0)}
        return {}

    def serve_bytes(self, kept: int | None = None) -> int:
        kept = self.keep if kept is None else kept
        per = 4 * self.dim if self.unit == "row" else 4
        return math.ceil(self.prunable() / 8) + per * kept

    def describe(self) -> dict:
        out = super().describe()
        out.update({"keep": self.keep, "unit": self.unit, "prunable": self.prunable()})
        return out

    # ------------------------------------------------------------ lookup
    def indices(self, ids_bf) -> dict:
        ids_bf = jnp.asarray(ids_bf)
        off = jnp.asarray(np.concatenate([[0], np.cumsum(self.vocab_sizes)[:-1]]), jnp.int32)[None, :]
        rows = (off + ids_bf)[..., None]
        return {"embedding": rows, "mask": rows}

    def compose(self, rows: Mapping, dense: Mapping, ids_bf, phase: str = "masked"):
        self.check_phase(phase)
        w = rows["embedding"][:, :, 0]
        mask = rows["mask"][:, :, 0]
        if phase == "masked":
            return w * mask
        if self.method == "pep":
            return soft_threshold(w, jax.nn.sigmoid(dense["threshold"])[None]) * mask
        norm = jnp.mean(jnp.abs(w), axis=-1, keepdims=True)
        gate = step_straight_through(norm - dense["threshold"][None, :, None])
        return w * mask * gate

    def regularizer(self, dense: Mapping):
        if self.method == "optembed":
            return self.optembed_alpha * jnp.mean(jnp.exp(-dense["threshold"]))
        return 0.0

    # ------------------------------------------------------------ pruning
    def switch_step(self, num_steps: int) -> int:
        """First step trained in the masked phase (pep, optembed)."""
        return max(1, min(num_steps - 1, int(round(self.search_until * num_steps))))

    def phase_at(self, step: int, num_steps: int) -> str:
        if self.method == "magnitude" or step >= self.switch_step(num_steps):
            return "masked"
        return "search"

    def pruning_schedule(self, num_steps: int) -> dict[int, int]:
        """{step: entries (rows) to keep}: pruning happens before that step's update."""
        if self.method != "magnitude":
            return {self.switch_step(num_steps): self.keep}
        total = self.prunable()
        final_density = self.keep / total
        out = {}
        for i in range(self.events):
            frac = (i + 1) / self.events  # the ramp leaves density 1 at `start`; event i reaches frac
            step = int(round((self.start + (self.end - self.start) * frac) * num_steps))
            density = final_density + (1.0 - final_density) * (1.0 - frac) ** 3
            keep = self.keep if i == self.events - 1 else max(self.keep, int(round(density * total)))
            out[min(max(step, 0), max(num_steps - 1, 0))] = keep
        return out

    def row_fields(self, physical_rows: int) -> jax.Array:
        """int32 [physical_rows]: the field of each row (padding rows: field 0; their mask is off)."""
        fields = np.repeat(np.arange(self.num_fields, dtype=np.int32), self.vocab_sizes)
        return jnp.asarray(np.pad(fields, (0, physical_rows - fields.size)))

    def prune(self, tables: Mapping, dense: Mapping, keep: int) -> dict:
        """New {"embedding", "mask"} stored arrays with at most ``keep`` entries (rows) alive."""
        w = tables["embedding"]["w"]
        mask = tables["mask"]["mask"]
        if self.method == "magnitude":
            new_mask = keep_largest(jnp.abs(w) * mask, keep)
            new_w = w * new_mask
        elif self.method == "pep":
            thr = jax.nn.sigmoid(dense["threshold"])[self.row_fields(w.shape[0])]
            soft = soft_threshold(w, thr) * mask
            new_mask = keep_largest(jnp.abs(soft), keep)
            new_w = soft * new_mask
        else:
            norm = jnp.mean(jnp.abs(w), axis=-1)
            margin = norm - dense["threshold"][self.row_fields(w.shape[0])]
            alive = (margin > 0) & mask[:, 0]
            new_mask = keep_largest(jnp.where(alive, margin, 0.0), keep)[:, None]
            new_w = w * new_mask
        return {"embedding": {"w": new_w}, "mask": {"mask": new_mask}}

    def kept(self, tables: Mapping) -> int:
        """Entries (rows) alive in the mask, counting logical rows only."""
        return int(jnp.sum(tables["mask"]["mask"][: self.rows]))

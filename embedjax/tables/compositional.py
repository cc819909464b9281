"""Compositional tables: quotient-remainder (Shi et al. 2020) and tensor-train cores (TT-Rec, Yin et al. 2021).

Both give every id of a compressed field its own embedding (no collisions) from a few small row
tables, so ids must be < the field's vocab size.

Quotient-remainder: a field with ``m`` remainder rows reads quotient row ``id // m`` and remainder
row ``id % m`` and multiplies them elementwise (the paper's "mult" operation). A field left whole
has m = 1: its quotient rows are its full table and its single remainder row a learned rescaling.
Remainder rows start at 1, so training starts from the quotient embeddings.

Tensor train: a compressed field's table [v, d] is the TT matrix of three cores with
v <= v1 * v2 * v3 and d = d1 * d2 * d3,

    core1 [v1, d1, r], core2 [v2, r, d2, r], core3 [v3, r, d3]
    row(id) = reshape(einsum("ar,rbs,sc->abc", core1[i1], core2[i2], core3[i3]), d)
    with id = (i1 * v2 + i2) * v3 + i3,

each core a row table (row i of core k holds its [.., r] slice, flattened). Fields too small to
gain stay whole in a plain table. Core entries start at N(0, s) with s = (sigma^2 / r^2)^(1/6),
so a reconstructed entry has standard deviation sigma.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import jax.numpy as jnp
import numpy as np

from embedjax.tables.base import RowTable, TableMethod, offsets


@dataclasses.dataclass(frozen=True)
class QuotientRemainderTable(TableMethod):
    remainders: tuple[int, ...] = ()  # m per field; 1 = the field is stored whole
    init_scale: float = 0.01
    method: str = "qr"

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "remainders", tuple(int(m) for m in self.remainders))
        if len(self.remainders) != self.num_fields or min(self.remainders, default=0) < 1:
            raise ValueError(f"remainders={self.remainders}: need one positive m per field ({self.num_fields})")
        for f, (m, v) in enumerate(zip(self.remainders, self.vocab_sizes)):
            if m > v:
                raise ValueError(f"field {f}: remainder count m={m} exceeds its vocab size {v}")

    def quotients(self) -> tuple[int, ...]:
        return tuple(math.ceil(v / m) for v, m in zip(self.vocab_sizes, self.remainders))

    def row_tables(self) -> tuple[RowTable, ...]:
        return (RowTable("quotient", sum(self.quotients()), self.dim, init_scale=self.init_scale,
                         row_multiple=self.row_multiple),
                RowTable("remainder", sum(self.remainders), self.dim, init="ones", row_multiple=self.row_multiple))

    def indices(self, ids_bf) -> dict:
        ids_bf = jnp.asarray(ids_bf)
        m = jnp.asarray(self.remainders, jnp.int32)[None, :]
        q_off = jnp.asarray(offsets(self.quotients()), jnp.int32)[None, :]
        r_off = jnp.asarray(offsets(self.remainders), jnp.int32)[None, :]
        return {"quotient": (q_off + ids_bf // m)[..., None], "remainder": (r_off + ids_bf % m)[..., None]}

    def compose(self, rows: Mapping, dense: Mapping, ids_bf, phase: str = "masked"):
        self.check_phase(phase)
        return rows["quotient"][:, :, 0] * rows["remainder"][:, :, 0]

    def describe(self) -> dict:
        out = super().describe()
        out["remainders"] = list(self.remainders)
        out["compressed_fields"] = sum(m > 1 for m in self.remainders)
        return out


def balanced_factors(n: int, parts: int = 3) -> tuple[int, ...]:
    """``parts`` integers, as equal as possible, whose product is >= n (for vocab sizes)."""
    out, rest = [], n
    for k in range(parts, 0, -1):
        f = max(1, math.ceil(rest ** (1.0 / k) - 1e-9))
        out.append(f)
        rest = math.ceil(rest / f)
    return tuple(out)


def exact_factors(d: int, parts: int = 3) -> tuple[int, ...]:
    """``parts`` integers whose product is exactly d, as equal as possible (for the embedding dim)."""
    best = None
    for a in range(1, d + 1):
        if d % a:
            continue
        for b in range(1, d // a + 1):
            if (d // a) % b:
                continue
            c = d // a // b
            shape = tuple(sorted((a, b, c)))
            if best is None or max(shape) - min(shape) < max(best) - min(best):
                best = shape
    return best if parts == 3 else (d,)


@dataclasses.dataclass(frozen=True)
class TensorTrainTable(TableMethod):
    rank: int = 1
    tt_fields: tuple[bool, ...] = ()  # per field: compressed with cores (True) or stored whole
    init_scale: float = 0.01
    method: str = "tt"

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "tt_fields", tuple(bool(t) for t in self.tt_fields))
        if len(self.tt_fields) != self.num_fields:
            raise ValueError(f"tt_fields needs one flag per field ({self.num_fields}); got {len(self.tt_fields)}")
        if self.rank < 1:
            raise ValueError(f"rank={self.rank} must be >= 1")

    @property
    def dim_factors(self) -> tuple[int, int, int]:
        return exact_factors(self.dim)

    def vocab_factors(self, field: int) -> tuple[int, int, int]:
        return balanced_factors(self.vocab_sizes[field])

    def core_rows(self, core: int) -> list[int]:
        return [self.vocab_factors(f)[core] if tt else 0 for f, tt in enumerate(self.tt_fields)]

    def core_widths(self) -> tuple[int, int, int]:
        d1, d2, d3 = self.dim_factors
        r = self.rank
        return d1 * r, r * d2 * r, r * d3

    def row_tables(self) -> tuple[RowTable, ...]:
        tables = []
        whole = sum(v for v, tt in zip(self.vocab_sizes, self.tt_fields) if not tt)
        if whole:
            tables.append(RowTable("whole", whole, self.dim, init_scale=self.init_scale,
                                   row_multiple=self.row_multiple))
        if any(self.tt_fields):
            s = (self.init_scale ** 2 / self.rank ** 2) ** (1.0 / 6.0)
            for k, width in enumerate(self.core_widths()):
                tables.append(RowTable(f"core{k + 1}", sum(self.core_rows(k)), width, init_scale=s,
                                       row_multiple=self.row_multiple))
        return tuple(tables)

    def indices(self, ids_bf) -> dict:
        ids_bf = jnp.asarray(ids_bf)
        names = {t.name: t for t in self.row_tables()}
        out = {}
        if "whole" in names:
            sizes = [0 if tt else v for v, tt in zip(self.vocab_sizes, self.tt_fields)]
            off = jnp.asarray(offsets(sizes), jnp.int32)[None, :]
            use = jnp.asarray([not tt for tt in self.tt_fields])[None, :]
            out["whole"] = jnp.where(use, off + ids_bf, names["whole"].sentinel)[..., None]
        if any(self.tt_fields):
            factors = np.asarray([self.vocab_factors(f) if tt else (1, 1, 1) for f, tt in enumerate(self.tt_fields)])
            v2, v3 = jnp.asarray(factors[:, 1])[None, :], jnp.asarray(factors[:, 2])[None, :]
            digits = (ids_bf // (v2 * v3), (ids_bf // v3) % v2, ids_bf % v3)
            use = jnp.asarray(self.tt_fields)[None, :]
            for k in range(3):
                off = jnp.asarray(offsets(self.core_rows(k)), jnp.int32)[None, :]
                out[f"core{k + 1}"] = jnp.where(use, off + digits[k], names[f"core{k + 1}"].sentinel)[..., None]
        return out

    def compose(self, rows: Mapping, dense: Mapping, ids_bf, phase: str = "masked"):
        self.check_phase(phase)
        out = None
        if any(self.tt_fields):
            d1, d2, d3 = self.dim_factors
            r = self.rank
            c1 = rows["core1"][:, :, 0].reshape(rows["core1"].shape[:2] + (d1, r))
            c2 = rows["core2"][:, :, 0].reshape(rows["core2"].shape[:2] + (r, d2, r))
            c3 = rows["core3"][:, :, 0].reshape(rows["core3"].shape[:2] + (r, d3))
            tt = jnp.einsum("bfar,bfrcs,bfse->bface", c1, c2, c3)
            out = tt.reshape(tt.shape[:2] + (self.dim,))
        if "whole" in rows:
            whole = rows["whole"][:, :, 0]
            out = whole if out is None else jnp.where(jnp.asarray(self.tt_fields)[None, :, None], out, whole)
        return out

    def describe(self) -> dict:
        out = super().describe()
        out.update({"rank": self.rank, "compressed_fields": sum(self.tt_fields), "dim_factors": list(self.dim_factors)})
        return out

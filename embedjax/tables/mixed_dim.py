"""Mixed-dimension embeddings by frequency (Ginart et al. 2021, "Mixed Dimension Embeddings").

Frequent ids get the full dimension d, the rest a smaller dimension ``d_low`` projected up to d by a
learned per-field matrix:

    emb(id) = hot[id]                 if id < hot_f
            = cold[id - hot_f] @ P_f  otherwise       (P_f: [d_low, d])

The tier of an id is read from the id itself: it assumes each field's ids are numbered by
descending training frequency, as the embedjax CTR builders number them
(`embedjax.data.ctr`), so no per-id lookup table is stored. Ids must be < the vocab size.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import jax.numpy as jnp

from embedjax.tables.base import DenseParam, RowTable, TableMethod, offsets


@dataclasses.dataclass(frozen=True)
class MixedDimTable(TableMethod):
    hot: tuple[int, ...] = ()  # per field: ids [0, hot_f) get the full dimension
    low_dim: int = 1
    init_scale: float = 0.01
    method: str = "mde"

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "hot", tuple(int(h) for h in self.hot))
        if len(self.hot) != self.num_fields or any(not 0 <= h <= v for h, v in zip(self.hot, self.vocab_sizes)):
            raise ValueError(f"hot={self.hot}: need one count in [0, vocab] per field (vocab {self.vocab_sizes})")
        if not 1 <= self.low_dim < self.dim:
            raise ValueError(f"low_dim={self.low_dim} must be in [1, dim={self.dim})")

    def cold(self) -> tuple[int, ...]:
        return tuple(v - h for v, h in zip(self.vocab_sizes, self.hot))

    def row_tables(self) -> tuple[RowTable, ...]:
        tables = []
        if sum(self.hot):
            tables.append(RowTable("hot", sum(self.hot), self.dim, init_scale=self.init_scale,
                                   row_multiple=self.row_multiple))
        if sum(self.cold()):
            # a cold row times a projection with entries ~N(0, 1/d_low) has entries of std ~init_scale
            tables.append(RowTable("cold", sum(self.cold()), self.low_dim, init_scale=self.init_scale,
                                   row_multiple=self.row_multiple))
        return tuple(tables)

    def dense_params(self) -> dict[str, DenseParam]:
        return {"projection": DenseParam((self.num_fields, self.low_dim, self.dim), init_scale=self.low_dim ** -0.5)}

    def indices(self, ids_bf) -> dict:
        ids_bf = jnp.asarray(ids_bf)
        hot = jnp.asarray(self.hot, jnp.int32)[None, :]
        names = {t.name: t for t in self.row_tables()}
        out = {}
        if "hot" in names:
            off = jnp.asarray(offsets(self.hot), jnp.int32)[None, :]
            out["hot"] = jnp.where(ids_bf < hot, off + ids_bf, names["hot"].sentinel)[..., None]
        if "cold" in names:
            off = jnp.asarray(offsets(self.cold()), jnp.int32)[None, :]
            out["cold"] = jnp.where(ids_bf >= hot, off + ids_bf - hot, names["cold"].sentinel)[..., None]
        return out

    def compose(self, rows: Mapping, dense: Mapping, ids_bf, phase: str = "masked"):
        self.check_phase(phase)
        out = 0.0
        if "hot" in rows:
            out = out + rows["hot"][:, :, 0]
        if "cold" in rows:
            out = out + jnp.einsum("bfl,fld->bfd", rows["cold"][:, :, 0], dense["projection"])
        return out

    def describe(self) -> dict:
        out = super().describe()
        out.update({"low_dim": self.low_dim, "hot_rows": sum(self.hot), "cold_rows": sum(self.cold())})
        return out

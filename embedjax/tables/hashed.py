"""Tables addressed by id or by hash: the full table, the hashing trick, multi-probe hashing,
Unified Embedding's feature multiplexing, and low-bit storage of any of them.

One class covers them all because they differ only in how many rows each field gets and how
an id picks its rows:

- a field whose segment has as many rows as it needs (``vocab`` rows, ``vocab * probes`` when
  probes are concatenated) is addressed directly: row = offset + id (ids must be < vocab);
- a smaller segment of ``m`` rows is hashed: probe j of field f reads row
  ``offset_f + bucket(id, probe_seed(f, j, hash_seed), m)`` (`embedjax.tables.hashing`);
- ``shared=True`` (feature multiplexing, Coleman et al. 2023 "Unified Embedding") gives every field
  the same single segment of rows, so all fields hash into one table, each with its own seeds.

Probes are summed (``combine="sum"``: rows of width d) or concatenated (``"concat"``: rows of width
d / probes, Unified Embedding's layout).

Low-bit storage (``storage`` int8 / int4 / fp8, `embedjax.tables.codecs`) trains in one of two ways:
``update="stochastic"`` stores only the codes and a per-row scale and re-encodes each updated row
with stochastic rounding (training memory = serving memory); ``update="straight_through"`` keeps
float32 master rows, quantises them in the forward pass and passes gradients straight through
(training memory = float32; serving memory = the codes).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import jax.numpy as jnp

from embedjax.tables import codecs, hashing
from embedjax.tables.base import RowTable, TableMethod, offsets

COMBINES = ("sum", "concat")
UPDATES = ("exact", "stochastic", "straight_through")


@dataclasses.dataclass(frozen=True)
class HashedTable(TableMethod):
    buckets: tuple[int, ...] = ()  # rows of each field's segment; (R,) when shared
    probes: int = 1
    combine: str = "sum"
    shared: bool = False
    hash_seed: int = 0
    storage: str = "float32"
    update: str = "exact"  # float32 storage: exact; low-bit: stochastic | straight_through
    init_scale: float = 0.01
    method: str = "hash"

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "buckets", tuple(int(b) for b in self.buckets))
        if self.combine not in COMBINES:
            raise ValueError(f"combine={self.combine!r}: choose one of {COMBINES}")
        if not 1 <= self.probes < hashing.MAX_PROBES:
            raise ValueError(f"probes={self.probes} must be in [1, {hashing.MAX_PROBES})")
        if self.combine == "concat" and self.dim % self.probes:
            raise ValueError(f"concatenated probes split dim={self.dim} into {self.probes} equal parts; "
                             "choose probes dividing dim")
        if self.num_fields > hashing.MAX_FIELDS:
            raise ValueError(f"hashed tables support at most {hashing.MAX_FIELDS} fields; got {self.num_fields}")
        expected = 1 if self.shared else self.num_fields
        if len(self.buckets) != expected or min(self.buckets, default=0) < 1:
            raise ValueError(f"buckets={self.buckets}: need {expected} positive row count(s) "
                             f"({'one shared table' if self.shared else 'one per field'})")
        if not self.shared:
            for f, (b, need) in enumerate(zip(self.buckets, self.needed_rows())):
                if b > need:
                    raise ValueError(f"field {f} gets {b} rows but needs at most {need}; give it {need} (direct "
                                     "addressing) or fewer (hashed)")
        if self.storage not in ("float32",) + codecs.LOW_BIT:
            raise ValueError(f"storage={self.storage!r}: choose float32 or one of {codecs.LOW_BIT}")
        allowed = ("exact",) if self.storage == "float32" else ("stochastic", "straight_through")
        if self.update not in allowed:
            raise ValueError(f"update={self.update!r} does not apply to {self.storage} storage; use one of {allowed}")

    # ------------------------------------------------------------ layout
    @property
    def width(self) -> int:
        return self.dim if self.combine == "sum" else self.dim // self.probes

    def needed_rows(self) -> tuple[int, ...]:
        """Rows a field needs to be addressed directly."""
        per_id = 1 if self.combine == "sum" else self.probes
        return tuple(v * per_id for v in self.vocab_sizes)

    def direct_fields(self) -> tuple[bool, ...]:
        if self.shared:
            return (False,) * self.num_fields
        return tuple(b == need for b, need in zip(self.buckets, self.needed_rows()))

    def bounded_fields(self) -> tuple[bool, ...]:
        return self.direct_fields()

    def stored_codec(self) -> str:
        return self.storage if self.update == "stochastic" else "float32"

    def row_tables(self) -> tuple[RowTable, ...]:
        rows = self.buckets[0] if self.shared else sum(self.buckets)
        return (RowTable("embedding", rows, self.width, codec=self.stored_codec(), init_scale=self.init_scale,
                         row_multiple=self.row_multiple),)

    def serve_bytes(self) -> int:
        table = self.row_tables()[0]
        return table.physical_rows * codecs.bytes_per_row(self.storage, self.width)

    def describe(self) -> dict:
        out = super().describe()
        out.update({"probes": self.probes, "combine": self.combine, "shared": self.shared, "storage": self.storage,
                    "update": self.update, "buckets": list(self.buckets),
                    "hashed_fields": sum(not d for d in self.direct_fields())})
        return out

    # ------------------------------------------------------------ lookup
    def field_rows(self, ids_b, field: int):
        """int32 [B, probes]: the rows field ``field`` reads for ids ``ids_b``."""
        direct = self.direct_fields()[field]
        start = 0 if self.shared else int(offsets(self.buckets)[field])
        m = self.buckets[0] if self.shared else self.buckets[field]
        cols = []
        for j in range(self.probes):
            if direct:
                local = ids_b if self.combine == "sum" else ids_b * self.probes + j
            else:
                local = hashing.bucket(ids_b, hashing.probe_seed(field, j, self.hash_seed), m)
            cols.append(local + start)
        return jnp.stack(cols, axis=-1).astype(jnp.int32)

    def indices(self, ids_bf) -> dict:
        ids_bf = jnp.asarray(ids_bf)
        return {"embedding": jnp.stack([self.field_rows(ids_bf[:, f], f) for f in range(self.num_fields)], axis=1)}

    def compose(self, rows: Mapping, dense: Mapping, ids_bf, phase: str = "masked"):
        self.check_phase(phase)
        r = rows["embedding"]  # [B, F, P, w]
        if self.update == "straight_through":
            r = codecs.fake_quantize(self.storage, r)
        if self.combine == "sum":
            return r.sum(axis=2)
        return r.reshape(r.shape[:2] + (self.probes * self.width,))

"""What every table method is made of: row tables, dense parameters, and one lookup contract.

A table method (a frozen dataclass, pure Python, no arrays) describes

- its **row tables** (`RowTable`): arrays ``[rows, ...]`` read one row per (id, probe); they are
  what gets row-sharded over the mesh (logical axis ``table_rows``) and updated row-sparsely;
- its **dense parameters** (`DenseParam`): small arrays every lookup reads (projections,
  thresholds), updated by a dense optimizer;
- ``indices(ids_bf) -> {row table: int32 [B, F, P]}``: which rows each (example, field) reads,
  with ``RowTable.sentinel`` meaning "no row" (gathers zeros, is never updated);
- ``compose(rows, dense, ids_bf, phase) -> float32 [B, F, d]``: the embeddings from the gathered
  (decoded, float32) rows ``{row table: [B, F, P, width]}`` and the dense parameters.

A lookup is ``compose(decode(gather(indices(ids))))``; `embedjax.tables.module.EmbeddingTable` runs
it as a Linen module and `embedjax.tables.sparse` runs the same pieces inside a row-sparse,
row-sharded training step. Methods with a search phase (learned pruning) compose differently in
``phase="search"`` and ``phase="masked"`` (the final, pruned form).

Memory: ``train_param_bytes()`` is what the row tables and dense parameters allocate while
training, ``serve_bytes()`` what the trained table needs for lookups (the budget a method is sized
to; for most methods the two are equal).
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Mapping, Sequence

import numpy as np

from embedjax.tables import codecs

TABLE_ROWS = "table_rows"  # logical axis name of the row dimension of every row table
PHASES = ("search", "masked")
FLOAT_BYTES = 4


@dataclasses.dataclass(frozen=True)
class RowTable:
    """One row-indexed array group. ``rows`` are addressable; ``physical_rows`` (a multiple of
    ``row_multiple``, so the rows split evenly over the shards) are allocated."""

    name: str
    rows: int
    width: int
    codec: str = "float32"
    init: str = "normal"  # normal (stddev init_scale) | ones | true (masks)
    init_scale: float = 0.01
    trainable: bool = True
    row_multiple: int = 1

    def __post_init__(self):
        codecs.check_codec(self.codec)
        if self.rows < 1 or self.width < 1 or self.row_multiple < 1:
            raise ValueError(f"row table {self.name!r}: rows={self.rows}, width={self.width} and "
                             f"row_multiple={self.row_multiple} must be >= 1")

    @property
    def physical_rows(self) -> int:
        return math.ceil(self.rows / self.row_multiple) * self.row_multiple

    @property
    def sentinel(self) -> int:
        """The index meaning "no row": past every allocated row."""
        return self.physical_rows

    def stored_bytes(self) -> int:
        return self.physical_rows * codecs.bytes_per_row(self.codec, self.width)


@dataclasses.dataclass(frozen=True)
class DenseParam:
    shape: tuple[int, ...]
    init: str = "normal"  # normal (stddev init_scale) | constant (init_scale)
    init_scale: float = 0.01

    def bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * FLOAT_BYTES


def full_table_bytes(vocab_sizes: Sequence[int], dim: int) -> int:
    """Bytes of the uncompressed float32 table that every budget is a fraction of."""
    return int(sum(vocab_sizes)) * dim * FLOAT_BYTES


def offsets(sizes: Sequence[int]) -> np.ndarray:
    """Start row of each field's segment in a table that concatenates the segments."""
    return np.concatenate([[0], np.cumsum(np.asarray(sizes, dtype=np.int64))[:-1]]).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class TableMethod:
    """Base of the table methods (see the module docstring)."""

    vocab_sizes: tuple[int, ...]
    dim: int
    row_multiple: int = 1

    method: ClassVar[str] = ""
    phases: ClassVar[tuple[str, ...]] = ("masked",)

    def __post_init__(self):
        if not self.vocab_sizes or any(int(v) < 1 for v in self.vocab_sizes):
            raise ValueError(f"vocab_sizes={self.vocab_sizes} must be a non-empty list of positive sizes")
        if self.dim < 1:
            raise ValueError(f"dim={self.dim} must be >= 1")
        object.__setattr__(self, "vocab_sizes", tuple(int(v) for v in self.vocab_sizes))

    # ------------------------------------------------------------ layout
    @property
    def num_fields(self) -> int:
        return len(self.vocab_sizes)

    def row_tables(self) -> tuple[RowTable, ...]:
        raise NotImplementedError

    def dense_params(self) -> dict[str, DenseParam]:
        return {}

    def bounded_fields(self) -> tuple[bool, ...]:
        """Per field: must its ids be < its vocab size (True unless the field is hashed)."""
        return (True,) * self.num_fields

    # ------------------------------------------------------------ lookup
    def indices(self, ids_bf) -> dict:
        raise NotImplementedError

    def compose(self, rows: Mapping, dense: Mapping, ids_bf, phase: str = "masked"):
        raise NotImplementedError

    def regularizer(self, dense: Mapping):
        """Extra training loss on the dense parameters (0 for most methods)."""
        return 0.0

    # ------------------------------------------------------------ training schedule (pruned tables override)
    def phase_at(self, step: int, num_steps: int) -> str:
        """The phase step ``step`` of ``num_steps`` trains in."""
        return "masked"

    def pruning_schedule(self, num_steps: int) -> dict[int, int]:
        """{step: entries (rows) to keep}, applied with `prune` before that step's update ({}: never)."""
        return {}

    def prune(self, tables: Mapping, dense: Mapping, keep: int) -> dict:
        raise NotImplementedError(f"{self.method} tables are not pruned")

    def kept(self, tables: Mapping) -> int | None:
        """Entries (rows) alive after pruning; None for tables that are not pruned."""
        return None

    # ------------------------------------------------------------ memory
    def train_param_bytes(self) -> int:
        return sum(t.stored_bytes() for t in self.row_tables()) + sum(p.bytes() for p in self.dense_params().values())

    def serve_bytes(self) -> int:
        return self.train_param_bytes()

    def full_bytes(self) -> int:
        return full_table_bytes(self.vocab_sizes, self.dim)

    def describe(self) -> dict:
        """Plain-JSON description (method, sizes, bytes) for run summaries."""
        return {"method": self.method, "num_fields": self.num_fields, "dim": self.dim,
                "vocab_total": int(sum(self.vocab_sizes)), "full_bytes": self.full_bytes(),
                "train_param_bytes": self.train_param_bytes(), "serve_bytes": self.serve_bytes(),
                "row_tables": {t.name: {"rows": t.rows, "physical_rows": t.physical_rows, "width": t.width,
                                        "codec": t.codec} for t in self.row_tables()}}

    def check_phase(self, phase: str) -> None:
        if phase not in self.phases:
            raise ValueError(f"{self.method} tables have phases {self.phases}; got phase={phase!r}")

    def row_table(self, name: str) -> RowTable:
        for table in self.row_tables():
            if table.name == name:
                return table
        raise KeyError(f"{self.method} has no row table {name!r}")


def check_ids(method: TableMethod, ids_bf, field_names: Sequence[str] | None = None) -> np.ndarray:
    """Validate a batch of ids on the host before it reaches a jitted lookup.

    Raises ValueError for a wrong rank or field count, non-integer ids, negative ids, and ids at or
    past the vocab size of a field whose rows are addressed directly (full, QR, TT, MDE and pruned
    tables; the unhashed fields of hashed tables).
    """
    ids = np.asarray(ids_bf)
    names = list(field_names) if field_names is not None else [f"field {f}" for f in range(method.num_fields)]
    if ids.ndim != 2:
        raise ValueError(f"ids must be [batch, fields]; got shape {ids.shape}")
    if ids.shape[1] != method.num_fields:
        raise ValueError(f"ids have {ids.shape[1]} fields but the {method.method} table was configured with "
                         f"{method.num_fields} (vocab_sizes={list(method.vocab_sizes)}); build the table from "
                         "the same field list as the data")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be integers; got dtype {ids.dtype}")
    if ids.size and ids.min() < 0:
        b, f = np.argwhere(ids < 0)[0]
        raise ValueError(f"negative id {int(ids[b, f])} in {names[f]} (row {b}); ids must be >= 0: map missing "
                         "values to a real id (e.g. the field's out-of-vocabulary id) before the lookup")
    if ids.size and ids.max() > np.iinfo(np.int32).max:
        raise ValueError(f"ids must fit in int32; got {int(ids.max())}")
    for f, (bounded, size) in enumerate(zip(method.bounded_fields(), method.vocab_sizes)):
        if bounded and ids.size and ids[:, f].max() >= size:
            b = int(np.argmax(ids[:, f] >= size))
            raise ValueError(f"id {int(ids[b, f])} in {names[f]} (row {b}) is out of range for the "
                             f"{method.method} table: that field has {size} rows (ids 0..{size - 1}); map unseen "
                             "values to the field's out-of-vocabulary id, or use a hashed method")
    return ids.astype(np.int32)

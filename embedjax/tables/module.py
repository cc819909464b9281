"""`EmbeddingTable`: any table method as a pure-functional Linen module.

    table = EmbeddingTable(method)
    variables = table.init(jax.random.PRNGKey(0), ids_bf)   # {"tables": ..., "params": ...}
    emb_bfd = table.apply(variables, ids_bf)                 # float32 [B, F, d]

Row tables live in the ``"tables"`` collection as ``{row table: {array: [physical_rows, ...]}}``
(boxed with the logical axis ``table_rows`` on the row dimension, so
`embedjax.sharding.param_shardings` row-shards them); dense parameters (projections, thresholds)
live in ``"params"``. The training step (`embedjax.tables.sparse`) reads the same collections but
gathers only the rows a batch needs and updates them row-sparsely.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from embedjax.tables import codecs
from embedjax.tables.base import TABLE_ROWS, DenseParam, RowTable, TableMethod


def init_rows(table: RowTable, key: jax.Array) -> dict:
    """Freshly initialised stored arrays of one row table: ``{array: [physical_rows, ...]}``."""
    rows, width = table.physical_rows, table.width
    if table.init == "true":
        alive = (jnp.arange(rows) < table.rows)[:, None]  # padding rows start pruned
        return {"mask": jnp.broadcast_to(alive, (rows, width))}
    if table.init == "ones":
        values = jnp.ones((table.rows, width), jnp.float32)
    elif table.init == "normal":
        values = table.init_scale * jax.random.normal(key, (table.rows, width), jnp.float32)
    else:
        raise ValueError(f"row table {table.name!r}: unknown init {table.init!r} (normal, ones, true)")
    # padding rows (never addressed) are zeros, so the addressable rows do not depend on the shard count
    return codecs.encode(table.codec, jnp.pad(values, ((0, rows - table.rows), (0, 0))))


def init_dense(param: DenseParam, key: jax.Array) -> jax.Array:
    if param.init == "constant":
        return jnp.full(param.shape, param.init_scale, jnp.float32)
    if param.init == "normal":
        return param.init_scale * jax.random.normal(key, param.shape, jnp.float32)
    raise ValueError(f"unknown dense init {param.init!r} (normal, constant)")


class RowTableVariables(nn.Module):
    """The stored arrays of one row table, in the ``tables`` collection."""

    table: RowTable

    @nn.compact
    def __call__(self) -> dict:
        spec = self.table
        shared_key = self.make_rng("params") if self.is_initializing() else None
        out = {}
        for key, stored in codecs.layout(spec.codec, spec.width).items():
            names = (TABLE_ROWS,) + (None,) * len(stored.row_shape)
            init = nn.with_logical_partitioning(lambda k=key: init_rows(spec, shared_key)[k], names)
            out[key] = self.variable("tables", key, init).value
        return out


def gather_stored(stored: dict, idx) -> dict:
    """Rows ``idx`` (any shape) of each stored array; out-of-range (sentinel) rows read as zeros."""
    return {k: jnp.take(v, idx, axis=0, mode="fill", fill_value=0) for k, v in stored.items()}


class EmbeddingTable(nn.Module):
    method: TableMethod

    def setup(self):
        self.row_vars = {t.name: RowTableVariables(t, name=t.name) for t in self.method.row_tables()}
        self.dense = {name: self.param(name, nn.with_logical_partitioning(
            lambda key, p=p: init_dense(p, key), (None,) * len(p.shape))) for name, p in
            self.method.dense_params().items()}

    def __call__(self, ids_bf, phase: str = "masked"):
        """ids int [B, F] -> float32 [B, F, d]."""
        ids_bf = jnp.asarray(ids_bf)
        if ids_bf.ndim != 2 or ids_bf.shape[1] != self.method.num_fields:
            raise ValueError(f"ids must be [batch, {self.method.num_fields}] for this {self.method.method} table; "
                             f"got shape {ids_bf.shape}")
        idx = self.method.indices(ids_bf)
        rows = {}
        for t in self.method.row_tables():
            rows[t.name] = codecs.decode(t.codec, gather_stored(self.row_vars[t.name](), idx[t.name]), t.width)
        return self.method.compose(rows, self.dense, ids_bf, phase)

    def lookup(self, ids_bf, phase: str = "masked"):
        return self(ids_bf, phase)

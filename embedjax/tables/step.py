"""The table side of a training step, for any table method (row-sparse and optionally row-sharded).

    batch = gather_batch(method, tables, ids_bf, sharding)         # distinct rows, decoded to float32
    def loss(dense, rows_u):
        emb_bfd = embed(method, batch, rows_u, dense, ids_bf, phase)
        ...
    grads_u = grad of loss w.r.t. rows_u                           # {trainable row table: [U, width]}
    tables, row_state = update_rows(method, optimizer, tables, row_state, batch, rows_u, grads_u,
                                    step=step, key=key, sharding=sharding)

`lookup` is the same gather/compose without a gradient: ``lookup(method, variables, ids_bf,
sharding=...)`` equals ``EmbeddingTable(method).apply(variables, ids_bf)``.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from embedjax.tables import codecs
from embedjax.tables.base import TableMethod
from embedjax.tables.sparse import RowSharding, SparseOptimizer, gather, scatter, unique_rows


@dataclasses.dataclass
class BatchRows:
    """The rows one batch reads: per row table, the distinct rows and where each position finds its row."""

    uniq: dict  # name -> int32 [U]
    inv: dict  # name -> int32 [B, F, P]
    stored: dict  # name -> {array: [U, ...]} as stored (codes, scales, masks)


jax.tree_util.register_dataclass(BatchRows, data_fields=["uniq", "inv", "stored"], meta_fields=[])


def gather_batch(method: TableMethod, tables: Mapping, ids_bf, sharding: RowSharding | None = None) -> BatchRows:
    idx = method.indices(ids_bf)
    uniq, inv, stored = {}, {}, {}
    for t in method.row_tables():
        uniq[t.name], inv[t.name] = unique_rows(idx[t.name], t.sentinel)
        stored[t.name] = gather(tables[t.name], uniq[t.name], sharding)
    return BatchRows(uniq, inv, stored)


def decoded_rows(method: TableMethod, batch: BatchRows, trainable: bool) -> dict:
    """{row table: float32 [U, width]} for the trainable (or the frozen) row tables."""
    return {t.name: codecs.decode(t.codec, batch.stored[t.name], t.width)
            for t in method.row_tables() if t.trainable == trainable}


def embed(method: TableMethod, batch: BatchRows, rows_u: Mapping, dense: Mapping, ids_bf, phase: str = "masked"):
    """float32 [B, F, d] from the distinct trainable rows ``rows_u`` (differentiable) and the frozen ones."""
    frozen = decoded_rows(method, batch, trainable=False)
    rows = {name: jnp.take(r, batch.inv[name], axis=0) for name, r in {**frozen, **rows_u}.items()}
    return method.compose(rows, dense, ids_bf, phase)


def init_row_state(method: TableMethod, optimizer: SparseOptimizer) -> dict:
    return {t.name: optimizer.init(t) for t in method.row_tables() if t.trainable}


def update_rows(method: TableMethod, optimizer: SparseOptimizer, tables: Mapping, row_state: Mapping,
                batch: BatchRows, rows_u: Mapping, grads_u: Mapping, *, step, key: jax.Array,
                sharding: RowSharding | None = None) -> tuple[dict, dict]:
    """Apply one optimizer step to the batch's rows only; every other row and its state are untouched.

    Low-bit stored rows are re-encoded with stochastic rounding (random bits from ``key``, the
    table's position and the global row id, so they do not depend on the sharding).
    """
    tables, row_state = dict(tables), dict(row_state)
    for i, t in enumerate(method.row_tables()):
        if not t.trainable:
            continue
        uniq = batch.uniq[t.name]
        state_u = gather(row_state[t.name], uniq, sharding)
        new_w, new_state = optimizer.update(rows_u[t.name], grads_u[t.name], state_u, step)
        rounding = "stochastic" if t.codec in codecs.LOW_BIT else "nearest"
        encoded = codecs.encode(t.codec, new_w, rounding=rounding, key=jax.random.fold_in(key, i), row_ids_u=uniq)
        tables[t.name] = scatter(tables[t.name], uniq, encoded, sharding)
        row_state[t.name] = scatter(row_state[t.name], uniq, new_state, sharding)
    return tables, row_state


def lookup(method: TableMethod, variables: Mapping, ids_bf, *, sharding: RowSharding | None = None,
           phase: str = "masked"):
    """Embeddings [B, F, d] reading only the batch's rows (through the shards when ``sharding``)."""
    variables = nn.meta.unbox(variables)
    batch = gather_batch(method, variables["tables"], ids_bf, sharding)
    return embed(method, batch, decoded_rows(method, batch, trainable=True), variables.get("params", {}), ids_bf,
                 phase)

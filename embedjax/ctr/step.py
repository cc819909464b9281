"""The jitted CTR training and prediction steps: row-sparse table updates + Adam on the dense parts.

State (`embedjax.train.state.TrainState`):
    params    = {"tables": {row table: {array: [rows, ...]}},         # row-sharded, row-sparse updates
                 "dense": {"table": {name: array}, "model": DLRM params}}
    opt_state = {"rows": {row table: {slot: [rows, ...]}},             # SparseOptimizer state, row-sharded
                 "dense": optax state of params["dense"]}
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from embedjax.tables import step as table_step
from embedjax.tables.base import TableMethod
from embedjax.tables.module import EmbeddingTable
from embedjax.tables.sparse import RowSharding, SparseOptimizer
from embedjax.train.state import TrainState, unbox


def make_init_state(method: TableMethod, model, sparse_opt: SparseOptimizer, dense_tx: optax.GradientTransformation,
                    *, num_dense: int, seed: int):
    """``init_state(key) -> TrainState`` at step 0 (jit it with `train_state_shardings` as out_shardings)."""
    table = EmbeddingTable(method)

    def init_state(key):
        k_table, k_model = jax.random.split(key)
        table_vars = unbox(table.init(k_table, jnp.zeros((1, method.num_fields), jnp.int32)))
        model_params = model.init(k_model, jnp.zeros((1, method.num_fields, method.dim)),
                                  jnp.zeros((1, num_dense)))["params"]
        dense = {"table": table_vars.get("params", {}), "model": model_params}
        return TrainState(step=jnp.zeros((), jnp.int32), params={"tables": table_vars["tables"], "dense": dense},
                          opt_state={"rows": table_step.init_row_state(method, sparse_opt),
                                     "dense": dense_tx.init(dense)},
                          rng=jax.random.PRNGKey(seed))

    return init_state


def train_state_shardings(abstract_state, mesh, row_sharding: RowSharding | None):
    """Row tables and their optimizer state split by ``row_sharding``; everything else replicated."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    rows = (lambda x: row_sharding.sharding(x.ndim)) if row_sharding else (lambda x: replicated)
    rep = lambda x: replicated  # noqa: E731
    return TrainState(step=replicated, rng=replicated,
                      params={"tables": jax.tree.map(rows, abstract_state.params["tables"]),
                              "dense": jax.tree.map(rep, abstract_state.params["dense"])},
                      opt_state={"rows": jax.tree.map(rows, abstract_state.opt_state["rows"]),
                                 "dense": jax.tree.map(rep, abstract_state.opt_state["dense"])})


def batch_shardings(mesh) -> dict:
    """The batch arrays split over the data-parallel axes (data, fsdp)."""
    axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axes or None))
    return {"ids": sharding, "dense": sharding, "label": sharding}


def bce_loss(logits_b, labels_b):
    return optax.sigmoid_binary_cross_entropy(logits_b, labels_b.astype(jnp.float32)).mean()


def tree_sq_norm(tree):
    return sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree))


def make_train_step(method: TableMethod, model, sparse_opt: SparseOptimizer, dense_tx: optax.GradientTransformation,
                    *, phase: str, row_sharding: RowSharding | None):
    """``step(state, batch) -> (state, metrics)``; batch = {"ids" int32 [B, F], "dense" [B, D], "label" [B]}."""
    method.check_phase(phase)

    def objective(dense, rows_u, batch_rows, batch):
        emb = table_step.embed(method, batch_rows, rows_u, dense["table"], batch["ids"], phase)
        logits = model.apply({"params": dense["model"]}, emb, batch["dense"])
        bce = bce_loss(logits, batch["label"])
        return bce + method.regularizer(dense["table"]), bce

    def step(state, batch):
        tables, dense = state.params["tables"], state.params["dense"]
        batch_rows = table_step.gather_batch(method, tables, batch["ids"], row_sharding)
        rows_u = table_step.decoded_rows(method, batch_rows, trainable=True)
        (total, bce), (g_dense, g_rows) = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(
            dense, rows_u, batch_rows, batch)
        updates, dense_opt = dense_tx.update(g_dense, state.opt_state["dense"], dense)
        dense = optax.apply_updates(dense, updates)
        key = jax.random.fold_in(state.rng, state.step)
        tables, row_state = table_step.update_rows(method, sparse_opt, tables, state.opt_state["rows"], batch_rows,
                                                   rows_u, g_rows, step=state.step, key=key, sharding=row_sharding)
        new_state = state.replace(step=state.step + 1, params={"tables": tables, "dense": dense},
                                  opt_state={"rows": row_state, "dense": dense_opt})
        grad_norm = jnp.sqrt(tree_sq_norm(g_dense) + tree_sq_norm(g_rows))
        return new_state, {"loss": bce, "objective": total, "grad_norm": grad_norm}

    return step


def make_predict(method: TableMethod, model, *, row_sharding: RowSharding | None, phase: str = "masked"):
    """``predict(params, ids_bf, dense_bn) -> probabilities [B]``."""

    def predict(params, ids_bf, dense_bn):
        variables = {"tables": params["tables"], "params": params["dense"]["table"]}
        emb = table_step.lookup(method, variables, ids_bf, sharding=row_sharding, phase=phase)
        return jax.nn.sigmoid(model.apply({"params": params["dense"]["model"]}, emb, dense_bn))

    return predict

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
from embedjax.tables.sparse import RowSharding, SparseOptimizer


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

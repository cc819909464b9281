"""Memory of a table: what its parameters and optimizer state take, predicted and measured.

`memory_report` predicts from the method's layout alone (no arrays); `device_bytes` measures what
arrays actually hold on their devices: one copy of every array (``copies=False``: the shards with
replica id 0, which together hold each element once) or every copy (``copies=True``: a replicated
array counts once per device). Tests check prediction and measurement agree, and that row-sharded
tables hold no second copy.
"""
from __future__ import annotations

import jax
import numpy as np

from embedjax.tables.base import TableMethod
from embedjax.tables.sparse import SparseOptimizer

DENSE_ADAM_SLOTS = 2  # optax adam keeps mu and nu per dense parameter


def memory_report(method: TableMethod, optimizer: SparseOptimizer, dense_slots: int = DENSE_ADAM_SLOTS) -> dict:
    """Bytes of the table while training (parameters, optimizer state) and when serving."""
    rows = method.row_tables()
    row_param = sum(t.stored_bytes() for t in rows)
    dense_param = sum(p.bytes() for p in method.dense_params().values())
    row_opt = sum(optimizer.state_bytes(t) for t in rows)
    dense_opt = dense_slots * dense_param
    full = method.full_bytes()
    serve = method.serve_bytes()
    return {"param_bytes": row_param + dense_param, "row_param_bytes": row_param, "dense_param_bytes": dense_param,
            "optimizer_bytes": row_opt + dense_opt, "row_optimizer_bytes": row_opt,
            "dense_optimizer_bytes": dense_opt, "train_bytes": row_param + dense_param + row_opt + dense_opt,
            "serve_bytes": serve, "full_bytes": full, "serve_fraction": serve / full}


def device_bytes(tree, copies: bool = False) -> int:
    """Bytes the leaves of ``tree`` occupy on their devices (one copy, or every copy)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array):
            total += sum(int(s.data.nbytes) for s in leaf.addressable_shards if copies or s.replica_id == 0)
        else:
            total += int(np.asarray(leaf).nbytes)
    return total

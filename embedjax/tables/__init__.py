"""Learnable embedding tables for categorical features: full, hashed, multi-probe, multiplexed
(Unified Embedding), quotient-remainder, tensor-train, mixed-dimension, low-bit and pruned;
row-sharded over the mesh and trained with row-sparse optimizers.

    import embedjax.tables as tables
    method = tables.build("multiplex", vocab_sizes, dim=16, budget=0.01)   # sized to 1% of the full table
    module = tables.EmbeddingTable(method)
    variables = module.init(jax.random.PRNGKey(0), ids_bf)
    emb_bfd = module.apply(variables, tables.check_ids(method, ids_bf))    # float32 [B, F, 16]
    tables.memory_report(method, tables.SparseOptimizer("rowwise_adagrad"))
"""
from embedjax.tables.base import TABLE_ROWS, DenseParam, RowTable, TableMethod, check_ids, full_table_bytes
from embedjax.tables.compositional import QuotientRemainderTable, TensorTrainTable
from embedjax.tables.hashed import HashedTable
from embedjax.tables.memory import device_bytes, memory_report
from embedjax.tables.mixed_dim import MixedDimTable
from embedjax.tables.module import EmbeddingTable
from embedjax.tables.planner import METHOD_OPTIONS, METHODS, BudgetTooSmall, build
from embedjax.tables.pruned import PrunedTable
from embedjax.tables.sparse import RowSharding, SparseOptimizer, row_sharding_from_rules
from embedjax.tables.step import lookup

__all__ = [
    "TABLE_ROWS", "RowTable", "DenseParam", "TableMethod", "check_ids", "full_table_bytes",
    "HashedTable", "QuotientRemainderTable", "TensorTrainTable", "MixedDimTable", "PrunedTable",
    "EmbeddingTable", "build", "METHODS", "METHOD_OPTIONS", "BudgetTooSmall",
    "SparseOptimizer", "RowSharding", "row_sharding_from_rules", "lookup", "memory_report", "device_bytes",
]

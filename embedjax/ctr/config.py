"""The CTR training config schema (``python -m embedjax train-ctr``).

Every key is read by `embedjax.ctr.train`; files in ``configs/`` start from `default_config()` and
change values, overrides use ``--config.KEY=VALUE``, and an unknown key or a wrong type is an
error (the same validation as the text trainer, `embedjax.train.config`). Table options that
only some methods read (``table.probes``, ``combine``, ``hash_seed``, ``storage``, ``update``)
are an error when changed for a method that ignores them.
"""
from __future__ import annotations

import ml_collections

from embedjax.tables.planner import METHOD_OPTIONS, METHODS

TRAIN_COMMAND = "train-ctr"
TABLE_OPTION_KEYS = ("probes", "combine", "hash_seed", "storage", "update")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # table and model init, batch order, stochastic rounding

    c.data = ml_collections.ConfigDict()
    c.data.name = "movielens"  # movielens | frappe | criteo (shared data folder: $EMBEDJAX_DATA_DIR)
    c.data.fields = ()  # () = every field of the dataset; else the field names to use, in order
    c.data.min_count = 1  # training-split values seen fewer times share the field's out-of-vocabulary id
    c.data.cache_dir = ""  # "" = $EMBEDJAX_CACHE_DIR or ~/.cache/embedjax/tfds
    # > 0: train on the first (1 - f) of a seeded shuffle of the training split and evaluate on the
    # rest (for tuning); the test split is then not read at all.
    c.data.validation_fraction = 0.0

    c.table = ml_collections.ConfigDict()
    c.table.method = "full"  # one of embedjax.tables.METHODS
    c.table.budget = 1.0  # serving bytes as a fraction of the full float32 table, in (0, 1]
    c.table.dim = 16
    c.table.init_scale = 0.01  # std of the initial embeddings
    c.table.probes = 2  # multiprobe, multiplex
    c.table.combine = "sum"  # multiprobe: sum | concat
    c.table.hash_seed = 0  # hash, multiprobe, multiplex, lowbit
    c.table.storage = "int8"  # lowbit: int8 | int4 | fp8
    c.table.update = "stochastic"  # lowbit: stochastic | straight_through

    c.model = ml_collections.ConfigDict()
    c.model.top_mlp = (64, 32)  # hidden widths of the MLP on [embeddings, pairwise dots]
    c.model.bottom_mlp = (32,)  # hidden widths of the MLP on dense features (criteo); its output is table.dim

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 512  # global
    c.train.num_epochs = 3
    c.train.num_steps = 0  # > 0 overrides num_epochs
    c.train.stop_after = 0  # > 0: run only this many steps of the schedule
    c.train.log_every = 50
    c.train.progress = True

    c.optim = ml_collections.ConfigDict()
    c.optim.sparse = "rowwise_adagrad"  # row tables: adagrad | rowwise_adagrad | lazy_adam | sgd
    c.optim.sparse_learning_rate = 0.05
    c.optim.dense_learning_rate = 1e-3  # Adam on the MLPs and the tables' dense parameters
    c.optim.eps = 1e-8

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.num_devices = 0  # 0 = all devices; N = the first N
    c.mesh.rules = "data_parallel"  # how the batch splits (a preset of embedjax.sharding.rules)
    c.mesh.table_rows = ("data", "fsdp", "tensor")  # mesh axes the table rows split over; () = replicated

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 0  # 0 = only at the end
    c.checkpoint.keep = 2
    c.checkpoint.async_save = False

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 4096
    return c


def check_table_options(cfg: ml_collections.ConfigDict) -> dict:
    """The method's options from ``cfg.table``; a changed option the method does not read is an error."""
    method = cfg.table.method
    if method not in METHODS:
        raise ValueError(f"table.method={method!r}: choose one of {METHODS}")
    defaults = default_config().table
    reads = METHOD_OPTIONS[method]
    for key in TABLE_OPTION_KEYS:
        if key not in reads and cfg.table[key] != defaults[key]:
            users = [m for m, keys in METHOD_OPTIONS.items() if key in keys]
            raise ValueError(f"table.{key}={cfg.table[key]!r} has no effect on table.method={method!r}; it is read "
                             f"by {users} only: leave it at its default {defaults[key]!r}")
    return {key: cfg.table[key] for key in reads}

"""CTR models on compressed embedding tables: one family per table method, a memory-budget axis.

    python -m embedjax train-ctr --config configs/ctr_tables.py:multiplex,movielens \\
        --workdir runs/ctr/ml-multiplex --config.table.budget=0.01
    python -m embedjax sweep --config configs/ctr_tables.py:all,movielens --workdir runs/table_compression/movielens
    python -m embedjax sweep --config configs/ctr_tables.py:all,frappe,full --workdir gs://BUCKET/tc/frappe \\
        --launcher tpu_pod --launcher_args "--name my-v5e --zone us-west4-a"

ARG = ``FAMILY[,DATASET][,full]``:

- FAMILY: a table method variant (`VARIANTS`: full, hash, multiprobe, multiplex, qr, tt, mde,
  lowbit-int8, lowbit-int4, lowbit-fp8, lowbit-int8-ste, magnitude, pep, optembed), or ``all`` for the
  sweep over every variant;
- DATASET: movielens (default), frappe or criteo;
- ``full``: accelerator scale (d = 64, batch 8192, wider MLPs, 10 epochs, rows split over every mesh
  axis); without it, the smoke scale that trains on 2 CPU cores in seconds (d = 16, batch 1024, the
  dataset's `SMOKE_RECIPES` entry: row-table learning rate and epochs chosen on a 10% validation
  hold-out of the training split by ``experiments/table_compression/tune.py``, see its tuning.json).

``get_sweep(ARG)`` crosses the family with the budgets `BUDGETS` (fractions of the full table's
bytes) and seeds 0, 1, 2; budgets a method cannot meet (`embedjax.tables.build` raises
BudgetTooSmall) are left out and listed by the experiment report. ``all`` starts with the full
table (budget 1), the baseline of the paired tests.
"""
from embedjax.ctr.config import TRAIN_COMMAND, default_config  # noqa: F401 (the sweep reads TRAIN_COMMAND)

BUDGETS = (0.1, 0.01, 0.001)
# Best validation AUC of the full table (tuning.json), at most 4 epochs at smoke scale (8 epochs
# gained 0.001 AUC on MovieLens at twice the cost). Criteo-8k was not tuned (not in the experiment).
SMOKE_RECIPES = {"movielens": {"optim.sparse_learning_rate": 0.02, "train.num_epochs": 4},
                 "frappe": {"optim.sparse_learning_rate": 0.2, "train.num_epochs": 4},
                 "criteo": {"optim.sparse_learning_rate": 0.05, "train.num_epochs": 3}}
SEEDS = (0, 1, 2)
DATASETS = ("movielens", "frappe", "criteo")
# family -> config overrides of the table section
VARIANTS = {
    "full": {"table.method": "full"},
    "hash": {"table.method": "hash"},
    "multiprobe": {"table.method": "multiprobe"},
    "multiplex": {"table.method": "multiplex"},
    "qr": {"table.method": "qr"},
    "tt": {"table.method": "tt"},
    "mde": {"table.method": "mde"},
    "lowbit-int8": {"table.method": "lowbit", "table.storage": "int8"},
    "lowbit-int4": {"table.method": "lowbit", "table.storage": "int4"},
    "lowbit-fp8": {"table.method": "lowbit", "table.storage": "fp8"},
    "lowbit-int8-ste": {"table.method": "lowbit", "table.storage": "int8", "table.update": "straight_through"},
    "magnitude": {"table.method": "magnitude"},
    "pep": {"table.method": "pep"},
    "optembed": {"table.method": "optembed"},
}


def _parse(arg: str) -> tuple[str, str, str]:
    parts = [p for p in (arg or "full").split(",") if p]
    scale = "full" if parts and parts[-1] == "full" and len(parts) > 1 else "smoke"
    if scale == "full":
        parts = parts[:-1]
    family = parts[0]
    dataset = parts[1] if len(parts) > 1 else "movielens"
    if family not in VARIANTS and family != "all" or dataset not in DATASETS or len(parts) > 2:
        raise ValueError(f"ctr_tables.py argument {arg!r}: use FAMILY[,DATASET][,full] with FAMILY in "
                         f"{sorted(VARIANTS) + ['all']} and DATASET in {DATASETS}")
    return family, dataset, scale


def _set(c, dotted: str, value) -> None:
    node = c
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value


def get_config(arg: str = "full"):
    family, dataset, scale = _parse(arg)
    c = default_config()
    c.data.name = dataset
    for key, value in VARIANTS["full" if family == "all" else family].items():
        _set(c, key, value)
    c.table.budget = 1.0 if family in ("full", "all") else BUDGETS[0]
    if scale == "smoke":
        c.table.dim = 16
        c.train.batch_size = 1024
        c.train.log_every = 50
        c.model.top_mlp = (64, 32)
        for key, value in SMOKE_RECIPES[dataset].items():
            _set(c, key, value)
    else:
        c.table.dim = 64
        c.train.batch_size = 8192
        c.train.num_epochs = 10
        c.model.top_mlp = (256, 128)
        c.model.bottom_mlp = (128,)
        c.checkpoint.every_steps = 200
    return c


def feasible(overrides: dict, vocab_sizes, dim: int) -> bool:
    """Can the variant meet the budget for these field vocabularies (`embedjax.tables.build` does not refuse it)?"""
    from embedjax.ctr.config import check_table_options
    from embedjax.tables import BudgetTooSmall, build

    c = default_config()
    for key, value in overrides.items():
        _set(c, key, value)
    try:
        build(c.table.method, vocab_sizes, dim, c.table.budget, **check_table_options(c))
    except BudgetTooSmall:
        return False
    return True


def get_sweep(arg: str = "all"):
    """FAMILY x budgets x seeds (``all``: every family; the full table at budget 1 first)."""
    from embedjax.data.ctr import load_ctr
    from embedjax.sweep import with_seeds

    family, dataset, scale = _parse(arg)
    dim = get_config(arg).table.dim
    vocab_sizes = load_ctr(dataset).vocab_sizes  # read once: every (family, budget) is sized against it
    families = [f for f in VARIANTS if f != "full"] if family == "all" else [family]
    grid = [dict(VARIANTS["full"], **{"table.budget": 1.0})] if family in ("all", "full") else []
    for name in families:
        for budget in BUDGETS:
            overrides = dict(VARIANTS[name], **{"table.budget": budget})
            if feasible(overrides, vocab_sizes, dim):
                grid.append(overrides)
    return with_seeds(grid, SEEDS)

"""Budgets: every method stays within its budget and says clearly when it cannot; the reported
memory equals the bytes the parameters and optimizer state actually allocate (1 device, and 8
devices with row-sharded tables holding no second copy)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import embedjax.tables as T
from embedjax.ctr.model import DLRM
from embedjax.ctr.step import make_init_state, train_state_shardings
from embedjax.ctr.train import measured_memory
from embedjax.sharding.mesh import make_mesh
from embedjax.tables import planner
from embedjax.train import optim

VOCAB = (944, 1645, 62, 3, 22, 796, 73, 217)  # the MovieLens-CTR fields
DIM = 16
OPTIONS = {"multiprobe": [{}, {"combine": "concat"}], "lowbit": [{"storage": s} for s in ("int8", "int4", "fp8")]
           + [{"storage": "int8", "update": "straight_through"}]}


def _variants():
    for method in T.METHODS:
        for opts in OPTIONS.get(method, [{}]):
            yield method, opts


@pytest.mark.parametrize("budget", [1.0, 0.3, 0.1, 0.01, 0.001])
def test_every_method_fits_its_budget_or_refuses_clearly(budget):
    full = T.full_table_bytes(VOCAB, DIM)
    for method, opts in _variants():
        try:
            table = T.build(method, VOCAB, DIM, budget, **opts)
        except T.BudgetTooSmall as err:
            text = str(err)
            assert f"too small for {method}" in text and "budget >=" in text
            need = float(text.split("budget >= ")[1].split(")")[0])
            assert need > budget
            T.build(method, VOCAB, DIM, min(1.0, need * 1.01), **opts)  # the named budget does work
            continue
        assert table.serve_bytes() <= budget * full, (method, opts, budget)
        if budget < 1.0 and method not in ("lowbit",):
            assert table.serve_bytes() > 0.5 * budget * full, (method, budget)  # the budget is used


def test_cap_allocation_is_the_largest_cap_that_fits():
    rng = np.random.default_rng(0)
    for _ in range(50):
        needed = rng.integers(1, 60, size=rng.integers(1, 6)).tolist()
        total = int(rng.integers(0, 200))
        got = planner.cap_allocation(needed, total)
        feasible = [c for c in range(1, max(needed) + 1) if sum(min(n, c) for n in needed) <= total]
        if not feasible:
            assert got is None
        else:
            assert got == tuple(min(n, max(feasible)) for n in needed)


def test_budget_errors_name_the_method_and_the_smallest_budget():
    with pytest.raises(T.BudgetTooSmall, match="too small for full"):
        T.build("full", VOCAB, DIM, 0.5)
    for method in ("hash", "qr", "tt", "mde", "magnitude", "optembed", "multiplex", "lowbit"):
        with pytest.raises(T.BudgetTooSmall, match=f"too small for {method}"):
            T.build(method, VOCAB, DIM, 1e-6)
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        T.build("hash", VOCAB, DIM, 1.5)
    with pytest.raises(ValueError, match="unknown table method"):
        T.build("bloom", VOCAB, DIM, 0.1)
    with pytest.raises(ValueError, match="takes no option"):
        T.build("qr", VOCAB, DIM, 0.1, probes=2)


# the default suite checks variants covering every kind of layout (row tables, codecs, dense
# parameters, masks) and all three optimizers; the slow suite checks every variant
DEFAULT_VARIANTS = {("full", ""), ("lowbit", "int4"), ("lowbit", "int8-straight_through"), ("mde", ""), ("pep", "")}


def _variant_key(method, opts):
    return method, "-".join(str(v) for v in opts.values())


@pytest.mark.parametrize("every_variant", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_reported_memory_equals_allocated_bytes(every_variant):
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1], axis_type=jax.sharding.AxisType.Auto)
    tx = optim.adamw(optim.learning_rate_schedule(1e-3, 10, 0, "constant"), weight_decay=0.0, grad_clip=0.0)
    kinds = ("adagrad", "rowwise_adagrad", "lazy_adam")
    chosen = [v for v in _variants() if every_variant or _variant_key(*v) in DEFAULT_VARIANTS]
    assert len(chosen) >= len(DEFAULT_VARIANTS)
    for i, (method, opts) in enumerate(chosen):  # each variant with one of the optimizers, all covered
        opt = T.SparseOptimizer(kinds[i % 3])
        table = T.build(method, VOCAB, DIM, 1.0 if method == "full" else 0.1, **opts)
        init = make_init_state(table, DLRM(top_mlp=(8,)), opt, tx, num_dense=0, seed=0)
        shardings = train_state_shardings(jax.eval_shape(init, jax.random.PRNGKey(0)), mesh, None)
        state = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(0))
        report = T.memory_report(table, opt)
        measured = measured_memory(state)
        assert measured["measured_param_bytes"] == report["param_bytes"] == table.train_param_bytes(), (method, opts)
        assert measured["measured_optimizer_bytes"] == report["optimizer_bytes"], (method, opts)
        # the serving bytes are the stored arrays, for the methods that store nothing else while training
        if method in ("hash", "multiplex", "qr", "tt", "mde") or opts.get("update") == "stochastic":
            assert report["serve_bytes"] == report["param_bytes"]


@pytest.mark.slow
def test_row_sharded_tables_hold_one_copy_over_8_devices():
    mesh = make_mesh({"data": 8}, devices=jax.devices()[:8], axis_type=jax.sharding.AxisType.Auto)
    row_sharding = T.RowSharding(mesh, ("data",))
    for method, opts in _variants():
        table = T.build(method, VOCAB, DIM, 1.0 if method == "full" else 0.1, row_multiple=8, **opts)
        tables = nn.meta.unbox(jax.jit(T.EmbeddingTable(table).init)(jax.random.PRNGKey(0),
                                                                      jnp.zeros((1, 8), jnp.int32)))["tables"]
        placed = jax.tree.map(lambda x: jax.device_put(x, row_sharding.sharding(x.ndim)), tables)
        row_bytes = sum(t.stored_bytes() for t in table.row_tables())
        assert T.device_bytes(placed) == T.device_bytes(placed, copies=True) == row_bytes, (method, opts)
        for t in table.row_tables():
            assert t.physical_rows % 8 == 0 and t.physical_rows - t.rows < 8

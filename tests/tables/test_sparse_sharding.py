"""Row-sparse updates and row sharding: NumPy references for gather/scatter and the row-wise
optimizers; absent rows (and their optimizer state) bit-identical after steps; 8 fake devices equal
one device (gathers bit for bit, training within 1e-6: gradient sums run in another order); a sharded
lookup moves only the rows the batch needs."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import embedjax.tables as T
from embedjax.ctr.model import DLRM
from embedjax.ctr.step import batch_shardings, make_init_state, make_train_step, train_state_shardings
from embedjax.sharding.mesh import make_mesh
from embedjax.tables import sparse
from embedjax.train import optim

VOCAB = (50, 3, 97, 31, 7)
DIM = 8


def _mesh8():
    assert len(jax.devices()) >= 8, "tests/conftest.py requests 8 fake CPU devices"
    return make_mesh({"data": 8}, devices=jax.devices()[:8], axis_type=jax.sharding.AxisType.Auto)


def _mesh1():
    return make_mesh({"data": 1}, devices=jax.devices()[:1], axis_type=jax.sharding.AxisType.Auto)


def _ids(n, seed, vocab=VOCAB, hot=None):
    rng = np.random.default_rng(seed)
    # skewed ids (like real CTR data): repeats inside a batch, many rows never read
    cols = [np.minimum(rng.geometric(0.15, size=n) - 1, v - 1) for v in vocab]
    return np.stack(cols, axis=1).astype(np.int32)


def test_unique_gather_scatter_match_numpy():
    idx = jnp.asarray([[3, 9, 3], [12, 0, 9]], jnp.int32)  # 12 = the sentinel of a 12-row table
    uniq, inv = sparse.unique_rows(idx, 12)
    assert np.asarray(uniq).tolist() == [0, 3, 9, 12, 12, 12]
    np.testing.assert_array_equal(np.asarray(uniq)[np.asarray(inv)], np.asarray(idx))
    table = {"w": jnp.arange(24.0).reshape(12, 2), "n": jnp.arange(12, dtype=jnp.int8)}
    got = sparse.gather(table, uniq)
    np.testing.assert_array_equal(np.asarray(got["w"])[:3], np.arange(24.0).reshape(12, 2)[[0, 3, 9]])
    assert np.asarray(got["w"])[3:].sum() == 0  # the sentinel reads zeros
    new = {"w": -jnp.ones((6, 2)), "n": -jnp.ones(6, jnp.int8)}
    out = sparse.scatter(table, uniq, new)
    expect = np.arange(24.0).reshape(12, 2)
    expect[[0, 3, 9]] = -1
    np.testing.assert_array_equal(np.asarray(out["w"]), expect)


@pytest.mark.parametrize("kind", ["sgd", "adagrad", "rowwise_adagrad", "lazy_adam"])
def test_row_wise_optimizers_match_numpy(kind):
    rng = np.random.default_rng(0)
    opt = sparse.SparseOptimizer(kind, learning_rate=0.1, eps=1e-8)
    w = rng.normal(size=(5, 3)).astype(np.float32)
    state = {k: np.abs(rng.normal(size=(5,) + s)).astype(np.float32) for k, s in opt.layout(3).items()}
    g = rng.normal(size=(5, 3)).astype(np.float32)
    step = 4
    new_w, new_state = opt.update(jnp.asarray(w), jnp.asarray(g), {k: jnp.asarray(v) for k, v in state.items()}, step)
    w64, g64 = w.astype(np.float64), g.astype(np.float64)
    if kind == "sgd":
        ref = w64 - 0.1 * g64
    elif kind == "adagrad":
        acc = state["accumulator"] + g64 ** 2
        ref = w64 - 0.1 * g64 / (np.sqrt(acc) + 1e-8)
    elif kind == "rowwise_adagrad":
        acc = state["accumulator"] + (g64 ** 2).mean(axis=1)
        ref = w64 - 0.1 * g64 / (np.sqrt(acc)[:, None] + 1e-8)
    else:
        m = 0.9 * state["m"] + 0.1 * g64
        v = 0.999 * state["v"] + 0.001 * g64 ** 2
        ref = w64 - 0.1 * (m / (1 - 0.9 ** 5)) / (np.sqrt(v / (1 - 0.999 ** 5)) + 1e-8)
        np.testing.assert_allclose(np.asarray(new_state["m"]), m, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new_w), ref, rtol=1e-5, atol=1e-7)


def _variables(method, seed=0):
    return nn.meta.unbox(jax.jit(T.EmbeddingTable(method).init)(jax.random.PRNGKey(seed),
                                                                 jnp.zeros((1, method.num_fields), jnp.int32)))


def _methods(row_multiple):
    kw = dict(row_multiple=row_multiple)
    return {
        "full": T.build("full", VOCAB, DIM, 1.0, **kw),
        "hash": T.build("hash", VOCAB, DIM, 0.3, **kw),
        "multiplex": T.build("multiplex", VOCAB, DIM, 0.2, **kw),
        "lowbit-int4": T.build("lowbit", VOCAB, DIM, 0.2, storage="int4", **kw),
        "qr": T.build("qr", VOCAB, DIM, 0.9, **kw),
        "tt": T.TensorTrainTable(VOCAB, DIM, rank=2, tt_fields=(True, False, True, True, False), **kw),
        "mde": T.build("mde", VOCAB, DIM, 0.6, **kw),
        "optembed": T.build("optembed", VOCAB, DIM, 0.5, **kw),
    }


@pytest.mark.parametrize("names", [("full", "multiplex", "lowbit-int4", "tt"),
                                   pytest.param(("hash", "qr", "mde", "optembed"), marks=pytest.mark.slow)])
def test_sharded_gather_and_lookup_are_bit_identical_to_one_device(names):
    mesh = _mesh8()
    row_sharding = sparse.RowSharding(mesh, ("data",))
    ids = _ids(40, 1)
    for name in names:
        method = _methods(8)[name]
        variables = _variables(method)
        single = jax.jit(lambda v, i, m=method: T.lookup(m, v, i))(variables, ids)
        placed = {"tables": jax.tree.map(lambda x: jax.device_put(x, row_sharding.sharding(x.ndim)),
                                         variables["tables"]), "params": variables.get("params", {})}
        sharded = jax.jit(lambda v, i, m=method: T.lookup(m, v, i, sharding=row_sharding))(placed, ids)
        np.testing.assert_array_equal(np.asarray(sharded), np.asarray(single), err_msg=name)


def _train(method, mesh, row_sharding, batches, opt_kind, phase="masked"):
    model = DLRM(top_mlp=(16,))
    opt = sparse.SparseOptimizer(opt_kind, learning_rate=0.1)
    tx = optim.adamw(optim.learning_rate_schedule(1e-2, 10, 0, "constant"), weight_decay=0.0, grad_clip=0.0)
    init = make_init_state(method, model, opt, tx, num_dense=0, seed=3)
    shardings = train_state_shardings(jax.eval_shape(init, jax.random.PRNGKey(3)), mesh, row_sharding)
    state = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(3))
    first = jax.device_get(state)
    bsh = batch_shardings(mesh)
    step = jax.jit(make_train_step(method, model, opt, tx, phase=phase, row_sharding=row_sharding),
                   in_shardings=(shardings, bsh), out_shardings=(shardings, None))
    for batch in batches:
        state, _ = step(state, {k: jax.device_put(v, bsh[k]) for k, v in batch.items()})
    return first, jax.device_get(state)


def _batches(n_steps, vocab=VOCAB):
    out = []
    for s in range(n_steps):
        ids = _ids(64, 10 + s, vocab)
        label = (np.random.default_rng(s).random(64) < 0.4).astype(np.int32)
        out.append({"ids": ids, "dense": np.zeros((64, 0), np.float32), "label": label})
    return out


def _touched_rows(method, batches):
    touched = {t.name: set() for t in method.row_tables()}
    for batch in batches:
        for name, idx in method.indices(batch["ids"]).items():
            touched[name] |= set(np.asarray(idx).reshape(-1).tolist())
    return touched


@pytest.mark.parametrize("name,opt_kind", [
    ("full", "lazy_adam"), ("lowbit-int4", "rowwise_adagrad"),
    pytest.param("multiplex", "adagrad", marks=pytest.mark.slow),
    pytest.param("tt", "lazy_adam", marks=pytest.mark.slow),
    pytest.param("mde", "rowwise_adagrad", marks=pytest.mark.slow),
    pytest.param("optembed", "adagrad", marks=pytest.mark.slow)])
def test_sharded_training_equals_one_device_and_absent_rows_are_untouched(name, opt_kind):
    method = _methods(8)[name]
    batches = _batches(3)
    phase = method.phases[0]
    first1, after1 = _train(method, _mesh1(), None, batches, opt_kind, phase)
    mesh = _mesh8()
    first8, after8 = _train(method, mesh, sparse.RowSharding(mesh, ("data",)), batches, opt_kind, phase)
    # identical starting point (same physical rows, same keys)
    jax.tree.map(np.testing.assert_array_equal, first1.params, first8.params)
    # 1 device vs 8: within 1e-6 (low-bit codes: the same codes, scales within 1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                                         rtol=0, atol=1e-6), after1.params, after8.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6),
                 after1.opt_state["rows"], after8.opt_state["rows"])
    # rows no batch read: values and optimizer state bit-identical to the start (both layouts)
    touched = _touched_rows(method, batches)
    for t in method.row_tables():
        absent = np.asarray(sorted(set(range(t.physical_rows)) - touched[t.name]), np.int64)
        present = np.asarray(sorted(touched[t.name] - {t.sentinel}), np.int64)
        assert absent.size and present.size
        for after, first in ((after1, first1), (after8, first8)):
            for key, arr in after.params["tables"][t.name].items():
                np.testing.assert_array_equal(np.asarray(arr)[absent], np.asarray(first.params["tables"][t.name][key])[absent])
            for key, arr in after.opt_state["rows"].get(t.name, {}).items():
                np.testing.assert_array_equal(np.asarray(arr)[absent],
                                              np.asarray(first.opt_state["rows"][t.name][key])[absent])
        if t.trainable:  # and the rows the batches read did move
            moved = [not np.array_equal(np.asarray(arr)[present], np.asarray(first1.params["tables"][t.name][k])[present])
                     for k, arr in after1.params["tables"][t.name].items()]
            assert any(moved), (name, t.name)


def _collective_elements(hlo: str) -> list[int]:
    """Element counts of every cross-device collective's result in compiled HLO text."""
    sizes = []
    for line in hlo.splitlines():
        if re.search(r"\b(all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)(-start)?\(", line):
            lhs = line.split("=", 1)[1] if "=" in line else line
            for dims in re.findall(r"\w+\[([\d,]*)\]", lhs.split("(")[0]):
                sizes.append(int(np.prod([int(d) for d in dims.split(",") if d] or [1])))
    return sizes


def test_sharded_lookup_moves_only_the_rows_the_batch_needs():
    mesh = _mesh8()
    row_sharding = sparse.RowSharding(mesh, ("data",))
    vocab = (40_000, 24_000)  # a 64,000 x 16 table: 1M floats, 125k per shard
    method = T.build("full", vocab, 16, 1.0, row_multiple=8)
    variables = {"tables": {"embedding": {"w": jax.device_put(jnp.zeros((64_000, 16)), row_sharding.sharding(2))}}}
    ids = jax.device_put(np.zeros((64, 2), np.int32), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    hlo = jax.jit(lambda v, i: T.lookup(method, v, i, sharding=row_sharding)).lower(variables, ids).compile().as_text()
    sizes = _collective_elements(hlo)
    assert sizes, "expected the all-reduce that combines the shards' rows"
    # the batch reads at most 64 * 2 distinct rows of 16 floats: nothing larger crosses devices
    assert max(sizes) <= 64 * 2 * 16, sizes

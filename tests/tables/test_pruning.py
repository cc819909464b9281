"""Pruning: the bisection cut equals NumPy's top-k; schedules ramp to the budget; each method's
pruning step leaves exactly the entries (rows) it should, and serving bytes follow."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import embedjax.tables as T
from embedjax.tables.pruned import keep_largest

VOCAB = (13, 4, 29)
DIM = 6


@pytest.mark.parametrize("k", [0, 1, 7, 50, 99, 100, 150])
def test_keep_largest_matches_numpy_top_k(k):
    values = np.abs(np.random.default_rng(k).normal(size=(20, 5))).astype(np.float32)
    values[0, :3] = 0.0  # zeros are never kept while there is room for fewer
    mask = np.asarray(keep_largest(jnp.asarray(values), k))
    if k >= values.size:
        assert mask.all()
        return
    order = np.argsort(-values, axis=None, kind="stable")[:k]
    expected = np.zeros(values.size, bool)
    expected[order] = True
    expected &= values.reshape(-1) > 0
    np.testing.assert_array_equal(mask.reshape(-1), expected)


def test_keep_largest_never_exceeds_k_with_ties():
    values = jnp.asarray([3.0, 2.0, 2.0, 2.0, 1.0])
    mask = np.asarray(keep_largest(values, 2))
    assert mask.sum() <= 2 and mask[0]


def _state(method, seed=0):
    return nn.meta.unbox(jax.jit(T.EmbeddingTable(method).init)(jax.random.PRNGKey(seed),
                                                                 jnp.zeros((1, len(VOCAB)), jnp.int32)))


def test_magnitude_schedule_ramps_to_the_budget_and_prunes_by_magnitude():
    method = T.build("magnitude", VOCAB, DIM, 0.4, row_multiple=4)
    schedule = method.pruning_schedule(100)
    steps, keeps = list(schedule), list(schedule.values())
    assert steps == sorted(steps) and 20 < steps[0] < 30 and steps[-1] == 60 and len(steps) == 8
    assert keeps == sorted(keeps, reverse=True) and keeps[-1] == method.keep
    v = _state(method)
    w = np.asarray(v["tables"]["embedding"]["w"])
    pruned = method.prune(v["tables"], {}, keeps[0])
    mask = np.asarray(pruned["mask"]["mask"])
    assert mask.sum() == keeps[0] and not mask[sum(VOCAB):].any()  # padding rows stay pruned
    kept = np.abs(w)[mask]
    dropped = np.abs(w[: sum(VOCAB)])[~mask[: sum(VOCAB)]]
    assert kept.min() >= dropped.max()
    np.testing.assert_array_equal(np.asarray(pruned["embedding"]["w"]), w * mask)
    # a later event prunes among the survivors only
    again = method.prune(pruned, {}, method.keep)
    assert int(np.asarray(again["mask"]["mask"]).sum()) == method.keep
    assert not (np.asarray(again["mask"]["mask"]) & ~mask).any()
    assert method.kept(again) == method.keep
    assert method.serve_bytes(method.keep) == int(np.ceil(sum(VOCAB) * DIM / 8)) + 4 * method.keep


def test_pep_switch_keeps_what_the_thresholds_left_then_the_largest():
    method = T.build("pep", VOCAB, DIM, 0.4)
    v = _state(method)
    w = np.asarray(v["tables"]["embedding"]["w"])
    thr = np.full((len(VOCAB), DIM), -4.0, np.float32)  # sigmoid(-4) = 0.018 > most |w| (std 0.01)
    fields = np.repeat(np.arange(len(VOCAB)), VOCAB)
    soft = np.sign(w) * np.maximum(np.abs(w) - 1 / (1 + np.exp(4.0)), 0)
    survivors = int((soft != 0).sum())
    assert 0 < survivors < method.keep
    pruned = method.prune(v["tables"], {"threshold": jnp.asarray(thr)}, method.keep)
    mask = np.asarray(pruned["mask"]["mask"])
    assert mask.sum() == survivors  # fewer than the budget: all of PEP's survivors stay
    np.testing.assert_allclose(np.asarray(pruned["embedding"]["w"]), soft * mask, rtol=1e-6, atol=1e-9)
    # with low thresholds more survive than the budget allows: the largest soft values are kept
    low = method.prune(v["tables"], {"threshold": jnp.full((len(VOCAB), DIM), -12.0)}, method.keep)
    assert int(np.asarray(low["mask"]["mask"]).sum()) == method.keep
    del fields


def test_optembed_switch_prunes_rows_below_their_field_threshold():
    method = T.build("optembed", VOCAB, DIM, 0.5)
    v = _state(method)
    w = np.asarray(v["tables"]["embedding"]["w"])
    norm = np.abs(w).mean(axis=1)
    cut = np.sort(norm[:13])[6:8].mean()  # between two rows' norms: no float ties with the reference
    thr = np.asarray([cut, -1.0, 1.0], np.float32)  # field 2: every row gated off
    pruned = method.prune(v["tables"], {"threshold": jnp.asarray(thr)}, method.keep)
    mask = np.asarray(pruned["mask"]["mask"])[:, 0]
    fields = np.repeat(np.arange(3), VOCAB)
    assert not mask[fields == 2].any()
    np.testing.assert_array_equal(mask[fields == 0], norm[:13] > thr[0])
    assert mask[fields == 1].all()
    assert mask.sum() <= method.keep
    np.testing.assert_array_equal(np.asarray(pruned["embedding"]["w"])[~mask], 0.0)


def test_phases_switch_once():
    pep = T.build("pep", VOCAB, DIM, 0.4)
    phases = [pep.phase_at(s, 10) for s in range(10)]
    assert phases == ["search"] * 5 + ["masked"] * 5
    assert list(pep.pruning_schedule(10)) == [5]
    assert T.build("magnitude", VOCAB, DIM, 0.4).phase_at(0, 10) == "masked"

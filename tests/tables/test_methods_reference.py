"""Every table method equals a NumPy reference on small cases (float32 sums of a few products:
compared at rtol 1e-6, atol 1e-9), through the Linen module and through the row-sparse lookup."""
import itertools

import flax.linen as nn
import jax
import numpy as np
import pytest

import embedjax.tables as T
from embedjax.tables import codecs, hashing
from embedjax.tables.compositional import balanced_factors

VOCAB = (11, 2, 37, 5)  # awkward sizes: a tiny field, a prime one
DIM = 8


def _ids(vocab=VOCAB, n=13, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, v, size=n) for v in vocab], axis=1).astype(np.int32)


def _setup(method, ids, seed=0):
    module = T.EmbeddingTable(method)
    variables = jax.tree.map(np.asarray, nn.meta.unbox(jax.jit(module.init)(jax.random.PRNGKey(seed), ids)))
    return module, variables


def _check(method, variables, module, ids, expected, phase="masked"):
    got_module = np.asarray(jax.jit(lambda v, i: module.apply(v, i, phase))(variables, ids))
    got_sparse = np.asarray(jax.jit(lambda v, i: T.lookup(method, v, i, phase=phase))(variables, ids))
    np.testing.assert_allclose(got_module, expected, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(got_sparse, expected, rtol=1e-6, atol=1e-9)


def _offsets(sizes):
    return np.concatenate([[0], np.cumsum(sizes)[:-1]])


def test_full_table_is_offset_rows():
    method = T.build("full", VOCAB, DIM, 1.0)
    ids = _ids()
    module, v = _setup(method, ids)
    w = v["tables"]["embedding"]["w"]
    _check(method, v, module, ids, w[ids + _offsets(VOCAB)[None, :]])


@pytest.mark.parametrize("combine", ["sum", "concat"])
def test_multiprobe_hashing_matches_the_documented_hash(combine):
    method = T.HashedTable(VOCAB, DIM, buckets=(5, 2, 9, 10) if combine == "concat" else (5, 2, 9, 5),
                           probes=2, combine=combine, hash_seed=3, method="multiprobe")
    ids = _ids()
    module, v = _setup(method, ids)
    w = v["tables"]["embedding"]["w"]
    off = _offsets(method.buckets)
    direct = method.direct_fields()
    expected = np.zeros((len(ids), len(VOCAB), DIM), np.float32)
    for b, f in itertools.product(range(len(ids)), range(len(VOCAB))):
        parts = []
        for j in range(2):
            if direct[f]:
                row = off[f] + (ids[b, f] if combine == "sum" else ids[b, f] * 2 + j)
            else:
                row = off[f] + hashing.hash32_python(int(ids[b, f]), hashing.probe_seed(f, j, 3)) % method.buckets[f]
            parts.append(w[row])
        expected[b, f] = parts[0] + parts[1] if combine == "sum" else np.concatenate(parts)
    assert direct == ((False, True, False, True) if combine == "sum" else (False, False, False, True))
    _check(method, v, module, ids, expected)


def test_multiplexed_probes_land_where_the_documented_hash_says():
    method = T.build("multiplex", VOCAB, DIM, 0.2, probes=2, hash_seed=9)
    rows = method.buckets[0]
    ids = _ids()
    idx = np.asarray(method.indices(ids)["embedding"])
    for b, f, j in itertools.product(range(len(ids)), range(len(VOCAB)), range(2)):
        assert idx[b, f, j] == hashing.hash32_python(int(ids[b, f]), hashing.probe_seed(f, j, 9)) % rows
    module, v = _setup(method, ids)
    w = v["tables"]["embedding"]["w"]
    expected = np.concatenate([w[idx[:, :, 0]], w[idx[:, :, 1]]], axis=-1)
    _check(method, v, module, ids, expected)
    # every field shares the one table: the same id in two fields reads different rows (different seeds)
    same = np.full((1, len(VOCAB)), 1, np.int32)
    assert len({tuple(r) for r in np.asarray(method.indices(same)["embedding"])[0]}) > 1


def test_quotient_remainder_equals_its_composed_parts():
    method = T.QuotientRemainderTable(VOCAB, DIM, remainders=(4, 1, 7, 2))
    ids = _ids()
    module, v = _setup(method, ids)
    # make the remainder rows non-trivial (they start at 1)
    v["tables"]["remainder"]["w"] = np.random.default_rng(1).normal(size=v["tables"]["remainder"]["w"].shape
                                                                     ).astype(np.float32)
    q, r = v["tables"]["quotient"]["w"], v["tables"]["remainder"]["w"]
    m = np.asarray(method.remainders)
    quotients = [int(np.ceil(vs / ms)) for vs, ms in zip(VOCAB, m)]
    expected = q[_offsets(quotients)[None, :] + ids // m[None, :]] * r[_offsets(m)[None, :] + ids % m[None, :]]
    _check(method, v, module, ids, expected)
    # (quotient, remainder) pairs are distinct: no two ids of a field share an embedding
    for f, size in enumerate(VOCAB):
        pairs = {(i // m[f], i % m[f]) for i in range(size)}
        assert len(pairs) == size


def test_tensor_train_row_equals_the_row_of_the_reconstructed_table():
    method = T.TensorTrainTable(VOCAB, DIM, rank=3, tt_fields=(True, False, True, True))
    ids = _ids()
    module, v = _setup(method, ids)
    t = v["tables"]
    d1, d2, d3 = method.dim_factors
    whole_off = _offsets([0 if tt else vs for vs, tt in zip(VOCAB, method.tt_fields)])
    expected = np.zeros((len(ids), len(VOCAB), DIM))
    for f, size in enumerate(VOCAB):
        if not method.tt_fields[f]:
            expected[:, f] = t["whole"]["w"][whole_off[f] + ids[:, f]]
            continue
        v1, v2, v3 = balanced_factors(size)
        offs = [_offsets(method.core_rows(k))[f] for k in range(3)]
        g1 = t["core1"]["w"][offs[0]:offs[0] + v1].reshape(v1, d1, 3).astype(np.float64)
        g2 = t["core2"]["w"][offs[1]:offs[1] + v2].reshape(v2, 3, d2, 3).astype(np.float64)
        g3 = t["core3"]["w"][offs[2]:offs[2] + v3].reshape(v3, 3, d3).astype(np.float64)
        # the full TT matrix [v1 v2 v3, d1 d2 d3], built by one contraction, then cut to the vocab
        full = np.einsum("iar,jrbs,ksc->ijkabc", g1, g2, g3).reshape(v1 * v2 * v3, DIM)[:size]
        expected[:, f] = full[ids[:, f]]
    _check(method, v, module, ids, expected.astype(np.float32))
    np.testing.assert_allclose(np.std(expected[:, [0, 2, 3]]), 0.01, rtol=0.6)  # init keeps the scale


def test_mixed_dimension_reference():
    method = T.MixedDimTable(VOCAB, DIM, hot=(3, 2, 10, 0), low_dim=2)
    ids = _ids()
    module, v = _setup(method, ids)
    hot, cold, proj = v["tables"]["hot"]["w"], v["tables"]["cold"]["w"], v["params"]["projection"]
    hot_n = np.asarray(method.hot)
    cold_n = np.asarray(VOCAB) - hot_n
    expected = np.zeros((len(ids), len(VOCAB), DIM), np.float32)
    for b, f in itertools.product(range(len(ids)), range(len(VOCAB))):
        i = ids[b, f]
        if i < hot_n[f]:
            expected[b, f] = hot[_offsets(hot_n)[f] + i]
        else:
            expected[b, f] = cold[_offsets(cold_n)[f] + i - hot_n[f]] @ proj[f]
    _check(method, v, module, ids, expected)


@pytest.mark.parametrize("storage,update", [("int8", "stochastic"), ("int4", "stochastic"), ("fp8", "stochastic"),
                                            ("int8", "straight_through")])
def test_low_bit_tables_decode_their_codes(storage, update):
    method = T.build("lowbit", VOCAB, DIM, 0.2, storage=storage, update=update)
    ids = _ids()
    module, v = _setup(method, ids)
    stored = v["tables"]["embedding"]
    rows = method.indices(ids)["embedding"][:, :, 0]
    if update == "stochastic":
        assert set(stored) == {"codes", "scale"}
        decoded = np.asarray(codecs.decode(storage, {k: a[np.asarray(rows)] for k, a in stored.items()}, DIM))
    else:  # float32 master rows, quantised in the forward pass
        decoded = np.asarray(codecs.fake_quantize(storage, stored["w"][np.asarray(rows)]))
    _check(method, v, module, ids, decoded)


def test_pruned_tables_reference_in_both_phases():
    ids = _ids()
    for name in ("magnitude", "pep", "optembed"):
        method = T.build(name, VOCAB, DIM, 0.5)
        module, v = _setup(method, ids)
        rng = np.random.default_rng(2)
        t = v["tables"]
        width = t["mask"]["mask"].shape[1]
        t["mask"]["mask"] = rng.random((t["mask"]["mask"].shape[0], width)) < 0.7
        rows = ids + _offsets(VOCAB)[None, :]
        w, mask = t["embedding"]["w"][rows], t["mask"]["mask"][rows].astype(np.float32)
        _check(method, v, module, ids, w * mask, phase="masked")
        if name == "pep":
            v["params"]["threshold"] = rng.normal(-4.5, 0.3, size=(len(VOCAB), DIM)).astype(np.float32)
            thr = 1 / (1 + np.exp(-v["params"]["threshold"]))
            soft = np.sign(w) * np.maximum(np.abs(w) - thr[None], 0) * mask
            assert (soft == 0).mean() > (mask == 0).mean()  # the thresholds prune on top of the mask
            _check(method, v, module, ids, soft, phase="search")
        if name == "optembed":
            v["params"]["threshold"] = np.asarray([0.0, 1.0, 0.008, -1.0], np.float32)
            gate = (np.abs(w).mean(-1, keepdims=True) > v["params"]["threshold"][None, :, None])
            _check(method, v, module, ids, w * mask * gate, phase="search")

"""CodeIndex: every kind, two-stage rescoring, sharded search over 8 devices, save/load."""
import jax
import numpy as np
import pytest

from embedjax.index import CodeIndex, search_embeddings


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    d = rng.standard_normal((1003, 64)).astype(np.float32)  # 1003: not a multiple of 8 devices or chunks
    d[500] = d[20]  # duplicate: ties resolved to the smaller id everywhere
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    q = rng.standard_normal((6, 64)).astype(np.float32)
    q[1] = d[20]
    return q, d


def numpy_topk(scores, k):
    idx = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    order = np.lexsort((idx, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), order


def test_binary_index_is_exact_hamming(data):
    q, d = data
    s, i = CodeIndex.build(d, "binary").search(q, 10, chunk_size=300)
    neg_ham = -((q > 0)[:, None, :] != (d > 0)[None, :, :]).sum(-1)
    ref_s, ref_i = numpy_topk(neg_ham.astype(np.float64), 10)
    np.testing.assert_array_equal(np.asarray(i), ref_i)
    np.testing.assert_array_equal(np.asarray(s), ref_s)


@pytest.mark.parametrize("kind, setting", [("int8", "int8"), ("int4", "int4"), ("fp8", "fp8"), ("float32", None)])
def test_kinds_agree_with_search_embeddings(data, kind, setting):
    q, d = data
    s, i = CodeIndex.build(d, kind).search(q, 10)
    ref_s, ref_i = search_embeddings(q, d, 10, quantization=setting)
    np.testing.assert_array_equal(np.asarray(i), ref_i)
    np.testing.assert_allclose(np.asarray(s), ref_s, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rescore, setting", [("float32", "binary+rescore"), ("int8", "binary+int8rescore")])
def test_two_stage(data, rescore, setting):
    q, d = data
    index = CodeIndex.build(d, "binary", rescore=rescore)
    s, i = index.search(q, 10, rescore_multiplier=5)
    ref_s, ref_i = search_embeddings(q, d, 10, quantization=setting, rescore_multiplier=5)
    np.testing.assert_array_equal(np.asarray(i), ref_i)
    np.testing.assert_allclose(np.asarray(s), ref_s, atol=1e-5)
    if rescore == "float32":
        np.testing.assert_allclose(np.asarray(s), np.einsum("qd,qkd->qk", q, d[np.asarray(i)]), atol=1e-5)
    assert np.asarray(i)[1, 0] == 20  # the duplicate pair 20/500 ties; the smaller id wins


@pytest.mark.parametrize("kind, rescore", [("binary", None), ("int8", None), ("fp8", None), ("binary", "float32")])
def test_sharded_equals_single_device(data, kind, rescore):
    q, d = data
    assert len(jax.devices()) == 8, "tests/conftest.py sets 8 fake CPU devices"
    mesh = jax.make_mesh((8,), ("data",))
    index = CodeIndex.build(d, kind, rescore=rescore)
    s1, i1 = index.search(q, 25, chunk_size=64)
    s8, i8 = index.search(q, 25, chunk_size=64, mesh=mesh, axis="data")
    np.testing.assert_array_equal(np.asarray(i8), np.asarray(i1))
    np.testing.assert_allclose(np.asarray(s8), np.asarray(s1), rtol=1e-6)


def test_sharded_with_k_larger_than_a_shard(data):
    q, d = data
    mesh = jax.make_mesh((8,), ("data",))
    index = CodeIndex.build(d[:50], "binary")
    s1, i1 = index.search(q, 40)
    s8, i8 = index.search(q, 40, mesh=mesh)
    np.testing.assert_array_equal(np.asarray(i8), np.asarray(i1))


@pytest.mark.parametrize("kind, rescore", [("binary", "int8"), ("int4", None), ("fp8", None), ("float32", None)])
def test_save_load_round_trip(tmp_path, data, kind, rescore):
    q, d = data
    index = CodeIndex.build(d, kind, rescore=rescore)
    index.save(tmp_path / "idx.npz")
    loaded = CodeIndex.load(tmp_path / "idx.npz")
    assert loaded.kind == kind and loaded.dim == 64 and loaded.codes.dtype == index.codes.dtype
    for a, b in zip(index.search(q, 7), loaded.search(q, 7)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_inputs(tmp_path, data):
    q, d = data
    index = CodeIndex.build(d, "binary")
    with pytest.raises(ValueError, match="built with 64"):
        index.search(q[:, :32], 3)
    with pytest.raises(ValueError, match="larger than the index"):
        index.search(q, 2000)
    with pytest.raises(ValueError, match="empty"):
        CodeIndex.build(d[:0], "binary")
    with pytest.raises(ValueError, match="kind"):
        CodeIndex.build(d, "int3")
    with pytest.raises(ValueError, match="not an axis"):
        index.search(q, 3, mesh=jax.make_mesh((8,), ("data",)), axis="model")
    np.savez(tmp_path / "other.npz", codes=np.zeros(3))
    with pytest.raises(ValueError, match="not a CodeIndex file"):
        CodeIndex.load(tmp_path / "other.npz")


@pytest.mark.parametrize("kind", ["binary", "int8", "int4", "fp8"])
def test_the_pallas_first_stage_searches_the_scan_layout_and_equals_xla(kind):
    """Where the first stage runs the Pallas scans (natively on a GPU; interpret mode here) the index
    searches its scan-layout copy: `scan_rows` rows (300 -> 384) of zeros past the corpus, binary
    codes word-major with 3 words padded to 4, and no row-major device copy beside it. The results
    equal the XLA scan's over the stored codes: ties (duplicate rows), a shared mask and per-query
    masks that pass fewer than k rows for one query, range predicates, and k = N."""
    from embedjax.kernels.row_filter import RowPredicates
    from embedjax.kernels.two_pass_topk import scan_rows

    rng = np.random.default_rng(5)
    d = rng.standard_normal((300, 72)).astype(np.float32)  # 72 bits: 3 uint32 words
    d[171], d[250] = d[3], d[3]
    q = rng.standard_normal((5, 72)).astype(np.float32)
    q[2] = d[3]
    per_query = rng.random((5, 300)) < 0.5
    per_query[4] = False
    per_query[4, [7, 171, 290]] = True  # 3 passing rows for k = 7: 4 missing results
    attrs = rng.integers(0, 4, (1, 300)).astype(np.float32)
    predicates = RowPredicates(attrs, np.array([[1.0]], np.float32), np.array([[2.0]], np.float32))
    index = CodeIndex.build(d, kind)
    # k = 300: every row, so a search that reached the zero rows past the corpus would return them
    for k, flt in ((7, None), (7, rng.random(300) < 0.6), (7, per_query), (7, predicates), (300, None)):
        want_s, want_i = index.search(q, k, impl="xla", filter=flt)
        got_s, got_i = index.search(q, k, impl="pallas", filter=flt)
        np.testing.assert_array_equal(np.asarray(got_i), np.asarray(want_i))
        # fp8 sums its float32 products in another order than the twin: scores reach ~30, so a
        # few ulps of the largest (~4e-6 measured); the integer kinds' scores are equal.
        np.testing.assert_allclose(np.asarray(got_s), np.asarray(want_s), rtol=1e-6, atol=2e-5)
        if flt is per_query:
            assert (np.asarray(got_i)[4] == -1).sum() == 4
    x = index._scan_x_args()[0]
    rows = scan_rows(300)
    if kind == "binary":
        assert x.shape == (4, rows) and not np.asarray(x)[3].any() and not np.asarray(x)[:, 300:].any()
    else:
        assert x.shape[0] == rows and not np.asarray(x)[300:].view(np.uint8).any()
    assert "codes" in index._device  # the XLA searches made the row-major copy; drop it and search again
    index._device.pop("codes")
    index.search(q, 7, impl="pallas")
    assert "codes" not in index._device

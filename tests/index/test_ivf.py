"""IVFIndex and its k-means: nprobe == nlist equals exhaustive search (ties included), recall rises with
nprobe, filters inside the lists, approx_max_k selection, sharded training, save/load, bad input."""
import jax
import numpy as np
import pytest

from embedjax.index import CodeIndex
from embedjax.index.attributes import AttributeFilter, Attributes, Eq
from embedjax.index.ivf import IVFIndex
from embedjax.index.kmeans import assign, kmeans


@pytest.fixture(scope="module")
def clustered():
    """1003 unit vectors around 24 centres (awkward size), with duplicates across the corpus."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((24, 32))
    d = (centres[rng.integers(0, 24, 1003)] + 0.35 * rng.standard_normal((1003, 32))).astype(np.float32)
    d[500] = d[20]  # exact duplicates: equal scores, the smaller id must win
    d[999] = d[20]
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    q = rng.standard_normal((9, 32)).astype(np.float32)
    q[2] = d[20]
    return q, d


@pytest.fixture(scope="module")
def indexes(clustered):
    _, d = clustered
    built = {}
    for kind, rescore in [("float32", None), ("binary", None), ("int8", None), ("binary", "float32")]:
        built[kind, rescore] = (IVFIndex.build(d, 16, kind, rescore=rescore, seed=1), CodeIndex.build(d, kind,
                                                                                                       rescore=rescore))
    return built


@pytest.mark.parametrize("kind, rescore", [("float32", None), ("binary", None), ("int8", None), ("binary", "float32")])
def test_all_lists_equal_exhaustive_search(clustered, indexes, kind, rescore):
    q, _ = clustered
    ivf, flat = indexes[kind, rescore]
    s_ref, i_ref = (np.asarray(a) for a in flat.search(q, 25, chunk_size=128))
    s, i = ivf.search(q, 25, nprobe=ivf.nlist, chunk_size=128)
    np.testing.assert_array_equal(i, i_ref)  # binary: Hamming ties everywhere, still the smaller corpus id
    np.testing.assert_allclose(s, s_ref, rtol=1e-6, atol=1e-6)  # same codes, same kernels; rescoring in batches
    assert i[2, 0] == 20


def test_pallas_scan_equals_xla_scan(clustered, indexes):
    """The Pallas kernel vmapped over lists (interpret mode on CPU) == its jnp twin, with attribute predicates
    evaluated inside the kernel and a shared mask."""
    q, _ = clustered
    ivf, _ = indexes["binary", None]
    attrs = Attributes.from_columns(categorical={"tenant": np.arange(1003) % 3})
    flt = AttributeFilter(attrs, [Eq("tenant", t) for t in (0, 1, 2)])
    shared = np.arange(1003) % 4 != 1
    for f in (None, flt, shared):
        a = ivf.search(q[:3], 10, nprobe=2, impl="xla", filter=f, filter_strategy="in")
        b = ivf.search(q[:3], 10, nprobe=2, impl="pallas", filter=f, filter_strategy="in")
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[0], b[0])


def test_recall_never_drops_as_nprobe_grows_float(clustered, indexes):
    """With exact float scores a larger probe set is a superset: per-query recall is monotone."""
    q, _ = clustered
    ivf, flat = indexes["float32", None]
    ref = np.asarray(flat.search(q, 10)[1])
    previous = np.zeros(q.shape[0])
    for nprobe in (1, 2, 3, 5, 8, 13, 16):
        ids = ivf.search(q, 10, nprobe=nprobe)[1]
        recall = np.array([len(set(a) & set(b)) / 10 for a, b in zip(ids, ref)])
        assert np.all(recall >= previous)
        previous = recall
    assert previous.min() == 1.0


def test_lists_are_padded_static_blocks(clustered, indexes):
    _, d = clustered
    ivf, _ = indexes["int8", None]
    ids, owner_list = ivf.block_ids, ivf.block_list
    assert ids.shape == (len(owner_list), 32) == (ivf.lists.size // 32, ivf.block_rows)
    np.testing.assert_array_equal(np.sort(ids[ids >= 0]), np.arange(1003))  # every row exactly once
    assert np.all(np.diff(owner_list) >= 0)  # a list's blocks are contiguous
    first, count = ivf.list_blocks()
    owner = assign(d, ivf.centroids)
    for list_index in range(ivf.nlist):
        members = ivf.list_members(list_index)
        np.testing.assert_array_equal(members, np.flatnonzero(owner == list_index))  # ascending ids
        blocks = ids[first[list_index]: first[list_index] + count[list_index]]
        assert count[list_index] == -(-len(members) // 32)  # padding: less than one block per list
        assert np.all(blocks.reshape(-1)[len(members):] == -1)
    np.testing.assert_array_equal(ivf.list_sizes(), np.bincount(owner, minlength=16))
    assert ivf.padding_fraction() == pytest.approx(1 - 1003 / ids.size)
    assert ivf.padding_fraction() < 16 * 32 / ids.size


@pytest.mark.parametrize("strategy", ["in", "pre", "post"])
def test_filters_inside_ivf(clustered, indexes, strategy):
    q, d = clustered
    rng = np.random.default_rng(3)
    mask = rng.random((9, 1003)) < 0.1
    mask[0] = False
    mask[1] = False
    mask[1, [20, 500, 7]] = True  # 3 < k rows pass, two of them tied
    # Without rescoring every strategy returns the first 10 passing rows of the same (Hamming, id) order.
    # (With rescoring "post" differs by design: it rescores depth * multiplier candidates, not k * multiplier.)
    ivf, flat = indexes["binary", None]
    ref = np.asarray(flat.search(q, 10, filter=mask, filter_strategy="in")[1])
    s, i = ivf.search(q, 10, nprobe=ivf.nlist, filter=mask, filter_strategy=strategy, post_multiplier=64.0)
    np.testing.assert_array_equal(i, ref)
    ivf_r, flat_r = indexes["binary", "float32"]
    if strategy != "post":
        np.testing.assert_array_equal(
            ivf_r.search(q, 10, nprobe=16, filter=mask, filter_strategy=strategy)[1],
            np.asarray(flat_r.search(q, 10, filter=mask, filter_strategy="in")[1]))
    assert np.all(i[0] == -1) and np.all(np.isneginf(s[0]))
    assert set(i[1, :3]) == {7, 20, 500} and np.all(i[1, 3:] == -1)
    assert list(i[1]).index(20) < list(i[1]).index(500)  # the tied duplicates: smaller id first
    # Few probed lists: "in" returns only rows of the probed lists that pass, never a failing row.
    s, i = ivf.search(q, 10, nprobe=2, filter=mask, filter_strategy="in")
    probed = ivf.probe(q, 2)
    for row in range(9):
        found = i[row][i[row] >= 0]
        assert np.all(mask[row, found])
        assert set(found) <= set(np.concatenate([ivf.list_members(p) for p in probed[row]]))


def test_attribute_filter_in_ivf(clustered, indexes):
    q, d = clustered
    attrs = Attributes.from_columns(categorical={"tenant": np.arange(1003) % 7})
    flt = AttributeFilter(attrs, [Eq("tenant", t % 7) for t in range(9)])
    ivf, flat = indexes["float32", None]
    np.testing.assert_array_equal(ivf.search(q, 10, nprobe=16, filter=flt, filter_strategy="in")[1],
                                  np.asarray(flat.search(q, 10, filter=flt)[1]))


def test_approx_max_k_selection(clustered, indexes):
    q, _ = clustered
    ivf, flat = indexes["float32", None]
    jaxpr = str(jax.make_jaxpr(lambda x: jax.lax.approx_max_k(x, 3))(np.ones((2, 8), np.float32)))
    assert "approx_top_k" in jaxpr
    probes = ivf.probe(q, 4, selection="approx")
    # On CPU approx_max_k falls back to an exact sort: the same lists and results as exact selection.
    np.testing.assert_array_equal(probes, ivf.probe(q, 4))
    s, i = ivf.search(q, 10, nprobe=16, selection="approx")
    np.testing.assert_array_equal(i, np.asarray(flat.search(q, 10)[1]))


def test_kmeans_sharded_equals_single_device(clustered):
    _, d = clustered
    mesh = jax.make_mesh((8,), ("data",))
    c1, info1 = kmeans(d, 24, iters=10, seed=3)
    c8, info8 = kmeans(d, 24, iters=10, seed=3, mesh=mesh)
    np.testing.assert_allclose(c8, c1, atol=1e-5)  # psum of 8 partial sums vs one sum: float32 reassociation
    np.testing.assert_array_equal(info8["counts"], info1["counts"])
    np.testing.assert_array_equal(assign(d, c8), assign(d, c1))
    assert info1["counts"].sum() == 1003
    np.testing.assert_allclose(np.linalg.norm(c1, axis=1), 1.0, rtol=1e-5)  # spherical: unit centroids


def test_kmeans_reseeds_empty_clusters():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((200, 8)).astype(np.float32)
    x[:100] = x[0]  # half the points identical: several initial centroids coincide and would stay empty
    c, info = kmeans(x, 12, iters=8, seed=0)
    assert np.all(info["counts"] > 0)
    assert len(np.unique(np.round(c, 5), axis=0)) == 12
    c2, info2 = kmeans(x, 12, iters=8, seed=0, metric="l2")
    assert np.all(info2["counts"] > 0)


def test_save_load_and_code_type_checks(tmp_path, clustered, indexes):
    q, _ = clustered
    ivf, _ = indexes["binary", "float32"]
    ivf.save(tmp_path / "ivf.npz")
    back = IVFIndex.load(tmp_path / "ivf.npz", kind="binary")
    assert back.kind == "binary" and back.rescore == "float32" and back.nlist == 16
    for a, b in zip(ivf.search(q, 10, nprobe=3), back.search(q, 10, nprobe=3)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="was built with code type 'binary', not 'int8'"):
        IVFIndex.load(tmp_path / "ivf.npz", kind="int8")
    with pytest.raises(ValueError, match="holds an IVFIndex, not a CodeIndex; load it with IVFIndex.load"):
        CodeIndex.load(tmp_path / "ivf.npz")
    CodeIndex.build(clustered[1], "int8").save(tmp_path / "flat.npz")
    with pytest.raises(ValueError, match="holds an CodeIndex, not a IVFIndex"):
        IVFIndex.load(tmp_path / "flat.npz")
    with pytest.raises(ValueError, match="was built with code type 'int8', not 'binary'"):
        CodeIndex.load(tmp_path / "flat.npz", kind="binary")


def test_bad_inputs(clustered, indexes):
    q, d = clustered
    ivf, _ = indexes["float32", None]
    for nprobe in (0, 17, 2.0):
        with pytest.raises(ValueError, match=r"nprobe=.* is out of range: probe between 1 and nlist=16"):
            ivf.search(q, 5, nprobe=nprobe)
    with pytest.raises(ValueError, match="selection"):
        ivf.search(q, 5, nprobe=2, selection="fast")
    with pytest.raises(ValueError, match="has 1002 entries"):
        ivf.search(q, 5, nprobe=2, filter=np.ones(1002, bool))
    with pytest.raises(ValueError, match="nlist=2000"):
        IVFIndex.build(d, 2000)
    with pytest.raises(ValueError, match="kind"):
        IVFIndex.build(d, 4, "int3")
    with pytest.raises(ValueError, match="built with 32"):
        ivf.search(q[:, :16], 5, nprobe=2)
    with pytest.raises(ValueError, match="num_clusters"):
        kmeans(d, 0)

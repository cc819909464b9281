"""Filtered search_embeddings / CodeIndex.search: every strategy == NumPy brute force over the mask.

The NumPy references rank by the setting's own integer or float64 scores computed
here (Hamming distances from float signs, int64 dot products of the int8 codes), over
the rows each query's mask passes, ties -> smaller row, -1 / -inf padding when fewer
than k rows pass. Corpus size 301 (awkward), duplicated rows (exact ties).
"""
import jax
import numpy as np
import pytest

from embedjax.index import CodeIndex, search_embeddings
from embedjax.index.attributes import And, AttributeFilter, Attributes, Eq, Range
from embedjax.index.filtered import Backend, filtered_search, resolve_filter, selectivity
from embedjax.quant.scalar import affine_query_transform, calibrate_ranges, quantize_int8, quantize_symmetric_int8

STRATEGIES = ["in", "pre", "post", "auto"]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    d = rng.standard_normal((301, 48)).astype(np.float32)
    d[150] = d[10]  # exact duplicates: ties go to the smaller id
    d[299] = d[10]
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    q = rng.standard_normal((8, 48)).astype(np.float32)
    q[3] = d[10]
    mask = rng.random((8, 301)) < 0.15
    mask[0] = False  # nothing passes
    mask[1] = False
    mask[1, [5, 10, 150, 200]] = True  # 4 < k rows pass, two of them tied
    mask[3, [10, 150, 299]] = True
    mask[5] = rng.random(301) < 0.01  # very selective (pre under auto)
    mask[6] = True  # everything passes
    return q, d, mask


def reference(scores_qn, mask_qn, k):
    s = np.where(mask_qn, scores_qn.astype(np.float64), -np.inf)
    order = np.lexsort((np.broadcast_to(np.arange(s.shape[1]), s.shape), -s), axis=1)[:, :k]
    top = np.take_along_axis(s, order, 1)
    return top, np.where(np.isfinite(top), order, -1)


def assert_ids(ids, ref_ids):
    np.testing.assert_array_equal(np.asarray(ids), ref_ids)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_float32_equals_numpy(data, strategy):
    q, d, mask = data
    s, i = search_embeddings(q, d, 10, filter=mask, filter_strategy=strategy, post_multiplier=64.0)
    ref_s, ref_i = reference(q.astype(np.float64) @ d.astype(np.float64).T, mask, 10)
    assert_ids(i, ref_i)
    np.testing.assert_allclose(s, ref_s, atol=1e-5)  # float32 dots of unit vectors; -inf where missing


def test_post_filter_in_query_chunks_equals_numpy(data, monkeypatch):
    """Post-filtering runs its queries in chunks bounded by POST_FILTER_SLOTS (so a rescoring gather stays
    small); at 512 slots the depth-301 queries go one per chunk, and the results are unchanged."""
    from embedjax.index import filtered

    q, d, mask = data
    monkeypatch.setattr(filtered, "POST_FILTER_SLOTS", 512)
    s, i = search_embeddings(q, d, 10, filter=mask, filter_strategy="post", post_multiplier=64.0)
    ref_s, ref_i = reference(q.astype(np.float64) @ d.astype(np.float64).T, mask, 10)
    assert_ids(i, ref_i)
    np.testing.assert_allclose(s, ref_s, atol=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_binary_equals_numpy(data, strategy):
    q, d, mask = data
    s, i = search_embeddings(q, d, 10, quantization="binary", filter=mask, filter_strategy=strategy,
                             post_multiplier=64.0)
    pm1 = lambda x: np.where(x > 0, 1, -1)
    ref_s, ref_i = reference(pm1(q) @ pm1(d).T, mask, 10)
    assert_ids(i, ref_i)
    np.testing.assert_array_equal(s, ref_s.astype(np.float32))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_int8_equals_numpy(data, strategy):
    q, d, mask = data
    s, i = search_embeddings(q, d, 10, quantization="int8", filter=mask, filter_strategy=strategy,
                             post_multiplier=64.0)
    lo, hi = calibrate_ranges(d)
    q_codes, _ = quantize_symmetric_int8(affine_query_transform(q, lo, hi, 256)[0])
    # The per-query scale and offset do not change a query's ranking: rank by the exact int64 dot products.
    dots = np.asarray(q_codes).astype(np.int64) @ np.asarray(quantize_int8(d, lo, hi)).astype(np.int64).T
    _, ref_i = reference(dots, mask, 10)
    assert_ids(i, ref_i)
    assert np.all(np.isneginf(s[ref_i < 0])) and np.all(np.isfinite(s[ref_i >= 0]))


@pytest.mark.parametrize("setting", ["binary+rescore", "int4", "fp8", "residual2", "pca24", "lsh96+asym"])
def test_other_settings_agree_across_strategies(data, setting):
    """Every setting filters inside its kernels; pre-filtering (compact corpus) gives the same answer."""
    q, d, mask = data
    s_in, i_in = search_embeddings(q, d, 10, quantization=setting, filter=mask, filter_strategy="in")
    s_pre, i_pre = search_embeddings(q, d, 10, quantization=setting, filter=mask, filter_strategy="pre")
    assert_ids(i_pre, i_in)
    # The same float32 sums (<= 96 terms), computed in batches of another shape and so reassociated
    # differently: equal up to a few ulps of the summands (scores reach ~15 for lsh96+asym).
    np.testing.assert_allclose(s_pre, s_in, rtol=1e-5, atol=1e-6)
    assert np.all(mask[np.arange(8)[:, None].repeat(10, 1)[i_in >= 0], i_in[i_in >= 0]])
    np.testing.assert_array_equal((i_in >= 0).sum(1), np.minimum(mask.sum(1), 10))


def test_post_filter_too_shallow_loses_rows_and_says_so(data):
    """Post-filtering searches k * multiplier / selectivity deep: anti-correlated filters can miss rows."""
    q, d, _ = data
    scores = q @ d.T
    mask = np.zeros((8, 301), bool)
    for row in range(8):  # only the 12 rows that score worst for this query pass
        mask[row, np.argsort(scores[row])[:12]] = True
    _, i_post = search_embeddings(q, d, 10, filter=mask, filter_strategy="post", post_multiplier=1.0)
    _, i_in = search_embeddings(q, d, 10, filter=mask, filter_strategy="in")
    assert np.all(i_in >= 0)
    assert np.all(i_post == -1)  # depth 256 of 301 never reaches the 12 worst rows
    _, i_deep = search_embeddings(q, d, 10, filter=mask, filter_strategy="post", post_multiplier=64.0)
    assert_ids(i_deep, i_in)  # deep enough: exact


def test_auto_picks_by_measured_selectivity():
    """auto routes queries below pre_max_selectivity to pre-filtering and the rest to the in-kernel mask."""
    calls = []
    rng = np.random.default_rng(1)
    d = rng.standard_normal((400, 8)).astype(np.float32)

    def backend(rows):
        def search(q, k, row_filter):
            calls.append(("search", len(rows), q.shape[0], row_filter is not None))
            return search_embeddings(q, d[rows], k, filter=row_filter, filter_strategy="in")

        return Backend(search=search, subset=lambda idx: backend(rows[idx]))

    mask = np.zeros((3, 400), bool)
    mask[0, :4] = True  # 1 %
    mask[1, :200] = True  # 50 %
    mask[2, :400] = True  # 100 %
    np.testing.assert_allclose(selectivity(mask, 3, 400), [0.01, 0.5, 1.0])
    q = rng.standard_normal((3, 8)).astype(np.float32)
    s, i = filtered_search(backend(np.arange(400)), q, 5, resolve_filter(mask, 3, 400), 400, strategy="auto",
                           pre_max_selectivity=0.02, post_min_selectivity=0.9)
    assert ("search", 4, 1, True) in calls  # pre: a 4-row compact corpus (padding masked)
    assert ("search", 400, 1, True) in calls  # in: the 50 % query scans the corpus with its mask
    assert ("search", 400, 1, False) in calls  # post: the 100 % query searches unfiltered, then drops
    assert (i[0] < 4).all() and (i[0] >= 0).sum() == 4 and (i[0] == -1).sum() == 1


@pytest.mark.parametrize("kind, rescore", [("binary", None), ("int8", None), ("float32", None), ("binary", "float32")])
@pytest.mark.parametrize("strategy", ["in", "pre", "post"])
def test_code_index_filtered(data, kind, rescore, strategy):
    q, d, mask = data
    index = CodeIndex.build(d, kind, rescore=rescore)
    s, i = index.search(q, 10, filter=mask, filter_strategy=strategy, post_multiplier=64.0, chunk_size=64)
    s_all, i_all = (np.asarray(a) for a in index.search(q, 301))  # the index's full unfiltered ranking
    if rescore is None:
        # Filtering keeps the unfiltered order: the first 10 passing rows of the full ranking.
        ref = np.full((8, 10), -1)
        for row in range(8):
            passing = [j for j in i_all[row] if mask[row, j]][:10]
            ref[row, : len(passing)] = passing
        assert_ids(i, ref)
    else:  # rescoring only sees passing candidates: exact float scores of passing rows
        ok = np.asarray(i) >= 0
        np.testing.assert_allclose(np.asarray(s)[ok], np.einsum("qd,qkd->qk", q, d[np.asarray(i)])[ok], atol=1e-5)
        assert np.all(mask[np.nonzero(ok)[0], np.asarray(i)[ok]])


def test_sharded_filtered_equals_single_device(data):
    q, d, mask = data
    mesh = jax.make_mesh((8,), ("data",))
    attrs = Attributes.from_columns(numeric={"t": np.arange(301) % 17})
    predicates = AttributeFilter(attrs, [Range("t", lo, lo + 3) for lo in range(8)])
    for kind in ("binary", "int8"):
        index = CodeIndex.build(d, kind)
        for flt in (mask, mask[2], predicates):
            one = index.search(q, 12, filter=flt, filter_strategy="in", chunk_size=16)
            eight = index.search(q, 12, filter=flt, filter_strategy="in", chunk_size=16, mesh=mesh)
            assert_ids(eight[1], np.asarray(one[1]))
            np.testing.assert_array_equal(np.asarray(eight[0]), np.asarray(one[0]))


def test_attribute_filters_equal_masks_built_from_raw_columns(data):
    q, d, _ = data
    rng = np.random.default_rng(2)
    source = rng.choice(["scifact", "nfcorpus", "msmarco"], 301)
    year = rng.integers(1990, 2024, 301)
    score = rng.random(301).astype(np.float32)
    attrs = Attributes.from_columns(categorical={"source": source}, numeric={"year": year, "score": score})
    cut = float(score[17])  # a bound equal to a stored value: Range is lo <= v < hi exactly
    preds = [Eq("source", "scifact"), Eq("source", "msmarco") & Range("year", 2000, 2010), Range("score", cut),
             Range("score", None, cut), None, Eq("source", "arxiv"), And((Eq("year", 2003), Eq("source", "nfcorpus"))),
             Range("year", 2010, 2000)]
    expected = np.stack([source == "scifact", (source == "msmarco") & (year >= 2000) & (year < 2010), score >= cut,
                         score < cut, np.ones(301, bool), np.zeros(301, bool), (year == 2003) & (source == "nfcorpus"),
                         np.zeros(301, bool)])
    flt = AttributeFilter(attrs, preds)
    np.testing.assert_array_equal(flt.masks(), expected)
    ref = reference(q.astype(np.float64) @ d.astype(np.float64).T, expected, 10)[1]
    for strategy in STRATEGIES:
        assert_ids(search_embeddings(q, d, 10, filter=flt, filter_strategy=strategy, post_multiplier=64.0)[1], ref)
    shared = AttributeFilter(attrs, Eq("source", "nfcorpus"))
    assert_ids(search_embeddings(q, d, 10, filter=shared)[1],
               reference(q.astype(np.float64) @ d.astype(np.float64).T, np.broadcast_to(source == "nfcorpus",
                                                                                        (8, 301)), 10)[1])


def test_bad_filter_inputs(data):
    q, d, mask = data
    attrs = Attributes.from_columns(categorical={"source": np.array(["a", "b"] * 150 + ["a"])},
                                    numeric={"year": np.arange(301)})
    with pytest.raises(ValueError, match="has 300 entries per query but the corpus has 301 rows"):
        search_embeddings(q, d, 5, filter=mask[:, :300])
    with pytest.raises(ValueError, match="unknown attribute 'lang'; the corpus has: source, year"):
        search_embeddings(q, d, 5, filter=AttributeFilter(attrs, Eq("lang", "en")))
    with pytest.raises(ValueError, match="Range on the categorical attribute 'source'"):
        AttributeFilter(attrs, Range("source", 0, 1))
    with pytest.raises(ValueError, match="3 per-query predicates for 8 queries"):
        search_embeddings(q, d, 5, filter=AttributeFilter(attrs, [Eq("source", "a")] * 3))
    with pytest.raises(ValueError, match="describe 301 rows but the corpus has 300"):
        search_embeddings(q, d[:300], 5, filter=AttributeFilter(attrs, Eq("source", "a")))
    with pytest.raises(ValueError, match="filter_strategy must be one of"):
        search_embeddings(q, d, 5, filter=mask, filter_strategy="exact")
    with pytest.raises(ValueError, match="post_multiplier"):
        search_embeddings(q, d, 5, filter=mask, filter_strategy="post", post_multiplier=0.5)
    with pytest.raises(ValueError, match="different lengths"):
        Attributes.from_columns(categorical={"a": [1, 2]}, numeric={"b": [1.0]})
    with pytest.raises(ValueError, match="NaN"):
        Attributes.from_columns(numeric={"b": [1.0, np.nan]})
    with pytest.raises(ValueError, match="has 300 entries"):
        CodeIndex.build(d, "binary").search(q, 5, filter=mask[0, :300])


def test_attributes_save_load(tmp_path):
    attrs = Attributes.from_columns(categorical={"s": ["x", "y", "x"]}, numeric={"t": [0.5, 1.5, 2.5]})
    attrs.save(tmp_path / "a.npz")
    back = Attributes.load(tmp_path / "a.npz")
    assert back.categories == {"s": ("x", "y")} and back.kinds == attrs.kinds
    np.testing.assert_array_equal(back.decoded("s"), ["x", "y", "x"])
    np.testing.assert_array_equal(AttributeFilter(back, Eq("s", "y")).masks(), [[False, True, False]])

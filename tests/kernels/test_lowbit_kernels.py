"""int8 / int4 / fp8 top-k: Pallas (interpret) == jnp twin == NumPy reference."""
import ml_dtypes
import numpy as np
import pytest


from embedjax.kernels import fp8_topk, int4_topk, int8_topk
from embedjax.quant.scalar import np_int4_reference


def numpy_topk(scores, k):
    """(score desc, index asc) order of a score matrix."""
    idx = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    order = np.lexsort((idx, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), order


def int_codes(seed, q, n, d, low, high):
    rng = np.random.default_rng(seed)
    x = rng.integers(low, high + 1, size=(n, d)).astype(np.int8)
    x[n // 3] = x[n // 4]  # duplicates -> equal scores, smaller index first
    x[5] = 0  # all-zero vector
    qs = rng.integers(-127, 128, size=(q, d)).astype(np.int8)
    qs[0] = 0  # all-zero query: every score ties at the offset
    return qs, x


CASES = [(64, 1, 300), (96, 10, 257), (384, 100, 300), (1024, 10, 131)]


@pytest.mark.parametrize("dim, k, n", CASES)
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_int8_integer_scores_exact(dim, k, n, impl):
    q, x = int_codes(dim + k, 6, n, dim, -128, 127)
    # Unit scales: scores are the int32 dot products, exact in float32 (|dot| < 2^24).
    ref_s, ref_i = numpy_topk(q.astype(np.int64) @ x.astype(np.int64).T, k)
    s, i = int8_topk(q, None, x, None, k, impl=impl, chunk_size=100)
    np.testing.assert_array_equal(np.asarray(s), ref_s)
    np.testing.assert_array_equal(np.asarray(i), ref_i)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_int8_scale_epilogue_matches_float32_numpy(impl):
    q, x = int_codes(1, 5, 200, 96, -128, 127)
    rng = np.random.default_rng(2)
    qs, xs = rng.uniform(0.5, 2, 5).astype(np.float32), rng.uniform(0.5, 2, 200).astype(np.float32)
    qo = rng.standard_normal(5).astype(np.float32)
    dot = (q.astype(np.int64) @ x.astype(np.int64).T).astype(np.float32)
    scores = dot * qs[:, None] * xs[None, :] + qo[:, None]
    ref_s, ref_i = numpy_topk(scores, 10)
    s, i = int8_topk(q, qs, x, xs, 10, impl=impl, q_offset=qo)
    # The integer dot is exact; XLA may contract the epilogue's multiply-add into
    # an FMA, which moves the float32 result by at most an ulp or two (rtol 1e-6).
    np.testing.assert_allclose(np.asarray(s), ref_s, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(i), ref_i)


@pytest.mark.parametrize("dim, k, n", [(64, 1, 300), (95, 10, 257), (384, 100, 300)])
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_int4_exact(dim, k, n, impl):
    q, codes = int_codes(dim * 7 + k, 6, n, dim, -8, 7)
    packed = np_int4_reference(codes)  # independent packing: even dim low nibble
    ref_s, ref_i = numpy_topk(q.astype(np.int64) @ codes.astype(np.int64).T, k)
    s, i = int4_topk(q, None, packed, None, k, impl=impl, chunk_size=128)
    np.testing.assert_array_equal(np.asarray(s), ref_s)
    np.testing.assert_array_equal(np.asarray(i), ref_i)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("dim, k, n", [(64, 10, 300), (384, 100, 200)])
def test_fp8_within_tolerance(fmt, dim, k, n):
    dtype = ml_dtypes.float8_e4m3fn if fmt == "e4m3" else ml_dtypes.float8_e5m2
    rng = np.random.default_rng(dim + k)
    x = (rng.standard_normal((n, dim)) * 8).astype(dtype)
    q = (rng.standard_normal((4, dim)) * 8).astype(dtype)
    xs = rng.uniform(0.5, 2, n).astype(np.float32)
    exact = (q.astype(np.float64) @ x.astype(np.float64).T) * xs[None, :]
    ref_s, _ = numpy_topk(exact, k)
    results = {impl: fp8_topk(q, None, x, xs, k, impl=impl) for impl in ("xla", "pallas")}
    for s, i in results.values():
        s, i = np.asarray(s), np.asarray(i)
        # fp8 products are exact in float32; only the summation order of D
        # products of magnitude <= 448^2 differs: relative 1e-6 of sum |products|.
        tol = 1e-6 * (np.abs(q.astype(np.float64)) @ np.abs(x.astype(np.float64)).T).max() * 2
        np.testing.assert_allclose(s, ref_s, atol=tol)
        np.testing.assert_allclose(s, np.take_along_axis(exact, i, 1), atol=tol)
    np.testing.assert_allclose(np.asarray(results["xla"][0]), np.asarray(results["pallas"][0]), atol=tol)


def test_fp8_float32_query():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((150, 96)).astype(ml_dtypes.float8_e4m3fn)
    q = rng.standard_normal((3, 96)).astype(np.float32)
    exact = q.astype(np.float64) @ x.astype(np.float64).T
    ref_s, ref_i = numpy_topk(exact, 5)
    for impl in ("xla", "pallas"):
        s, i = fp8_topk(q, None, x, None, 5, impl=impl)
        np.testing.assert_allclose(np.asarray(s), ref_s, atol=1e-4)  # float32 sums of 96 terms ~ 1e-5


def test_bad_inputs():
    q, x = int_codes(0, 2, 10, 64, -128, 127)
    with pytest.raises(ValueError, match="same dimension"):
        int8_topk(q, None, x[:, :32], None, 1)
    with pytest.raises(TypeError, match="dtype"):
        int8_topk(q.astype(np.int32), None, x, None, 1)
    with pytest.raises(ValueError, match="larger than the corpus"):
        int8_topk(q, None, x, None, 11)
    with pytest.raises(ValueError, match="empty"):
        int8_topk(q, None, x[:0], None, 1)
    with pytest.raises(ValueError, match="x_scale"):
        int8_topk(q, None, x, np.ones(3, np.float32), 1)
    with pytest.raises(ValueError, match="needs 32 corpus columns"):
        int4_topk(q, None, np_int4_reference(x[:, :48]), None, 1)
    with pytest.raises(TypeError, match="dtype"):
        fp8_topk(q, None, x, None, 1)


@pytest.mark.parametrize("select", ["running", "two_pass"])
def test_int8_pallas_past_its_32_bit_offsets_searches_in_exact_pieces(select, monkeypatch):
    """A corpus whose operand exceeds the kernels' 32-bit offsets (on an H200: 10M x 384 int8 codes
    came back wrong) is scanned in consecutive pieces and merged. The limit is lowered so that 300
    rows of 64 dims take 3 pieces; results equal NumPy's, ties (duplicate rows, a zero query),
    ``n_valid`` short of the corpus, a per-query mask and row ids included."""
    from embedjax.kernels import pallas_topk

    q, x = int_codes(7, 4, 300, 64, -128, 127)
    monkeypatch.setattr(pallas_topk, "MAX_SCAN_ELEMENTS", 64 * 128 * 1 + 64 * 128 - 1)  # under 2 tiles of 128 rows
    assert pallas_topk.addressable_pieces(300, 64, target_splits=1) == 3
    rng = np.random.default_rng(3)
    mask = rng.random((4, 300)) < 0.8
    row_ids = rng.permutation(1000)[:300].astype(np.int32)
    dot = (q.astype(np.int64) @ x.astype(np.int64).T).astype(np.float64)
    searched = np.where(mask & (np.arange(300) < 290), dot, -np.inf)
    order = np.lexsort((np.broadcast_to(row_ids, searched.shape), -searched), axis=1)[:, :12]
    s, i = int8_topk(q, None, x, None, 12, impl="pallas", n_valid=290, filter=mask, row_ids=row_ids, select=select)
    np.testing.assert_array_equal(np.asarray(s), np.take_along_axis(searched, order, 1))
    np.testing.assert_array_equal(np.asarray(i), row_ids[order])
    s, i = int8_topk(q, None, x, None, 12, impl="pallas", select=select)  # positions as ids
    ref_s, ref_i = numpy_topk(dot, 12)
    np.testing.assert_array_equal(np.asarray(s), ref_s)
    np.testing.assert_array_equal(np.asarray(i), ref_i)

"""Filters inside the top-k kernels: Pallas (interpret) and jnp twins == NumPy brute force over the mask.

Sizes are not multiples of the Pallas tile (128) nor of the XLA chunk; corpora hold
duplicate rows (exact ties) and the masks pass fewer than k rows for some queries
(none at all for one), so the -1 / worst-score padding is checked too.
"""
import numpy as np
import pytest

import jax.numpy as jnp

from embedjax.index.exact import exact_search
from embedjax.kernels import fp8_topk, hamming_topk, int4_topk, int8_topk, residual_topk
from embedjax.kernels.row_filter import MISSING_DISTANCE, RowPredicates
from embedjax.quant import pack_bits
from embedjax.quant.scalar import np_int4_reference


def numpy_filtered_topk(scores_qn, mask_qn, k):
    """(score desc, index asc) over passing rows; missing -> (-inf, -1)."""
    s = np.where(mask_qn, scores_qn.astype(np.float64), -np.inf)
    order = np.lexsort((np.broadcast_to(np.arange(s.shape[1]), s.shape), -s), axis=1)[:, :k]
    top = np.take_along_axis(s, order, 1)
    return top, np.where(np.isfinite(top), order, -1)


def masks_with_few_passing(rng, q, n, k, rate=0.3):
    """Per-query masks: row 0 passes nothing, row 1 passes k - 3 rows (incl. a tied pair), the rest ~rate."""
    m = rng.random((q, n)) < rate
    m[0] = False
    m[1] = False
    m[1, rng.choice(n, max(1, k - 3), replace=False)] = True
    return m


def predicates_for(rng, q, n):
    """Two attribute columns (a categorical code and a numeric value) and per-query closed ranges."""
    attrs = np.stack([rng.integers(0, 4, n), rng.random(n)]).astype(np.float32)
    lo = np.stack([rng.integers(0, 4, q), rng.uniform(0, 0.5, q)], 1).astype(np.float32)
    hi = np.stack([lo[:, 0], lo[:, 1] + 0.4], 1).astype(np.float32)
    lo[0] = [9, 0]  # a category no row has: nothing passes
    hi[0] = [9, 1]
    mask = np.all((lo[:, :, None] <= attrs[None]) & (attrs[None] <= hi[:, :, None]), axis=1)
    return RowPredicates(attrs, lo, hi), mask


def binary_data(seed, q, n, d):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x[n // 3] = x[n // 5]  # exact ties: the smaller index must win
    x[n // 2] = x[n // 5]
    qs = rng.standard_normal((q, d)).astype(np.float32)
    qs[2] = x[n // 5]
    ham = ((qs > 0)[:, None, :] != (x > 0)[None, :, :]).sum(-1)
    return rng, qs, x, ham


def check(result, ref_scores, ref_ids, *, distances=False):
    s, i = (np.asarray(a) for a in result)
    np.testing.assert_array_equal(i, ref_ids)
    if distances:
        expected = np.where(ref_ids >= 0, -ref_scores, MISSING_DISTANCE)
        np.testing.assert_array_equal(s, expected)
        assert s.dtype == np.int32
    else:
        np.testing.assert_array_equal(s, ref_scores.astype(np.float32))


@pytest.mark.parametrize("form", ["shared", "per_query", "predicates"])
@pytest.mark.parametrize("impl, select", [("xla", "running"), ("xla", "two_pass"), ("pallas", "running")])
def test_hamming_filtered(form, impl, select):
    k, n = 10, 300
    rng, q, x, ham = binary_data(1, 6, n, 96)
    if form == "shared":
        mask = rng.random(n) < 0.02  # ~6 rows: fewer than k for every query
        mask[[n // 5, n // 3]] = True
        flt, mask_qn = mask, np.broadcast_to(mask, (6, n))
    elif form == "per_query":
        mask_qn = masks_with_few_passing(rng, 6, n, k)
        mask_qn[2, [n // 5, n // 3, n // 2]] = True
        flt = mask_qn
    else:
        flt, mask_qn = predicates_for(rng, 6, n)
    ref_s, ref_i = numpy_filtered_topk(-ham, mask_qn, k)
    check(hamming_topk(pack_bits(q), pack_bits(x), k, impl=impl, chunk_size=70, filter=flt, select=select), ref_s,
          ref_i, distances=True)


@pytest.mark.parametrize("form", ["shared", "per_query", "predicates"])
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_int8_filtered(form, impl):
    k, n, d = 10, 257, 64
    rng = np.random.default_rng(2)
    x = rng.integers(-128, 128, size=(n, d)).astype(np.int8)
    x[100] = x[7]  # tie
    q = rng.integers(-127, 128, size=(5, d)).astype(np.int8)
    dots = q.astype(np.int64) @ x.astype(np.int64).T  # exact in float32 (|dot| < 2^24)
    if form == "shared":
        flt = mask_qn = np.broadcast_to(rng.random(n) < 0.5, (5, n))
        flt = mask_qn[0]
    elif form == "per_query":
        flt = mask_qn = masks_with_few_passing(rng, 5, n, k)
    else:
        flt, mask_qn = predicates_for(rng, 5, n)
    ref_s, ref_i = numpy_filtered_topk(dots, mask_qn, k)
    check(int8_topk(q, None, x, None, k, impl=impl, chunk_size=100, filter=flt), ref_s, ref_i)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_int4_and_fp8_filtered(impl):
    k, n, d = 7, 131, 64
    rng = np.random.default_rng(3)
    codes = rng.integers(-8, 8, size=(n, d)).astype(np.int8)
    codes[50] = codes[9]
    q = rng.integers(-127, 128, size=(4, d)).astype(np.int8)
    mask = masks_with_few_passing(rng, 4, n, k)
    ref_s, ref_i = numpy_filtered_topk(q.astype(np.int64) @ codes.astype(np.int64).T, mask, k)
    check(int4_topk(q, None, np_int4_reference(codes), None, k, impl=impl, filter=mask), ref_s, ref_i)
    # Small integers are exact in float8 e4m3 and their dot products exact in float32.
    import ml_dtypes

    xf = codes.astype(ml_dtypes.float8_e4m3fn)
    qf = rng.integers(-8, 8, size=(4, d)).astype(np.float32)
    ref_s, ref_i = numpy_filtered_topk(qf.astype(np.float64) @ codes.astype(np.float64).T, mask, k)
    check(fp8_topk(qf, None, xf, None, k, impl=impl, filter=mask), ref_s, ref_i)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_residual_asymmetric_filtered(impl):
    k, n, d = 5, 140, 40
    rng = np.random.default_rng(4)
    signs = rng.standard_normal((n, 2, d)).astype(np.float32)
    signs[70] = signs[3]
    codes = np.stack([pack_bits(signs[:, p]) for p in range(2)], axis=1)
    q_proj = rng.integers(-4, 5, size=(3, 2, d)).astype(np.float32)  # integer projections: exact sums
    pm1 = np.where(signs > 0, 1.0, -1.0)
    scores = np.einsum("qpd,npd->qn", q_proj.astype(np.float64), pm1)
    flt, mask = predicates_for(rng, 3, n)
    ref_s, ref_i = numpy_filtered_topk(scores, mask, k)
    check(residual_topk(q_proj, codes, k, impl=impl, dim=d, filter=flt), ref_s, ref_i)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_row_ids_replace_index_and_break_ties(impl):
    """Rows scanned in a shuffled order with their original ids == the unshuffled search."""
    k, n = 10, 200
    rng, q, x, ham = binary_data(5, 4, n, 64)
    perm = rng.permutation(n)
    ids = perm.astype(np.int32)
    ids[:3] = -1  # negative ids never match
    keep = np.ones(n, bool)
    keep[perm[:3]] = False
    ref_s, ref_i = numpy_filtered_topk(-ham, np.broadcast_to(keep, ham.shape), k)
    check(hamming_topk(pack_bits(q), pack_bits(x[perm]), k, impl=impl, chunk_size=64, row_ids=ids), ref_s, ref_i,
          distances=True)


def test_exact_search_filtered_matches_float64():
    rng = np.random.default_rng(6)
    d = rng.standard_normal((1001, 32)).astype(np.float32)
    d[900] = d[4]
    q = rng.standard_normal((7, 32)).astype(np.float32)
    q[3] = d[4]
    mask = masks_with_few_passing(rng, 7, 1001, 10, rate=0.05)
    mask[3, [4, 900]] = True
    s, i = exact_search(q, d, 10, chunk_size=300, filter=mask)
    ref_s, ref_i = numpy_filtered_topk(q.astype(np.float64) @ d.astype(np.float64).T, mask, 10)
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_allclose(s, ref_s, atol=1e-5)  # float32 dot products of 32-d gaussians
    flt, mask = predicates_for(rng, 7, 1001)
    s, i = exact_search(q, d, 10, chunk_size=300, filter=flt)
    np.testing.assert_array_equal(i, numpy_filtered_topk(q @ d.T, mask, 10)[1])


def test_bad_filters_raise_clear_errors():
    codes = pack_bits(np.ones((5, 64), np.float32))
    with pytest.raises(ValueError, match="has 4 entries per query but the corpus has 5 rows"):
        hamming_topk(codes, codes, 1, filter=np.ones(4, bool))
    with pytest.raises(ValueError, match="3 rows of masks for 5 queries"):
        hamming_topk(codes, codes, 1, filter=np.ones((3, 5), bool))
    with pytest.raises(TypeError, match="boolean mask"):
        hamming_topk(codes, codes, 1, filter=np.ones(5, np.int32))
    with pytest.raises(ValueError, match="attrs_an must be"):
        hamming_topk(codes, codes, 1, filter=RowPredicates(np.zeros((2, 4), np.float32), np.zeros((1, 2), np.float32),
                                                          np.zeros((1, 2), np.float32)))
    with pytest.raises(ValueError, match="lo_qa must be"):
        int8_topk(np.zeros((5, 8), np.int8), None, np.zeros((5, 8), np.int8), None, 1,
                  filter=RowPredicates(np.zeros((2, 5), np.float32), np.zeros((3, 2), np.float32),
                                       np.zeros((3, 2), np.float32)))
    with pytest.raises(ValueError, match="row_ids must be int32"):
        hamming_topk(codes, codes, 1, row_ids=jnp.arange(4))

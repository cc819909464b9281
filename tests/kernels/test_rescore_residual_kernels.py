"""rescore_topk and residual (multi-plane) scoring: Pallas (interpret) vs jnp twin vs NumPy."""
import numpy as np
import pytest

from embedjax.kernels import rescore_topk, residual_bits_score, residual_topk
from embedjax.quant import pack_bits
from embedjax.quant.residual import fit_residual_weights, residual_binarize


def numpy_topk(scores, ids, k):
    order = np.lexsort((ids, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((230, 96)).astype(np.float32)
    x[50] = x[10]  # a duplicate candidate: equal score, smaller id first
    q = rng.standard_normal((4, 96)).astype(np.float32)
    cand = np.stack([rng.permutation(230)[:37] for _ in range(4)]).astype(np.int32)
    cand[:, 0], cand[:, 1] = 50, 10
    return q, x, cand


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("corpus", ["float", "int8", "binary"])
def test_rescore_matches_numpy(data, impl, corpus):
    q, x, cand = data
    if corpus == "float":
        codes, dense = x, x.astype(np.float64)
        kwargs = {}
    elif corpus == "int8":
        codes = np.clip(np.round(x * 40), -128, 127).astype(np.int8)
        xs = np.full(230, 1 / 40, np.float32)
        dense = codes.astype(np.float64) * xs[:, None]
        kwargs = dict(x_scale=xs, q_offset=np.arange(4, dtype=np.float32))
    else:
        codes = np.asarray(pack_bits(x))
        dense = np.where(x > 0, 1.0, -1.0)
        kwargs = {}
    full = q.astype(np.float64) @ dense.T + (np.arange(4)[:, None] if corpus == "int8" else 0)
    ref_s, ref_i = numpy_topk(np.take_along_axis(full, cand, 1), cand, 10)
    s, i = rescore_topk(q, cand, codes, 10, impl=impl, **kwargs)
    np.testing.assert_allclose(np.asarray(s), ref_s, atol=1e-4)  # float32 sums of 96 terms of size <= ~4
    np.testing.assert_array_equal(np.asarray(i), ref_i)


def test_rescore_bad_inputs(data):
    q, x, cand = data
    with pytest.raises(ValueError, match="candidate list"):
        rescore_topk(q, cand, x, 38)
    with pytest.raises(ValueError, match="dims"):
        rescore_topk(q[:, :64], cand, x, 5)
    with pytest.raises(TypeError, match="int8 or uint32"):
        rescore_topk(q, cand, x.astype(np.int16), 5)


def residual_setup(seed, n, dim, planes):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x[n // 2] = x[3]
    x[9] = 0.0
    q = rng.standard_normal((5, dim)).astype(np.float32)
    codes = np.asarray(residual_binarize(x, fit_residual_weights(x, planes)))
    return q, x, codes


def numpy_signs(codes, dim):
    n, p, w = codes.shape
    bits = (codes[..., None] >> np.arange(32, dtype=np.uint32)) & 1
    return np.where(bits.reshape(n, p, w * 32)[..., :dim] == 1, 1.0, -1.0)


@pytest.mark.parametrize("dim, planes, k, n", [(64, 2, 10, 300), (96, 4, 1, 200), (384, 2, 100, 150)])
def test_residual_asymmetric(dim, planes, k, n):
    q, x, codes = residual_setup(dim, n, dim, planes)
    rng = np.random.default_rng(1)
    q_proj = rng.standard_normal((5, planes, dim)).astype(np.float32)
    full = np.einsum("qpd,npd->qn", q_proj.astype(np.float64), numpy_signs(codes, dim))
    ids = np.broadcast_to(np.arange(n), full.shape)
    ref_s, ref_i = numpy_topk(full, ids, k)
    np.testing.assert_allclose(np.asarray(residual_bits_score(q_proj, codes, dim=dim)), full, atol=1e-3)
    for impl in ("xla", "pallas"):
        s, i = residual_topk(q_proj, codes, k, impl=impl, dim=dim, chunk_size=64)
        # float32 sums of P*D terms of size ~1: |error| < 1e-3; ids equal (no near-ties at that scale).
        np.testing.assert_allclose(np.asarray(s), ref_s, atol=1e-3)
        np.testing.assert_array_equal(np.asarray(i), ref_i)


@pytest.mark.parametrize("dim, k, n", [(64, 10, 300), (1024, 100, 140)])
def test_residual_symmetric_exact(dim, k, n):
    q, x, codes = residual_setup(dim + 1, n, dim, 2)
    q_codes = np.array(residual_binarize(q, fit_residual_weights(x, 2)))
    q_codes[1] = codes[3]  # a query equal to a duplicated corpus code
    weights = np.array([1.0, 0.5], np.float32)  # powers of two: float32 scores are exact
    sq, sx = numpy_signs(q_codes, dim), numpy_signs(codes, dim)
    full = sum(weights[p] * weights[r] * (sq[:, p] @ sx[:, r].T) for p in range(2) for r in range(2))
    ids = np.broadcast_to(np.arange(n), full.shape)
    ref_s, ref_i = numpy_topk(full, ids, k)
    for impl in ("xla", "pallas"):
        s, i = residual_topk(q_codes, codes, k, impl=impl, dim=dim, weights=weights)
        np.testing.assert_array_equal(np.asarray(s), ref_s)
        np.testing.assert_array_equal(np.asarray(i), ref_i)


def test_residual_bad_inputs():
    q, x, codes = residual_setup(0, 20, 64, 2)
    with pytest.raises(ValueError, match="one weight per plane"):
        residual_topk(codes[:3], codes, 1, dim=64, weights=[1.0])
    with pytest.raises(ValueError, match="needs 3 words"):
        residual_topk(codes[:3], codes, 1, dim=96, weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="larger than the corpus"):
        residual_topk(np.zeros((2, 2, 64), np.float32), codes, 21, dim=64)
    with pytest.raises(ValueError, match="empty"):
        residual_topk(np.zeros((2, 2, 64), np.float32), codes[:0], 1, dim=64)

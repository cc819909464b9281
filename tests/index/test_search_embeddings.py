"""search_embeddings: every quantization setting on real-valued random inputs."""
import numpy as np
import pytest

from embedjax.index import search_embeddings

SETTINGS = [None, "float32", "float16", "bfloat16", "fp8", "fp8_e5m2", "int8", "int4", "binary", "binary_asym",
            "binary+rescore", "binary+int8rescore", "residual2", "residual4", "residual2+sym", "pca48", "lsh128",
            "lsh96+asym"]


@pytest.fixture(scope="module")
def clustered():
    # 300 unit vectors in 64-d; each query is a lightly perturbed copy of doc i,
    # so a correct search of any reasonable fidelity returns doc i first.
    rng = np.random.default_rng(0)
    d = rng.standard_normal((301, 64)).astype(np.float32)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    src = np.arange(0, 300, 25)
    q = d[src] + 0.05 * rng.standard_normal((len(src), 64)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q, d, src


def _reference(q, d, k):
    s = q.astype(np.float64) @ d.astype(np.float64).T
    order = np.lexsort((np.broadcast_to(np.arange(d.shape[0]), s.shape), -s), axis=1)[:, :k]
    return np.take_along_axis(s, order, 1), order


@pytest.mark.parametrize("setting", SETTINGS)
def test_every_setting_finds_the_source_document(clustered, setting):
    q, d, src = clustered
    scores, ids = search_embeddings(q, d, 5, quantization=setting)
    assert scores.shape == ids.shape == (len(src), 5)
    assert scores.dtype == np.float32 and ids.dtype == np.int32
    np.testing.assert_array_equal(ids[:, 0], src)
    assert np.all(np.diff(scores, axis=1) <= 0), "rows must be sorted best first"


def test_float32_matches_float64_reference(clustered):
    q, d, _ = clustered
    scores, ids = search_embeddings(q, d, 10)
    ref_s, ref_i = _reference(q, d, 10)
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(scores, ref_s, atol=1e-5)  # float32 dot of unit vectors


def test_binary_scores_are_pm1_inner_products(clustered):
    q, d, _ = clustered
    scores, ids = search_embeddings(q, d, 7, quantization="binary")
    sq, sd = np.where(q > 0, 1, -1), np.where(d > 0, 1, -1)
    full = sq @ sd.T
    np.testing.assert_array_equal(scores, np.take_along_axis(full, ids, 1))
    # No document outside the result may beat the k-th score (ties -> smaller id).
    kth = scores[:, -1:]
    assert np.all((full > kth).sum(1) < 7)


def test_rescore_returns_exact_float_scores_of_candidates(clustered):
    q, d, _ = clustered
    scores, ids = search_embeddings(q, d, 5, quantization="binary+rescore", rescore_multiplier=3)
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", q, d[ids]), atol=1e-5)


def test_int8_scores_close_to_float(clustered):
    q, d, _ = clustered
    scores, ids = search_embeddings(q, d, 5, quantization="int8")
    exact = np.einsum("qd,qkd->qk", q, d[ids])
    # per-dim step <= 2/255 for unit vectors; query int8 rounding adds a similar
    # relative error; the sum over 64 dims of rounding errors stays below 0.02.
    np.testing.assert_allclose(scores, exact, atol=0.02)


def test_matryoshka_dims_truncate_and_renormalise(clustered):
    q, d, _ = clustered
    scores, ids = search_embeddings(q, d, 4, dims=32)
    qt = q[:, :32] / np.linalg.norm(q[:, :32], axis=1, keepdims=True)
    dt = d[:, :32] / np.linalg.norm(d[:, :32], axis=1, keepdims=True)
    ref_s, ref_i = _reference(qt, dt, 4)
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(scores, ref_s, atol=1e-5)


def test_calibration_embeddings_are_used(clustered):
    q, d, _ = clustered
    # Ranges calibrated on a tiny, narrow sample clip most of the corpus: results change.
    narrow = 0.01 * d[:3]
    _, ids_own = search_embeddings(q, d, 10, quantization="int8")
    _, ids_narrow = search_embeddings(q, d, 10, quantization="int8", calibration_nd=narrow)
    assert not np.array_equal(ids_own, ids_narrow)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(quantization="int3"), ValueError, "unknown quantization"),
        (dict(dims=65), ValueError, "dims"),
        (dict(k=400), ValueError, "k=400"),
        (dict(rescore_multiplier=0), ValueError, "rescore_multiplier"),
    ],
)
def test_bad_arguments(clustered, kwargs, error, match):
    q, d, _ = clustered
    k = kwargs.pop("k", 5)
    with pytest.raises(error, match=match):
        search_embeddings(q, d, k, **kwargs)


def test_bad_arrays(clustered):
    q, d, _ = clustered
    with pytest.raises(ValueError, match="dims"):
        search_embeddings(q[:, :32], d, 3)
    with pytest.raises(ValueError, match="empty"):
        search_embeddings(q, d[:0], 3)
    with pytest.raises(TypeError, match="float"):
        search_embeddings(q, (d > 0).astype(np.int32), 3)


def test_lsh_codes_are_signs_of_orthonormal_projections(clustered):
    from embedjax.index.compressed import random_projection

    proj = random_projection(64, 160)
    assert proj.shape == (160, 64)
    # each block of 64 rows is an orthonormal basis; the last block has 32 rows
    np.testing.assert_allclose(proj[:64] @ proj[:64].T, np.eye(64), atol=1e-5)
    np.testing.assert_allclose(proj[128:] @ proj[128:].T, np.eye(32), atol=1e-5)
    q, d, _ = clustered
    scores, ids = search_embeddings(q, d, 3, quantization="lsh160")
    sq, sd = np.where(q @ proj.T > 0, 1, -1), np.where(d @ proj.T > 0, 1, -1)
    np.testing.assert_array_equal(scores, np.take_along_axis(sq @ sd.T, ids, 1))

"""int8 / uint8 / int4 scalar quantisation, fp8 and PCA against NumPy references."""
import ml_dtypes
import numpy as np
import pytest

from embedjax.quant import (
    affine_query_transform, apply_pca, calibrate_ranges, dequantize_fp8, dequantize_int4, dequantize_int8,
    dequantize_uint8, fit_pca, pack_int4, quantize_fp8, quantize_int4, quantize_int8, quantize_symmetric_int8,
    quantize_uint8, unpack_int4,
)
from embedjax.quant.scalar import np_int4_reference


@pytest.fixture(scope="module")
def emb():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 40)).astype(np.float32) * rng.uniform(0.1, 2, 40).astype(np.float32)
    x[:, 7] = 0.25  # a constant dimension (zero range)
    return x


def test_int8_matches_numpy_and_clips(emb):
    lo, hi = calibrate_ranges(emb[:300])
    np.testing.assert_allclose(np.asarray(lo), emb[:300].min(0))
    step = np.where(hi - lo > 0, (np.asarray(hi) - np.asarray(lo)) / 255, 1.0)
    ref = np.clip(np.round((emb - np.asarray(lo)) / step), 0, 255) - 128
    codes = np.asarray(quantize_int8(emb, lo, hi))
    np.testing.assert_array_equal(codes, ref.astype(np.int8))
    # rows 300.. fall partly outside the calibrated range: clipped to the ends, never wrapped
    assert codes.min() == -128 and codes.max() == 127
    inside = (emb >= np.asarray(lo)) & (emb <= np.asarray(hi))
    err = np.abs(np.asarray(dequantize_int8(codes, lo, hi)) - emb)
    assert np.all(err[inside] <= step[None, :].repeat(400, 0)[inside] / 2 + 1e-6)
    np.testing.assert_array_equal(np.asarray(quantize_uint8(emb, lo, hi)), (ref + 128).astype(np.uint8))
    np.testing.assert_allclose(np.asarray(dequantize_uint8(quantize_uint8(emb, lo, hi), lo, hi)),
                               np.asarray(dequantize_int8(codes, lo, hi)), atol=1e-6)
    assert np.all(np.asarray(dequantize_int8(codes, lo, hi))[:, 7] == 0.25)


def test_affine_query_transform_recovers_dequantised_inner_product(emb):
    lo, hi = calibrate_ranges(emb)
    codes = np.asarray(quantize_int8(emb, lo, hi)).astype(np.float64)
    q = np.random.default_rng(1).standard_normal((3, 40)).astype(np.float32)
    qs, off = affine_query_transform(q, lo, hi, 256)
    got = np.asarray(qs, np.float64) @ codes.T + np.asarray(off, np.float64)[:, None]
    want = q.astype(np.float64) @ np.asarray(dequantize_int8(codes.astype(np.int8), lo, hi), np.float64).T
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_symmetric_int8(emb):
    codes, scale = quantize_symmetric_int8(emb)
    np.testing.assert_allclose(np.asarray(scale), np.abs(emb).max(1) / 127, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(codes), np.round(emb / (np.abs(emb).max(1, keepdims=True) / 127)))


@pytest.mark.parametrize("dim", [40, 39])
def test_int4_packing_and_values(emb, dim):
    x = emb[:, :dim]
    lo, hi = calibrate_ranges(x)
    step = np.where(hi - lo > 0, (np.asarray(hi) - np.asarray(lo)) / 15, 1.0)
    levels = np.clip(np.round((x - np.asarray(lo)) / step), 0, 15).astype(np.int64) - 8
    packed = np.asarray(quantize_int4(x, lo, hi))
    np.testing.assert_array_equal(packed, np_int4_reference(levels))
    np.testing.assert_array_equal(np.asarray(unpack_int4(packed, dim)), levels)
    np.testing.assert_array_equal(np.asarray(pack_int4(levels)), packed)
    # even dimension in the low nibble, by hand for row 0
    assert packed[0, 0] == ((levels[0, 0] % 16) | ((levels[0, 1] % 16) << 4))
    np.testing.assert_allclose(np.asarray(dequantize_int4(packed, lo, hi)), np.asarray(lo) + (levels + 8) * step,
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fmt, dtype, rel", [("e4m3", ml_dtypes.float8_e4m3fn, 2**-4), ("e5m2", ml_dtypes.float8_e5m2, 2**-3)])
def test_fp8_per_vector_scale(emb, fmt, dtype, rel):
    codes, scale = quantize_fp8(emb, fmt)
    assert codes.dtype == dtype
    np.testing.assert_allclose(np.asarray(scale), np.abs(emb).max(1) / (float(ml_dtypes.finfo(dtype).max) / 2), rtol=1e-6)
    back = np.asarray(dequantize_fp8(codes, scale))
    # round-to-nearest: relative error <= 2^-(mantissa bits + 1) for normal values
    big = np.abs(emb) > np.abs(emb).max(1, keepdims=True) * 2**-5
    assert np.all(np.abs(back - emb)[big] <= rel * np.abs(emb)[big] + 1e-7)
    with pytest.raises(ValueError, match="unknown fp8 format"):
        quantize_fp8(emb, "e3m4")


def test_pca_matches_numpy(emb):
    mean, comps = fit_pca(emb, 5)
    xc = emb - emb.mean(0)
    evals, evecs = np.linalg.eigh(xc.T @ xc)
    top = evecs[:, ::-1][:, :5]
    # principal directions are defined up to sign
    np.testing.assert_allclose(np.abs(np.sum(np.asarray(comps) * top, 0)), 1.0, atol=1e-3)
    proj = np.asarray(apply_pca(emb, mean, comps))
    np.testing.assert_allclose(proj.var(0) * 400, evals[::-1][:5], rtol=1e-3)
    with pytest.raises(ValueError, match="dims"):
        fit_pca(emb, 41)


def test_calibration_errors(emb):
    with pytest.raises(ValueError, match="empty"):
        calibrate_ranges(emb[:0])
    with pytest.raises(TypeError, match="floating"):
        calibrate_ranges(emb.astype(np.int32))
    lo, hi = calibrate_ranges(emb)
    with pytest.raises(ValueError, match="dims"):
        quantize_int8(emb[:, :10], lo, hi)

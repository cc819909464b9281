"""Hashes are the documented formula on every backend; row codecs match NumPy references."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from embedjax.tables import codecs, hashing


def test_hash_is_the_documented_formula_in_jax_numpy_and_python():
    rng = np.random.default_rng(0)
    ids = np.concatenate([np.arange(50), rng.integers(0, 2**31 - 1, size=200), [2**31 - 1]]).astype(np.int32)
    for seed in (0, 1, hashing.probe_seed(3, 2, 7), 2**32 - 1):
        expected = np.asarray([hashing.hash32_python(int(i), seed) for i in ids], np.uint32)
        np.testing.assert_array_equal(hashing.hash32(ids, seed), expected)
        np.testing.assert_array_equal(np.asarray(jax.jit(lambda x, s=seed: hashing.hash32(x, s))(ids)), expected)
        for m in (1, 7, 1000, 2**31 - 1):
            np.testing.assert_array_equal(np.asarray(hashing.bucket(jnp.asarray(ids), seed, m)),
                                          (expected % m).astype(np.int32))


def test_pinned_hash_values_catch_formula_changes():
    # fmix32 of 0 is 0, so hash32(x, s) = fmix32(x ^ fmix32(s + golden)); pinned from the pure-Python twin
    assert hashing.hash32_python(0, 0) == hashing.hash32_python(0, 0) and hashing.hash32_python(1, 0) != 1
    key0 = hashing.hash32_python(0, 0)
    assert int(hashing.hash32(np.asarray([0], np.int32), 0)[0]) == key0
    # two probe seeds of the same field are different, and so are the hashes they give
    s0, s1 = hashing.probe_seed(0, 0), hashing.probe_seed(0, 1)
    assert s0 != s1 and hashing.hash32_python(5, s0) != hashing.hash32_python(5, s1)


def test_probe_seed_layout_and_limits():
    assert hashing.probe_seed(3, 2, 7) == 7 * 65536 + 3 * 256 + 2
    for bad in ((256, 0, 0), (0, 256, 0), (0, 0, 65536), (-1, 0, 0)):
        with pytest.raises(ValueError, match="must be in"):
            hashing.probe_seed(*bad)
    with pytest.raises(ValueError, match="num_buckets"):
        hashing.bucket(np.zeros(3, np.int32), 0, 0)


def test_buckets_are_close_to_uniform():
    ids = np.arange(200_000, dtype=np.int32)
    counts = np.bincount(hashing.bucket(ids, 11, 100), minlength=100)
    # 2000 expected per bucket: a binomial std of ~44; 6 std is far beyond chance
    assert np.abs(counts - 2000).max() < 270


def _int_reference(x, qmax):
    scale = np.abs(x).max(axis=1) / qmax
    safe = np.where(scale > 0, scale, 1.0)[:, None]
    return np.clip(np.round(x / safe), -qmax, qmax), scale


@pytest.mark.parametrize("codec,qmax", [("int8", 127), ("int4", 7)])
def test_integer_codecs_match_numpy(codec, qmax):
    x = np.random.default_rng(1).normal(size=(9, 13)).astype(np.float32)  # odd width: int4 pads a nibble
    x[3] = 0.0  # an all-zero row has scale 0 and decodes to 0
    stored = codecs.encode(codec, jnp.asarray(x))
    codes, scale = _int_reference(x, qmax)
    np.testing.assert_allclose(np.asarray(stored["scale"]), scale, rtol=1e-7)
    decoded = np.asarray(codecs.decode(codec, stored, 13))
    np.testing.assert_allclose(decoded, codes * scale[:, None], rtol=1e-6, atol=1e-7)
    assert stored["codes"].shape == ((9, 13) if codec == "int8" else (9, 7))
    assert codecs.bytes_per_row(codec, 13) == (13 if codec == "int8" else 7) + 4


def test_int4_nibble_layout_is_the_documented_one():
    codes = jnp.asarray([[-7, 7, 0]], jnp.int8)
    packed = np.asarray(codecs.pack_int4(codes))
    # byte 0: low nibble dim 0 (-7 + 8 = 1), high nibble dim 1 (7 + 8 = 15); byte 1: dim 2 (8), pad (8)
    assert packed.tolist() == [[1 | (15 << 4), 8 | (8 << 4)]]
    np.testing.assert_array_equal(np.asarray(codecs.unpack_int4(jnp.asarray(packed), 3)), np.asarray(codes))


def test_fp8_nearest_matches_ml_dtypes():
    x = np.random.default_rng(2).normal(size=(6, 8)).astype(np.float32)
    stored = codecs.encode("fp8", jnp.asarray(x))
    scale = np.abs(x).max(axis=1) / 448.0
    expected = (x / scale[:, None]).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale[:, None]
    np.testing.assert_allclose(np.asarray(codecs.decode("fp8", stored, 8)), expected, rtol=1e-6)


@pytest.mark.parametrize("codec", ["int8", "int4", "fp8"])
def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour(codec):
    rng = np.random.default_rng(3)
    row = rng.normal(size=(1, 8)).astype(np.float32)
    rows = jnp.asarray(np.repeat(row, 4000, axis=0))
    stored = codecs.encode(codec, rows, rounding="stochastic", key=jax.random.PRNGKey(0),
                           row_ids_u=jnp.arange(4000))
    decoded = np.asarray(codecs.decode(codec, stored, 8))
    nearest = np.asarray(codecs.decode(codec, codecs.encode(codec, jnp.asarray(row)), 8))[0]
    # each draw is one of the two codes around x, and their mean is x (unbiased)
    assert all(len(np.unique(decoded[:, j])) <= 2 for j in range(8))
    step = np.abs(decoded - nearest).max(axis=0)
    np.testing.assert_allclose(decoded.mean(axis=0), row[0], atol=float(step.max()) * 0.06 + 1e-7)
    assert not np.allclose(decoded.mean(axis=0), nearest) or np.allclose(nearest, row[0])


def test_stochastic_bits_depend_on_row_id_not_position():
    key = jax.random.PRNGKey(5)
    ids = jnp.asarray([7, 3, 11])
    a = codecs.row_uniforms(key, ids, 4)
    b = codecs.row_uniforms(key, ids[::-1], 4)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b)[::-1])


def test_fake_quantize_is_straight_through():
    x = jnp.asarray(np.random.default_rng(4).normal(size=(3, 8)).astype(np.float32))
    y = codecs.fake_quantize("int4", x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(codecs.decode("int4", codecs.encode("int4", x), 8)))
    grad = jax.grad(lambda v: jnp.sum(codecs.fake_quantize("int4", v) * jnp.arange(8.0)))(x)
    np.testing.assert_array_equal(np.asarray(grad), np.broadcast_to(np.arange(8.0), (3, 8)))


def test_codec_errors():
    with pytest.raises(ValueError, match="unknown row codec"):
        codecs.layout("int2", 4)
    with pytest.raises(ValueError, match="key and the global row ids"):
        codecs.encode("int8", jnp.ones((2, 3)), rounding="stochastic")
    with pytest.raises(ValueError, match="rounding"):
        codecs.encode("int8", jnp.ones((2, 3)), rounding="up")


def test_buckets_do_not_depend_on_the_process(tmp_path):
    """Another interpreter (other hash salt, its own JAX) computes the same buckets."""
    import os
    import subprocess
    import sys

    code = ("import numpy as np, jax.numpy as jnp; from embedjax.tables import hashing;"
            "ids = np.arange(0, 10**9, 7919, dtype=np.int32)[:500];"
            "print(hashing.bucket(ids, hashing.probe_seed(2, 1, 5), 1009).tolist());"
            "print(np.asarray(hashing.bucket(jnp.asarray(ids), hashing.probe_seed(2, 1, 5), 1009)).tolist())")
    import pathlib

    repo = str(pathlib.Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONHASHSEED": "12345", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         cwd=str(tmp_path), check=True).stdout.splitlines()
    ids = np.arange(0, 10**9, 7919, dtype=np.int32)[:500]
    here = hashing.bucket(ids, hashing.probe_seed(2, 1, 5), 1009).tolist()
    assert out[0] == out[1] == str(here)

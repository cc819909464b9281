"""Bit layout of pack_bits and its converters (numpy packbits, sentence-transformers, FAISS)."""
import faiss
import numpy as np
import pytest

from embedjax.kernels import hamming_topk
from embedjax.quant import (
    from_faiss_bytes, from_numpy_packbits, from_st_binary, hamming_distances, pack_bits, to_faiss_bytes,
    to_numpy_packbits, to_st_binary, unpack_bits,
)


@pytest.mark.parametrize("dim", [1, 31, 64, 96, 100, 384])
def test_pack_bits_layout_by_hand(dim):
    rng = np.random.default_rng(dim)
    x = rng.standard_normal((7, dim)).astype(np.float32)
    x[0] = 0.0  # zero is not > 0: all bits clear
    codes = np.asarray(pack_bits(x))
    assert codes.dtype == np.uint32 and codes.shape == (7, -(-dim // 32))
    for n in range(7):
        for i in range(dim):
            assert bool((int(codes[n, i // 32]) >> (i % 32)) & 1) == bool(x[n, i] > 0)
    # unused high bits of the last word are zero
    if dim % 32:
        assert np.all(codes[:, -1] >> np.uint32(dim % 32) == 0)
    np.testing.assert_array_equal(np.asarray(unpack_bits(codes, dim)), x > 0)


@pytest.mark.parametrize("dim", [8, 13, 96, 384])
def test_numpy_packbits_and_sentence_transformers_round_trip(dim):
    x = np.random.default_rng(1).standard_normal((9, dim)).astype(np.float32)
    codes = np.asarray(pack_bits(x))
    np.testing.assert_array_equal(to_numpy_packbits(codes, dim), np.packbits(x > 0, axis=-1))
    np.testing.assert_array_equal(from_numpy_packbits(np.packbits(x > 0, axis=-1), dim), codes)
    st_binary = (np.packbits(x > 0, axis=-1).astype(np.int16) - 128).astype(np.int8)
    np.testing.assert_array_equal(to_st_binary(codes, dim), st_binary)
    np.testing.assert_array_equal(from_st_binary(st_binary, dim), codes)


@pytest.mark.slow  # importing sentence-transformers (torch) costs ~10-60 s of the default suite
def test_sentence_transformers_quantize_embeddings_layout():
    from sentence_transformers.util.quantization import quantize_embeddings

    x = np.random.default_rng(2).standard_normal((6, 64)).astype(np.float32)
    ub = quantize_embeddings(x, precision="ubinary")
    b = quantize_embeddings(x, precision="binary")
    codes = np.asarray(pack_bits(x))
    np.testing.assert_array_equal(to_numpy_packbits(codes, 64), ub)
    np.testing.assert_array_equal(to_st_binary(codes, 64), b)


@pytest.mark.parametrize("dim", [64, 96, 1024])
def test_faiss_layout_round_trip_with_fvecs2bitvecs(dim):
    x = np.random.default_rng(dim).standard_normal((11, dim)).astype(np.float32)  # no exact zeros
    faiss_bytes = np.zeros((11, dim // 8), np.uint8)
    faiss.fvecs2bitvecs(faiss.swig_ptr(x), faiss.swig_ptr(faiss_bytes), dim, 11)
    codes = np.asarray(pack_bits(x))
    np.testing.assert_array_equal(to_faiss_bytes(codes, dim), faiss_bytes)
    np.testing.assert_array_equal(from_faiss_bytes(faiss_bytes, dim), codes)


@pytest.mark.parametrize("dim", [64, 1024])
def test_hamming_distances_agree_with_faiss_knn_hamming(dim):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((500, dim)).astype(np.float32)
    q = rng.standard_normal((6, dim)).astype(np.float32)
    xc, qc = pack_bits(x), pack_bits(q)
    fd, fi = faiss.knn_hamming(to_faiss_bytes(np.asarray(qc), dim), to_faiss_bytes(np.asarray(xc), dim), 20)
    dist, idx = hamming_topk(qc, xc, 20, impl="xla")
    np.testing.assert_array_equal(np.asarray(dist), fd)
    full = np.asarray(hamming_distances(qc, xc))
    # FAISS breaks ties its own way; the ids it returns have exactly the distances it reports.
    np.testing.assert_array_equal(np.take_along_axis(full, fi, 1), fd)
    np.testing.assert_array_equal(np.take_along_axis(full, np.asarray(idx), 1), fd)


def test_converter_errors():
    codes = np.asarray(pack_bits(np.ones((2, 64), np.float32)))
    with pytest.raises(ValueError, match="multiple of 8"):
        to_faiss_bytes(codes, 60)
    with pytest.raises(ValueError, match="needs 3 words"):
        unpack_bits(codes, 96)
    with pytest.raises(TypeError, match="uint8"):
        from_numpy_packbits(np.zeros((2, 8), np.int8), 64)
    with pytest.raises(TypeError, match="uint32"):
        to_numpy_packbits(codes.astype(np.int64), 64)
    with pytest.raises(ValueError, match="2-D"):
        pack_bits(np.ones(5, np.float32))

"""hamming_topk: Pallas kernel (interpret mode) == jnp twin == NumPy reference, exactly."""
import numpy as np
import pytest

import jax.numpy as jnp

from embedjax.kernels import hamming_topk
from embedjax.quant import pack_bits


def numpy_hamming_topk(q_float, x_float, k, n_valid=None):
    """Independent reference from the float signs (no packing): distances and (d, index) order."""
    n_valid = x_float.shape[0] if n_valid is None else n_valid
    qb, xb = q_float > 0, x_float[:n_valid] > 0
    dist = (qb[:, None, :] != xb[None, :, :]).sum(-1)
    idx = np.broadcast_to(np.arange(n_valid), dist.shape)
    order = np.lexsort((idx, dist), axis=1)[:, :k]
    return np.take_along_axis(dist, order, 1), order


def awkward_inputs(seed, n, d, q):
    """Random vectors plus duplicated rows, all-zero rows and an all-zero query (many ties)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x[n // 3] = x[n // 5]  # duplicates: equal distances, the smaller index must come first
    x[n // 2] = x[n // 5]
    x[7] = 0.0  # all-zero vectors pack to all-zero codes
    x[n - 2] = 0.0
    qs = rng.standard_normal((q, d)).astype(np.float32)
    qs[0] = 0.0
    qs[1] = x[n // 5]
    return qs, x


# Corpus sizes are not multiples of the Pallas tile (128) nor of the XLA chunk.
CASES = [(64, 1, 300), (96, 10, 257), (384, 100, 300), (1024, 10, 131)]


@pytest.mark.parametrize("select", ["running", "two_pass"])
@pytest.mark.parametrize("layout", ["rows", "words"])
@pytest.mark.parametrize("dim, k, n", CASES)
def test_xla_twin_equals_numpy(dim, k, n, layout, select):
    """Both XLA selections over both corpus layouts: chunks of 70 rows (64 for the two-pass
    scan's 32-row tiles) leave a clamped or short last chunk; k=100 over 300 rows rescores every
    tile."""
    from embedjax.kernels.hamming import word_major

    q, x = awkward_inputs(dim + k, n, dim, 9)
    ref_d, ref_i = numpy_hamming_topk(q, x, k)
    x_codes = pack_bits(x) if layout == "rows" else word_major(pack_bits(x))
    dist, idx = hamming_topk(pack_bits(q), x_codes, k, impl="xla", chunk_size=70, layout=layout, select=select)
    np.testing.assert_array_equal(np.asarray(dist), ref_d)
    np.testing.assert_array_equal(np.asarray(idx), ref_i)
    assert dist.dtype == jnp.int32 and idx.dtype == jnp.int32


@pytest.mark.parametrize("select", ["running", "two_pass"])
def test_single_queries_take_their_own_scorer_and_equal_numpy(select):
    """One query scans row-major codes with the per-row scorer ([1, C]), not the query-vectorised
    one; each of the awkward queries (all-zero, a duplicated corpus row) searched alone."""
    q, x = awkward_inputs(11, 301, 96, 3)
    ref_d, ref_i = numpy_hamming_topk(q, x, 12)
    for i in range(3):
        dist, idx = hamming_topk(pack_bits(q[i:i + 1]), pack_bits(x), 12, impl="xla", chunk_size=70, select=select)
        np.testing.assert_array_equal(np.asarray(dist), ref_d[i:i + 1])
        np.testing.assert_array_equal(np.asarray(idx), ref_i[i:i + 1])


def test_xla_two_pass_rejects_row_ids_and_auto_falls_back():
    q, x = awkward_inputs(8, 90, 64, 3)
    ids = np.arange(90, dtype=np.int32)[::-1].copy()
    with pytest.raises(ValueError, match="does not take row_ids"):
        hamming_topk(pack_bits(q), pack_bits(x), 5, impl="xla", row_ids=ids, select="two_pass")
    got = hamming_topk(pack_bits(q), pack_bits(x), 5, impl="xla", row_ids=ids)  # auto: the running scan
    want = hamming_topk(pack_bits(q), pack_bits(x), 5, impl="xla", row_ids=ids, select="running")
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


@pytest.mark.parametrize("dim, k, n", CASES)
def test_pallas_equals_twin_and_numpy(dim, k, n):
    q, x = awkward_inputs(dim * 3 + k, n, dim, 5)
    ref_d, ref_i = numpy_hamming_topk(q, x, k)
    dist, idx = hamming_topk(pack_bits(q), pack_bits(x), k, impl="pallas")
    twin = hamming_topk(pack_bits(q), pack_bits(x), k, impl="xla")
    np.testing.assert_array_equal(np.asarray(dist), ref_d)
    np.testing.assert_array_equal(np.asarray(idx), ref_i)
    np.testing.assert_array_equal(np.asarray(dist), np.asarray(twin[0]))
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(twin[1]))


@pytest.mark.parametrize("impl, select", [("xla", "running"), ("xla", "two_pass"), ("pallas", "running")])
def test_n_valid_ignores_padding_rows(impl, select):
    q, x = awkward_inputs(3, 200, 64, 4)
    x[150:] = q[2]  # padding rows that would win if they were searched
    ref_d, ref_i = numpy_hamming_topk(q, x, 10, n_valid=150)
    # chunks of 64 rows: the chunk holding row 150 is masked, the ones before it are not
    dist, idx = hamming_topk(pack_bits(q), pack_bits(x), 10, impl=impl, n_valid=150, chunk_size=64, select=select)
    np.testing.assert_array_equal(np.asarray(dist), ref_d)
    np.testing.assert_array_equal(np.asarray(idx), ref_i)


def test_k_equal_to_corpus_returns_everything_sorted():
    q, x = awkward_inputs(4, 40, 96, 3)
    ref_d, ref_i = numpy_hamming_topk(q, x, 40)
    dist, idx = hamming_topk(pack_bits(q), pack_bits(x), 40, impl="xla", chunk_size=16)
    np.testing.assert_array_equal(np.asarray(idx), ref_i)
    np.testing.assert_array_equal(np.asarray(dist), ref_d)


def test_bad_inputs_raise_clear_errors():
    codes = pack_bits(np.ones((5, 64), np.float32))
    wide = pack_bits(np.ones((5, 96), np.float32))
    with pytest.raises(ValueError, match="code widths differ"):
        hamming_topk(codes, wide, 1)
    with pytest.raises(ValueError, match="larger than the corpus"):
        hamming_topk(codes, codes, 6)
    with pytest.raises(TypeError, match="uint32"):
        hamming_topk(codes.astype(jnp.int32), codes, 1)
    with pytest.raises(ValueError, match="empty"):
        hamming_topk(codes, codes[:0], 1)
    with pytest.raises(ValueError, match="impl"):
        hamming_topk(codes, codes, 1, impl="cuda")
    with pytest.raises(ValueError, match="n_valid"):
        hamming_topk(codes, codes, 1, n_valid=9)


def test_numpy_codes_reach_the_search_without_a_second_host_copy():
    """`device_array` aliases a 64-byte-aligned NumPy buffer on CPU (no copy of the corpus per
    search), copies a misaligned one into an aligned NumPy buffer that it then aliases, passes jax
    arrays through; the search from NumPy codes equals the search from device arrays."""
    import jax

    from embedjax.kernels.dispatch import aligned_copy, device_array

    q, x = awkward_inputs(5, 300, 128, 3)
    codes = np.asarray(pack_bits(x))
    aligned = aligned_copy(codes)
    assert device_array(aligned).unsafe_buffer_pointer() == aligned.ctypes.data
    misaligned = aligned_copy(np.zeros(codes.size + 1, codes.dtype))[1:].reshape(codes.shape)  # 4 bytes past a boundary
    misaligned[...] = codes
    copied = device_array(misaligned)
    assert misaligned.ctypes.data % 64 and copied.unsafe_buffer_pointer() != misaligned.ctypes.data
    assert copied.unsafe_buffer_pointer() % 64 == 0
    np.testing.assert_array_equal(np.asarray(copied), codes)
    on_device = jax.device_put(codes)
    assert device_array(on_device) is on_device
    q_codes = np.asarray(pack_bits(q))
    want = hamming_topk(jnp.asarray(q_codes), on_device, 7, impl="xla")
    for corpus in (aligned, misaligned):
        got = hamming_topk(q_codes, corpus, 7, impl="xla")
        np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
        np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_word_major_corpus_gives_the_row_major_results(impl):
    """layout="words" (the corpus transposed once by `word_major`) returns exactly what the
    row-major scan returns, with a per-query filter, row ids (ties by id) and padding rows."""
    from embedjax.kernels.hamming import word_major

    q, x = awkward_inputs(21, 301, 96, 6)
    q_codes, x_codes = pack_bits(q), pack_bits(x)
    x_words = word_major(x_codes)
    assert x_words.shape == (3, 301)
    flt = np.random.default_rng(2).random((6, 301)) < 0.7
    ids = np.arange(301, dtype=np.int32)[::-1].copy()
    for kwargs in ({}, {"filter": flt, "row_ids": ids, "n_valid": 280}):
        want = hamming_topk(q_codes, x_codes, 12, impl="xla", chunk_size=64, **kwargs)
        got = hamming_topk(q_codes, x_words, 12, impl=impl, chunk_size=64, layout="words", **kwargs)
        np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
        np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    if impl == "pallas":
        got = hamming_topk(q_codes, x_words, 12, impl="pallas", layout="words", select="two_pass")
        want = hamming_topk(q_codes, x_codes, 12, impl="xla")
        np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


def test_bad_layouts_are_named():
    q, x = awkward_inputs(1, 40, 64, 2)
    q_codes, x_codes = pack_bits(q), pack_bits(x)
    with pytest.raises(ValueError, match="layout='columns' is not a corpus layout"):
        hamming_topk(q_codes, x_codes, 3, layout="columns")
    with pytest.raises(ValueError, match=r"q_codes has 2 words per vector, x_codes 40 \(word-major: axis 0\)"):
        hamming_topk(q_codes, x_codes, 3, layout="words")  # a row-major corpus passed as word-major


@pytest.mark.parametrize("select", ["running", "two_pass"])
@pytest.mark.parametrize("layout", ["rows", "words"])
def test_pallas_past_its_32_bit_offsets_searches_in_exact_pieces(layout, select, monkeypatch):
    """A corpus whose operand exceeds the scan's 32-bit offsets is scanned in consecutive pieces and
    merged, as int8_topk does. The limit is lowered so that 300 rows of 96 bits (4 padded words) take
    3 pieces; results equal NumPy's and the XLA twin's, ties (duplicate and all-zero rows, a zero
    query), ``n_valid`` short of the corpus, a per-query mask and row ids included."""
    from embedjax.kernels import pallas_topk
    from embedjax.kernels.hamming import word_major

    monkeypatch.setattr(pallas_topk, "MAX_SCAN_ELEMENTS", 4 * 128 * 2 - 1)  # under 2 tiles of 128 rows
    assert pallas_topk.addressable_pieces(300, 4) == 3
    q, x = awkward_inputs(5, 300, 96, 6)
    q_codes, x_codes = pack_bits(q), pack_bits(x)
    corpus = x_codes if layout == "rows" else word_major(x_codes)
    ref_d, ref_i = numpy_hamming_topk(q, x, 12)
    got = hamming_topk(q_codes, corpus, 12, impl="pallas", layout=layout, select=select)
    np.testing.assert_array_equal(np.asarray(got[0]), ref_d)
    np.testing.assert_array_equal(np.asarray(got[1]), ref_i)
    rng = np.random.default_rng(4)
    kwargs = dict(filter=rng.random((6, 300)) < 0.8, row_ids=rng.permutation(1000)[:300].astype(np.int32),
                  n_valid=290)
    want = hamming_topk(q_codes, x_codes, 12, impl="xla", **kwargs)
    got = hamming_topk(q_codes, corpus, 12, impl="pallas", layout=layout, select=select, **kwargs)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


def _pallas_block_shapes(fn, *shapes):
    """(grid, block shapes) of every pallas_call in ``fn``'s jaxpr."""
    import jax

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                mapping = eqn.params["grid_mapping"]
                yield mapping.grid, [tuple(getattr(b, "block_size", b) for b in m.block_shape)
                                     for m in mapping.block_mappings]
            for value in eqn.params.values():
                inner = getattr(value, "jaxpr", None)
                if inner is not None:
                    yield from walk(getattr(inner, "jaxpr", inner))

    return list(walk(jax.make_jaxpr(fn)(*shapes).jaxpr))


@pytest.mark.parametrize("select", ["running", "two_pass"])
def test_pallas_blocks_only_as_many_query_rows_as_there_are_queries(select):
    """A padded query row costs the popcounts of a real one: one query scans with a block of 1,
    three with 4, forty with the default 16. Results equal NumPy's for each, ties included."""
    import jax

    from embedjax.kernels.hamming import hamming_topk_pallas

    for queries, block_q in ((1, 1), (3, 4), (40, 16)):
        spec = (jax.ShapeDtypeStruct((queries, 4), jnp.uint32), jax.ShapeDtypeStruct((300, 4), jnp.uint32))
        (grid, blocks), = _pallas_block_shapes(lambda q, x: hamming_topk_pallas(q, x, 5, 300, select=select), *spec)
        assert blocks[1] == (block_q, 4) and grid[0] == -(-queries // block_q)
    q, x = awkward_inputs(17, 300, 96, 3)
    ref_d, ref_i = numpy_hamming_topk(q, x, 9)
    for i in range(3):  # the zero query, a duplicated corpus row, a random one: each alone
        dist, idx = hamming_topk(pack_bits(q[i:i + 1]), pack_bits(x), 9, impl="pallas", select=select)
        np.testing.assert_array_equal(np.asarray(dist), ref_d[i:i + 1])
        np.testing.assert_array_equal(np.asarray(idx), ref_i[i:i + 1])


def test_a_corpus_stored_at_scan_rows_is_searched_as_it_lies():
    """`word_major(codes, rows=scan_rows(N))` appends zero codes up to a length both Pallas
    selections tile without padding (the rows past N searched away with ``n_valid``): results
    equal the row-major corpus's. `tests/kernels/test_gpu_lowering.py` checks that no copy of it
    is made before the kernel."""
    from embedjax.kernels.hamming import word_major
    from embedjax.kernels.pallas_topk import split_layout
    from embedjax.kernels.two_pass_topk import DEFAULT_SPLITS, scan_rows

    for n in (1, 131, 300, 2_000_000, 10_000_000):
        rows = scan_rows(n)
        assert rows >= n and rows % 128 == 0
        for target in DEFAULT_SPLITS.values():
            per_split, splits = split_layout(rows, 128, target)
            assert per_split * splits * 128 == rows
    assert scan_rows(10_000_000) < 1.03 * 10_000_000  # the padding stays small
    q, x = awkward_inputs(23, 300, 96, 5)
    ref_d, ref_i = numpy_hamming_topk(q, x, 11)
    x_words = word_major(pack_bits(x), rows=scan_rows(300))
    assert x_words.shape == (3, 384) and not np.asarray(x_words[:, 300:]).any()
    for select in ("running", "two_pass"):
        dist, idx = hamming_topk(pack_bits(q), x_words, 11, impl="pallas", layout="words", n_valid=300, select=select)
        np.testing.assert_array_equal(np.asarray(dist), ref_d)
        np.testing.assert_array_equal(np.asarray(idx), ref_i)
    with pytest.raises(ValueError, match="rows=200 is fewer than the corpus's 300 codes"):
        word_major(pack_bits(x), rows=200)

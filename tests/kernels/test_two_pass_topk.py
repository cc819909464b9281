"""Two-pass top-k (tile maxima, then the best tiles rescored): exactly the jnp twins' results,
ties included, in Pallas interpret mode, on corpora that are not multiples of the tile, with
filters, row ids, padding rows and k larger than the number of tiles.

Tie-heavy inputs on purpose: 64-bit Hamming codes (distances 0..64 over hundreds of rows) and
int8 codes in {-1, 0, 1}, so the k-th score is shared by many rows spread over many tiles and
only the smallest ids may be returned.
"""
import jax.numpy as jnp
import numpy as np
import pytest

from embedjax.kernels import RowPredicates, hamming_topk, int4_topk, int8_topk
from embedjax.kernels.hamming import _hamming_tile, hamming_topk_pallas
from embedjax.kernels.row_filter import as_row_filter
from embedjax.kernels.two_pass_topk import tile_maxima_call
from embedjax.quant import pack_bits
from embedjax.quant.scalar import pack_int4


def _codes(seed, n, bits, q):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, bits)).astype(np.float32)
    x[n // 2:n // 2 + 9] = x[3]  # a run of duplicates across a tile boundary (block_n 8)
    qs = rng.standard_normal((q, bits)).astype(np.float32)
    qs[1] = x[3]
    return pack_bits(qs), pack_bits(x)


def _assert_same(got, want):
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


@pytest.mark.parametrize("n, k, block_n", [(301, 10, 8), (301, 100, 8), (130, 60, 32), (77, 77, 128)])
def test_hamming_two_pass_equals_twin(n, k, block_n):
    """k = 100 over 38 tiles of 8 rows (more than k/ tile rows per tile), k above the number of
    tiles (130 rows in 5 tiles of 32, k = 60), and the whole corpus (k = n, one tile)."""
    q, x = _codes(n + k, n, 64, 5)
    want = hamming_topk(q, x, k, impl="xla", chunk_size=64)
    got = hamming_topk_pallas(q, x, k, n, block_n=block_n, target_splits=4, interpret=True, select="two_pass")
    _assert_same(got, want)
    assert np.all(np.diff(np.asarray(got[0]), axis=1) >= 0)


def test_tile_maxima_are_each_tiles_best_score():
    q, x = _codes(3, 100, 64, 3)
    words = 2
    q32, x32 = (np.asarray(a).view(np.int32) for a in (q, x))
    best, key = tile_maxima_call(_hamming_tile, (jnp.asarray(q32),), (jnp.asarray(x32.T),), 93, block_q=16,
                                 block_n=8, target_splits=2, interpret=True)
    dist = np.unpackbits(np.asarray(q).view(np.uint8)[:, None] ^ np.asarray(x).view(np.uint8)[None],
                         axis=-1).sum(-1).astype(np.int64)
    assert dist.shape == (3, 100) and words == q.shape[1]
    scores = np.where(np.arange(100) < 93, -dist, -np.inf)  # rows from 93 on are padding
    scores = np.pad(scores, ((0, 0), (0, best.shape[1] * 8 - 100)), constant_values=-np.inf)
    np.testing.assert_array_equal(np.asarray(best), scores.reshape(3, -1, 8).max(-1))
    np.testing.assert_array_equal(np.asarray(key), np.broadcast_to(np.arange(best.shape[1]), best.shape))


@pytest.mark.parametrize("form", ["shared", "per_query", "predicates"])
def test_hamming_two_pass_filters_and_row_ids(form):
    """Filters remove rows inside both passes; with row ids (reversed, so tile order is not id
    order) ties go to the smaller id; when fewer than k rows pass, the rest is missing (-1)."""
    n, k = 203, 12  # 26 tiles of 8 rows
    q, x = _codes(7, n, 64, 4)
    rng = np.random.default_rng(8)
    if form == "shared":
        flt = rng.random(n) < 0.04  # ~8 rows pass: fewer than k
    elif form == "per_query":
        flt = rng.random((4, n)) < 0.5
    else:
        attrs = rng.integers(0, 4, (1, n)).astype(np.float32)
        flt = RowPredicates(attrs, np.array([[1.0]] * 4, np.float32), np.array([[2.0]] * 4, np.float32))
    ids = (np.arange(n)[::-1] * 3).astype(np.int32)
    ids[5] = -1  # never matches
    for row_ids in (None, ids):
        want = hamming_topk(q, x, k, impl="xla", filter=flt, row_ids=row_ids, chunk_size=50)
        got = hamming_topk_pallas(q, x, k, n, block_n=8, target_splits=4, interpret=True, select="two_pass",
                                  row_filter=as_row_filter(flt, 4, n),
                                  row_ids=None if row_ids is None else jnp.asarray(row_ids))
        _assert_same(got, want)
        public = hamming_topk(q, x, k, impl="pallas", filter=flt, row_ids=row_ids, select="two_pass")
        _assert_same(public, want)
    if form == "shared":
        assert (np.asarray(got[1]) == -1).any()


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_lowbit_two_pass_equals_twin(kind):
    n, d, k = 290, 24, 50
    rng = np.random.default_rng(5)
    x = rng.integers(-1, 2, (n, d)).astype(np.int8)  # few distinct dot products: many ties
    q = rng.integers(-1, 2, (6, d)).astype(np.int8)
    scale = np.ones(n, np.float32)
    if kind == "int8":
        search = int8_topk
        corpus = x
    else:
        search = int4_topk
        corpus = pack_int4(x)
    want = search(q, None, corpus, scale, k, impl="xla", n_valid=271)
    got = search(q, None, corpus, scale, k, impl="pallas", n_valid=271, select="two_pass")
    _assert_same(got, want)


def test_unknown_selection_is_named():
    q, x = _codes(1, 20, 64, 2)
    with pytest.raises(ValueError, match="select='bitonic' is not a top-k selection; choose one of"):
        hamming_topk(q, x, 3, impl="pallas", select="bitonic")
    with pytest.raises(ValueError, match="not a top-k selection"):
        int8_topk(np.ones((1, 4), np.int8), None, np.ones((5, 4), np.int8), None, 2, select="heap")


@pytest.mark.parametrize("reverse_ids", [False, True])
def test_ties_across_tiles_go_to_the_smallest_ids(reverse_ids):
    """Every one of 20 tiles holds an exact copy of the query (distance 0): the three chosen tiles
    must be those holding the three smallest ids, the last tiles when ids run backwards."""
    n, block_n, k = 160, 8, 3
    q, x = _codes(11, n, 64, 2)
    x = np.asarray(x).copy()
    x[::block_n] = np.asarray(q)[0]
    row_ids = jnp.asarray(np.arange(n)[::-1].astype(np.int32)) if reverse_ids else None
    want = hamming_topk(q, x, k, impl="xla", row_ids=row_ids)
    got = hamming_topk_pallas(q, jnp.asarray(x), k, n, block_n=block_n, target_splits=4, interpret=True,
                              select="two_pass", row_ids=row_ids)
    _assert_same(got, want)
    expected = [n - 1 - 152, n - 1 - 144, n - 1 - 136] if reverse_ids else [0, 8, 16]
    np.testing.assert_array_equal(np.asarray(got[1])[0], expected)

"""Blocked top-k selection and the XLA tile-maxima scan == their plain references, ties included.

Scores are small integers (as Hamming scores are) so that most of them tie: a selection that took
a larger position before a smaller one at equal score, or missed a column in a block it did not
choose, fails these tests.
"""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax import lax

from embedjax.kernels.row_filter import NEG_INF
from embedjax.kernels.topk import blocked_top_k, chunked_topk, fast_top_k, top_k_block
from embedjax.kernels.two_pass_topk import xla_tile_maxima, xla_two_pass_topk


def tied_scores(seed, q, c, levels=7):
    """float32 [Q, C] scores from `levels` values, with -inf columns and one all -inf query."""
    rng = np.random.default_rng(seed)
    s = rng.integers(0, levels, size=(q, c)).astype(np.float32)
    s[:, rng.choice(c, c // 5, replace=False)] = -np.inf
    s[-1] = -np.inf
    return s


def numpy_top_k(s_qc, k):
    """(score descending, position ascending): what `lax.top_k` returns."""
    order = np.lexsort((np.broadcast_to(np.arange(s_qc.shape[1]), s_qc.shape), -s_qc), axis=1)[:, :k]
    return np.take_along_axis(s_qc, order, 1), order


@pytest.mark.parametrize("q, c, k, block", [(5, 96, 3, 32), (3, 448, 10, 16), (4, 1024, 7, 64), (2, 640, 20, 8)])
@pytest.mark.parametrize("layout", ["qc", "cq"])
def test_blocked_top_k_equals_top_k_with_ties(q, c, k, block, layout):
    s = tied_scores(q * c + k, q, c)
    want_s, want_p = numpy_top_k(s, k)
    got_s, got_p = blocked_top_k(jnp.asarray(s if layout == "qc" else s.T), k, block, layout)
    np.testing.assert_array_equal(np.asarray(got_p), want_p)
    np.testing.assert_array_equal(np.asarray(got_s), want_s)
    ref_s, ref_p = lax.top_k(jnp.asarray(s), k)  # and lax.top_k agrees with the NumPy order
    np.testing.assert_array_equal(np.asarray(ref_p), want_p)


def test_blocked_top_k_names_a_bad_block():
    with pytest.raises(ValueError, match="multiple of block=32"):
        blocked_top_k(jnp.zeros((2, 100)), 3, 32)


def test_fast_top_k_uses_blocks_only_where_they_fit():
    assert top_k_block(32768, 10) == 64 and top_k_block(32768, 100) == 32
    assert top_k_block(1000, 10) is None  # not a multiple of 32 or 64
    assert top_k_block(256, 10) is None  # 10 blocks of 16+ columns would cover more than a quarter
    s = tied_scores(3, 4, 2560)
    for k in (1, 10, 40, 2560):
        for layout, arr in (("qc", s), ("cq", s.T)):
            got_s, got_p = fast_top_k(jnp.asarray(arr), k, layout)
            want_s, want_p = numpy_top_k(s, k)
            np.testing.assert_array_equal(np.asarray(got_p), want_p)
            np.testing.assert_array_equal(np.asarray(got_s), want_s)


def _int_score(q_args, x_args):
    """A bit-exact scorer: [Q, C] = -|q - x| summed over 3 features (integers in float32)."""
    (q,), (x,) = q_args, x_args
    return -jnp.sum(jnp.abs(q[:, None, :] - x[None, :, :]), axis=-1)


def _int_score_cq(q_args, x_args):
    (q_t,), (x,) = q_args, x_args
    return _int_score((q_t.T,), (x,)).T


def _int_data(seed, q, n, n_valid=None):
    """Integer features in 0..5 (scores 0..-15, many ties); the queries themselves (score 0, the
    best) are copied just past ``n_valid``, where only a missing mask would find them."""
    rng = np.random.default_rng(seed)
    qs = rng.integers(0, 6, (q, 3)).astype(np.float32)
    x = rng.integers(0, 6, (n, 3)).astype(np.float32)
    if n_valid is not None and n_valid + q <= n:
        x[n_valid:n_valid + q] = qs
    return jnp.asarray(qs), jnp.asarray(x)


@pytest.mark.parametrize("n, chunk, n_valid", [(1000, 256, 1000), (1000, 256, 733), (77, 64, 77), (5000, 4096, 4099)])
def test_chunked_topk_skips_the_mask_only_for_whole_valid_chunks(n, chunk, n_valid):
    """`chunked_topk` takes the unmasked branch for chunks below n_valid and the masked one for the
    chunk holding n_valid and the clamped last chunk (which re-reads rows): same as NumPy, in both
    score layouts."""
    q, x = _int_data(n + chunk, 6, n, n_valid)
    s = np.array(_int_score((q,), (x,)))
    s[:, n_valid:] = -np.inf
    want_s, want_p = numpy_top_k(s, 12)
    for score, q_args, layout in ((_int_score, (q,), "qc"), (_int_score_cq, (q.T,), "cq")):
        got_s, got_i = jax.jit(lambda q_args, x: chunked_topk(score, q_args, (x,), 12, n_valid=n_valid,
                                                              chunk_size=chunk, scores_layout=layout))(q_args, x)
        np.testing.assert_array_equal(np.asarray(got_i), want_p)
        np.testing.assert_array_equal(np.asarray(got_s), want_s)


@pytest.mark.parametrize("layout", ["qc", "cq"])
def test_xla_tile_maxima_are_each_tiles_best_score(layout):
    n, block, n_valid = 1000, 32, 990
    q, x = _int_data(1, 5, n, n_valid)
    score, q_args = (_int_score, (q,)) if layout == "qc" else (_int_score_cq, (q.T,))
    got = np.asarray(xla_tile_maxima(score, q_args, (x,), n_valid, block_n=block, chunk_size=96,
                                     scores_layout=layout))
    got = got if layout == "qc" else got.T
    s = np.array(_int_score((q,), (x,)))
    s[:, n_valid:] = -np.inf
    tiles = -(-n // block)
    want = np.full((5, tiles), -np.inf, np.float32)
    for t in range(tiles):
        want[:, t] = s[:, t * block:(t + 1) * block].max(axis=1)
    assert got.shape == (5, 64)  # 32 tiles padded to fast_top_k's 64-column blocks
    np.testing.assert_array_equal(got[:, :tiles], want)
    assert np.all(got[:, tiles:] == NEG_INF)


@pytest.mark.parametrize("n, k, chunk", [(1000, 10, 96), (1000, 100, 256), (45, 40, 32), (3000, 7, 4096), (13, 4, 32)])
def test_xla_two_pass_equals_numpy(n, k, chunk):
    """Tiles of 32 rows over heavily tied integer scores; k=100 of 1000 rows chooses 100 of 32 tiles
    (all of them), 40 of 45 rows spans a short last tile."""
    q, x = _int_data(n + k, 7, n)
    s = np.array(_int_score((q,), (x,)))
    want_s, want_p = numpy_top_k(s, k)
    got_s, got_i = xla_two_pass_topk(_int_score_cq, (q.T,), (x,), _int_score, (q,), n, k, chunk_size=chunk,
                                     scores_layout="cq")
    np.testing.assert_array_equal(np.asarray(got_i), want_p)
    np.testing.assert_array_equal(np.asarray(got_s), want_s)

"""Analysis metrics against hand-computed values and float64 NumPy/SciPy references.

Tolerances: the metrics run in float32 (JAX default); on these O(1)-valued inputs
float32 rounding stays below 1e-5 relative, so hand values are checked at 1e-5
and random-input references (sums over ~10^4 terms) at 1e-4.
"""
import itertools
import math

import jax
import numpy as np
import pytest
import scipy.stats

from embedjax.eval import analysis


# ----------------------------------------------------------------------- RankMe


def test_rankme_hand_value_two_singular_values():
    # singular values 3 and 1 -> p = (0.75, 0.25) -> exp(entropy)
    emb = np.array([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    p = np.array([0.75, 0.25]) + 1e-7
    expected = math.exp(-float(np.sum(p * np.log(p))))
    assert expected == pytest.approx(1.7548, abs=1e-4)
    assert float(analysis.rankme(emb)) == pytest.approx(expected, rel=1e-5)


def test_rankme_full_rank_and_rank_one():
    eye = np.eye(5)
    assert float(analysis.rankme(eye)) == pytest.approx(5.0, rel=1e-5)
    rank_one = np.outer(np.arange(1.0, 8.0), np.array([1.0, -2.0, 0.5, 3.0]))
    assert float(analysis.rankme(rank_one)) == pytest.approx(1.0, abs=1e-3)


def test_rankme_matches_numpy_reference_on_random_input():
    x = np.random.default_rng(0).normal(size=(37, 13)) * np.linspace(0.1, 3.0, 13)
    s = np.linalg.svd(x, compute_uv=False)
    p = s / s.sum() + 1e-7
    assert float(analysis.rankme(x)) == pytest.approx(math.exp(-np.sum(p * np.log(p))), rel=1e-4)


# ------------------------------------------------------- alignment, uniformity


def test_alignment_hand_value():
    x = np.array([[1.0, 0.0], [0.0, 2.0]])  # second row is normalised to (0, 1)
    y = np.array([[0.0, 1.0], [0.0, 1.0]])
    # ||e1 - e2||^2 = 2 and ||e2 - e2||^2 = 0 -> mean 1
    assert float(analysis.alignment(x, y)) == pytest.approx(1.0, rel=1e-6)
    # alpha = 1: (sqrt 2 + 0) / 2
    assert float(analysis.alignment(x, y, alpha=1.0)) == pytest.approx(math.sqrt(2) / 2, rel=1e-6)
    # without normalisation the second pair is ||(0,2) - (0,1)||^2 = 1 -> (2 + 1) / 2
    assert float(analysis.alignment(x, y, normalize=False)) == pytest.approx(1.5, rel=1e-6)


def test_uniformity_hand_value_three_points_on_circle():
    # angles 0, 90, 180 degrees: squared distances 2, 4, 2
    x = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    expected = math.log((math.exp(-4) + math.exp(-8) + math.exp(-4)) / 3)
    assert float(analysis.uniformity(x)) == pytest.approx(expected, rel=1e-5)


def test_uniformity_matches_bruteforce_pairs_on_random_input():
    x = np.random.default_rng(1).normal(size=(29, 7))
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    vals = [np.exp(-2.0 * np.sum((u[i] - u[j]) ** 2)) for i, j in itertools.combinations(range(29), 2)]
    assert float(analysis.uniformity(x)) == pytest.approx(math.log(np.mean(vals)), rel=1e-4)


def test_uniformity_is_stable_for_large_t():
    # naive log(mean(exp(-t d^2))) underflows to -inf for t = 500; the log-sum-exp form does not
    x = np.array([[1.0, 0.0], [0.0, 1.0], [math.sqrt(0.5), math.sqrt(0.5)]])
    d2_min = 2 - 2 * math.sqrt(0.5)
    val = float(analysis.uniformity(x, t=500.0))
    assert np.isfinite(val)
    # dominated by the two closest pairs: log(2 exp(-t d2_min) / 3)
    assert val == pytest.approx(math.log(2 / 3) - 500.0 * d2_min, rel=1e-4)


# ------------------------------------------------------------------- isotropy


def test_mean_cosine_hand_value():
    x = np.array([[1.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    # cosines: 0, 1/sqrt2, 1/sqrt2
    assert float(analysis.mean_cosine(x)) == pytest.approx((2 / math.sqrt(2)) / 3, rel=1e-6)


def test_mean_cosine_matches_pairwise_reference():
    x = np.random.default_rng(2).normal(size=(41, 9)) + 0.7
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    c = u @ u.T
    expected = (c.sum() - np.trace(c)) / (41 * 40)
    assert float(analysis.mean_cosine(x)) == pytest.approx(expected, rel=1e-4)


def test_partition_isotropy_hand_values():
    # symmetric cross: every direction has Z = e + 1/e + 2 -> ratio 1
    cross = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    assert float(analysis.partition_isotropy(cross)) == pytest.approx(1.0, rel=1e-6)
    # e1, e1, e2: eigenvectors +-e1, +-e2; Z(e1) = 2e + 1 is the max, Z(-e1) = 2/e + 1 the min
    skewed = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    expected = (2 / math.e + 1) / (2 * math.e + 1)
    assert expected == pytest.approx(0.26967, abs=1e-5)
    assert float(analysis.partition_isotropy(skewed)) == pytest.approx(expected, rel=1e-5)


def test_partition_isotropy_matches_numpy_eigendecomposition():
    x = np.random.default_rng(3).normal(size=(50, 6)) * np.array([2.0, 1.0, 0.5, 0.5, 0.3, 0.1])
    _, vecs = np.linalg.eigh(x.T @ x)
    z = [np.sum(np.exp(x @ (s * v))) for v in vecs.T for s in (1, -1)]
    assert float(analysis.partition_isotropy(x)) == pytest.approx(min(z) / max(z), rel=1e-4)


# -------------------------------------------------------------------- hubness


def test_k_occurrence_and_skewness_hand_values():
    # 4 queries x 4 items; top-1 of each query: item 0, 0, 0, 3
    scores = np.array(
        [
            [0.9, 0.1, 0.2, 0.3],
            [0.8, 0.5, 0.1, 0.0],
            [0.7, 0.2, 0.3, 0.1],
            [0.1, 0.2, 0.3, 0.4],
        ]
    )
    np.testing.assert_array_equal(np.asarray(analysis.k_occurrence(scores, 1)), [3, 0, 0, 1])
    # N_1 = [3, 0, 0, 1]: mean 1, deviations (2, -1, -1, 0): m2 = 6/4, m3 = 6/4 -> 1 / sqrt(1.5)
    assert float(analysis.hubness_skewness(scores, k=1)) == pytest.approx(1 / math.sqrt(1.5), rel=1e-5)
    # top-2 lists: {0,3}, {0,1}, {0,2}, {3,2} -> N_2 = [3, 1, 2, 2]
    np.testing.assert_array_equal(np.asarray(analysis.k_occurrence(scores, 2)), [3, 1, 2, 2])


def test_hubness_skewness_matches_scipy_on_random_scores():
    rng = np.random.default_rng(4)
    q = rng.normal(size=(300, 16))
    d = rng.normal(size=(97, 16)) * rng.uniform(0.5, 2.0, size=(97, 1))  # norm-driven hubs
    scores = q @ d.T
    top = np.argsort(-scores, axis=1)[:, :10]
    counts = np.bincount(top.ravel(), minlength=97)
    np.testing.assert_array_equal(np.asarray(analysis.k_occurrence(scores, 10)), counts)
    assert float(analysis.hubness_skewness(scores, 10)) == pytest.approx(scipy.stats.skew(counts), rel=1e-4)


def test_hubness_skewness_is_zero_without_hubs():
    # each query's top-1 is a different item: N_1 constant -> skewness 0, not NaN
    assert float(analysis.hubness_skewness(np.eye(6), k=1)) == 0.0


def test_inverted_softmax_hand_value_demotes_a_hub():
    temperature = 0.5
    # item 0 is close to every bank query (a hub); the test query slightly prefers it
    scores = np.array([[0.9, 0.8]])
    bank = np.array([[0.9, 0.1], [0.8, 0.2], [0.85, 0.3]])
    out = np.asarray(analysis.inverted_softmax_scores(scores, bank, temperature))

    def prob(s, col):
        return math.exp(s / temperature) / sum(math.exp(b / temperature) for b in bank[:, col])

    expected = [prob(0.9, 0), prob(0.8, 1)]
    np.testing.assert_allclose(np.exp(out[0]), expected, rtol=1e-5)
    assert out[0, 1] > out[0, 0]  # the ranking flipped: the hub lost first place


def test_dynamic_inverted_softmax_leaves_queries_outside_the_activation_set():
    scores = np.array([[0.9, 0.8, 0.0], [0.1, 0.2, 0.7]])
    bank = np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.1]])  # activation set (top-1) = {item 0}
    plain = np.asarray(analysis.inverted_softmax_scores(scores, bank, 0.5))
    dyn = np.asarray(analysis.inverted_softmax_scores(scores, bank, 0.5, dynamic=True, activation_k=1))
    np.testing.assert_allclose(dyn[0], plain[0], rtol=1e-6)  # top-1 is item 0: normalised
    np.testing.assert_allclose(dyn[1], scores[1], rtol=1e-6)  # top-1 is item 2: raw scores kept


def test_inverted_softmax_reduces_hubness_on_random_embeddings():
    # queries concentrate around one direction (as real query sets do), so the unit
    # items nearest that direction are hubs; a bank drawn from the same query
    # distribution gives those items a large partition function and demotes them.
    rng = np.random.default_rng(5)

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    shift = np.zeros(16)
    shift[0] = 1.5
    d = unit(rng.normal(size=(300, 16)))
    q = unit(rng.normal(size=(500, 16)) + shift)
    bank = unit(rng.normal(size=(2000, 16)) + shift)
    raw = q @ d.T
    normed = analysis.inverted_softmax_scores(raw, bank @ d.T, temperature=0.05)
    before = float(analysis.hubness_skewness(raw, 10))
    after = float(analysis.hubness_skewness(normed, 10))
    # measured: 1.81 -> 0.23
    assert before > 1.5 and after < before / 4


def test_functions_run_under_jit_on_jax_arrays():
    x = jax.numpy.asarray(np.random.default_rng(6).normal(size=(11, 5)), dtype=jax.numpy.float32)
    f = jax.jit(lambda a: analysis.mean_cosine(a) + analysis.rankme(a) + analysis.uniformity(a))
    ref = float(analysis.mean_cosine(x)) + float(analysis.rankme(x)) + float(analysis.uniformity(x))
    assert float(f(x)) == pytest.approx(ref, rel=1e-5)


# ----------------------------------------------------------------- histograms


def test_similarity_histograms_hand_counts():
    scores = np.array([[0.95, -0.5, 0.1], [0.6, 0.55, 2.0]])
    relevant = np.array([[True, False, False], [False, True, False]])
    h = analysis.similarity_histograms(scores, relevant, bins=4, value_range=(-1.0, 1.0))
    np.testing.assert_allclose(np.asarray(h["edges"]), [-1.0, -0.5, 0.0, 0.5, 1.0])
    # bins [-1,-.5) [-.5,0) [0,.5) [.5,1]: -0.5 -> bin 1; 0.1 -> 2; 0.95, 0.6, 0.55 -> 3; 2.0 outside
    np.testing.assert_array_equal(np.asarray(h["all"]), [0, 1, 1, 3])
    np.testing.assert_array_equal(np.asarray(h["relevant"]), [0, 0, 0, 2])
    np.testing.assert_array_equal(np.asarray(h["non_relevant"]), [0, 1, 1, 1])
    assert int(h["outside"]) == 1


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: analysis.rankme(np.ones(3)), "2-D"),
        (lambda: analysis.alignment(np.ones((3, 2)), np.ones((2, 2))), "same shape"),
        (lambda: analysis.uniformity(np.ones((1, 2))), "at least 2"),
        (lambda: analysis.k_occurrence(np.ones((3, 4)), 5), r"k must be in \[1, 4\]"),
        (lambda: analysis.inverted_softmax_scores(np.ones((2, 3)), np.ones((2, 4)), 0.1), "same corpus"),
        (lambda: analysis.inverted_softmax_scores(np.ones((2, 3)), np.ones((2, 3)), 0.0), "temperature"),
        (lambda: analysis.similarity_histograms(np.ones((2, 2)), np.ones((2, 3), bool)), "shape"),
        (lambda: analysis.similarity_histograms(np.ones(3), value_range=(1.0, -1.0)), "lo < hi"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_non_int_k_is_a_type_error():
    with pytest.raises(TypeError, match="k must be an int"):
        analysis.hubness_skewness(np.ones((3, 4)), k=2.0)

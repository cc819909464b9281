"""Paired significance tests against hand enumeration and SciPy.

Monte-Carlo p-values are checked with a tolerance of ~5 standard errors of a
binomial proportion (sqrt(p (1 - p) / samples)), so they fail only when wrong.
"""
import math

import numpy as np
import pytest
import scipy.stats

from embedjax.eval import significance


def test_permutation_exact_hand_enumeration():
    # differences (1, 2, 3): the 8 sign patterns give means +-2, +-4/3, +-2/3, 0, 0;
    # |mean| >= 2 for 2 of them -> p = 2/8
    out = significance.paired_permutation_test([0.0, 0.0, 0.0], [1.0, 2.0, 3.0])
    assert out["exact"] and out["p_value"] == pytest.approx(0.25, abs=1e-12)
    assert out["mean_difference"] == pytest.approx(2.0)
    assert out["effect_size"] == pytest.approx(2.0)  # mean 2 / sd 1
    assert (out["mean_a"], out["mean_b"], out["num_queries"]) == (0.0, 2.0, 3)


def test_permutation_exact_matches_scipy():
    rng = np.random.default_rng(0)
    a = rng.uniform(size=11)
    b = a + rng.normal(0.15, 0.2, size=11)
    ours = significance.paired_permutation_test(a, b, num_samples=5000)
    ref = scipy.stats.permutation_test(
        (a, b), lambda x, y: np.mean(y - x), permutation_type="samples", n_resamples=5000, alternative="two-sided"
    )
    assert ours["exact"]  # 2^11 = 2048 <= 5000: scipy enumerates too
    assert ours["p_value"] == pytest.approx(ref.pvalue, rel=1e-9)


def test_permutation_randomised_close_to_scipy_exact_value():
    rng = np.random.default_rng(1)
    a = rng.uniform(size=14)
    b = a + rng.normal(0.1, 0.3, size=14)
    exact = scipy.stats.permutation_test(
        (a, b), lambda x, y: np.mean(y - x), permutation_type="samples", n_resamples=2**14, alternative="two-sided"
    ).pvalue
    ours = significance.paired_permutation_test(a, b, num_samples=4000, seed=3)
    assert not ours["exact"]
    assert ours["p_value"] == pytest.approx(exact, abs=5 * math.sqrt(exact * (1 - exact) / 4000) + 1e-3)


def test_bootstrap_hand_case_two_queries():
    # differences (-1, 3), mean 1: resampled means are -1, 1, 1, 3 (prob 1/4, 1/2, 1/4);
    # shifted by the mean: -2, 0, 2 -> |.| >= 1 with probability 1/2
    samples = 20_000
    out = significance.paired_bootstrap_test([0.0, 0.0], [-1.0, 3.0], num_samples=samples, seed=0)
    assert out["p_value"] == pytest.approx(0.5, abs=5 * math.sqrt(0.25 / samples))
    assert (out["ci_low"], out["ci_high"]) == (-1.0, 3.0)
    assert out["effect_size"] == pytest.approx(1 / math.sqrt(8))  # mean 1 / sd sqrt(8)


def test_bootstrap_interval_matches_scipy_percentile_interval():
    rng = np.random.default_rng(2)
    a = rng.uniform(size=60)
    b = a + rng.normal(0.05, 0.2, size=60)
    out = significance.paired_bootstrap_test(a, b, num_samples=20_000, seed=1)
    ref = scipy.stats.bootstrap((b - a,), np.mean, n_resamples=20_000, method="percentile", rng=np.random.default_rng(7))
    se = float(np.std(b - a, ddof=1) / math.sqrt(60))
    # two Monte-Carlo estimates of the same quantiles: agree to a small fraction of the standard error
    assert out["ci_low"] == pytest.approx(ref.confidence_interval.low, abs=0.05 * se)
    assert out["ci_high"] == pytest.approx(ref.confidence_interval.high, abs=0.05 * se)


def test_tests_agree_with_a_t_test_on_large_normal_samples():
    # for n = 400 normal differences the t-test p-value is the asymptotic truth of both tests
    rng = np.random.default_rng(3)
    a = rng.normal(size=400)
    b = a + rng.normal(0.07, 1.0, size=400)
    t_p = scipy.stats.ttest_rel(b, a).pvalue
    assert 0.005 < t_p < 0.2  # a borderline case, where a wrong test would show
    for test in (significance.paired_bootstrap_test, significance.paired_permutation_test):
        p = test(a, b, num_samples=20_000, seed=5)["p_value"]
        assert p == pytest.approx(t_p, rel=0.25), test.__name__


def test_identical_systems_are_not_significant():
    scores = np.linspace(0, 1, 30)
    for test in (significance.paired_bootstrap_test, significance.paired_permutation_test):
        out = test(scores, scores, num_samples=500)
        assert out["p_value"] == 1.0 and out["effect_size"] == 0.0 and out["mean_difference"] == 0.0


def test_results_are_deterministic_for_a_seed():
    rng = np.random.default_rng(4)
    a, b = rng.uniform(size=50), rng.uniform(size=50)
    assert significance.paired_bootstrap_test(a, b, seed=9) == significance.paired_bootstrap_test(a, b, seed=9)


@pytest.mark.parametrize(
    "a, b, message",
    [
        ([1.0, 2.0], [1.0], "same queries"),
        ([[1.0, 2.0]], [[1.0, 2.0]], "1-D"),
        ([1.0], [2.0], "at least 2"),
        ([1.0, float("nan")], [1.0, 2.0], "NaN"),
    ],
)
def test_bad_inputs_raise(a, b, message):
    with pytest.raises(ValueError, match=message):
        significance.paired_permutation_test(a, b)


# ---------------------------------------------------------------- paired bootstrap of AUC


def test_weighted_auc_equals_sklearn_on_the_resampled_examples():
    from sklearn.metrics import roc_auc_score

    from embedjax.eval.significance import weighted_auc

    rng = np.random.default_rng(0)
    y = (rng.random(57) < 0.4).astype(int)
    s = np.round(rng.normal(size=57), 1)  # rounded: many ties
    weights = np.stack([np.bincount(rng.integers(0, 57, 57), minlength=57) for _ in range(5)] + [np.ones(57, int)])
    got = weighted_auc(y, s, weights)
    for row, w in zip(got, weights):
        idx = np.repeat(np.arange(57), w)
        assert row == pytest.approx(roc_auc_score(y[idx], s[idx]), abs=1e-12)


def test_paired_bootstrap_auc_detects_a_real_difference_and_not_a_null_one():
    from sklearn.metrics import roc_auc_score

    from embedjax.eval.significance import paired_bootstrap_auc

    rng = np.random.default_rng(1)
    y = (rng.random(400) < 0.3).astype(int)
    good = y + rng.normal(0, 0.8, size=(3, 400))  # three seeds of a good model
    bad = y + rng.normal(0, 2.5, size=(3, 400))
    out = paired_bootstrap_auc(y, bad, good, num_samples=500, seed=0)
    expected = np.mean([roc_auc_score(y, g) for g in good]) - np.mean([roc_auc_score(y, b) for b in bad])
    assert out["mean_difference"] == pytest.approx(expected, abs=1e-12)
    assert out["p_value"] < 0.01 and out["ci_low"] > 0
    same = paired_bootstrap_auc(y, good, good, num_samples=200, seed=0)
    assert same["mean_difference"] == 0.0 and same["p_value"] == 1.0
    with pytest.raises(ValueError, match="both classes"):
        paired_bootstrap_auc(np.zeros(5), np.ones(5), np.ones(5))

def _naive_correlation_bootstrap(a, b, gold, num_samples, seed):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(num_samples, len(a)))  # the same draws as one chunk of the fast path
    return np.array([100 * (scipy.stats.spearmanr(b[i], gold[i]).statistic - scipy.stats.spearmanr(a[i], gold[i]).statistic)
                     for i in idx])


def test_correlation_bootstrap_matches_a_scipy_loop_and_finds_the_better_system():
    rng = np.random.default_rng(5)
    gold = np.round(rng.uniform(0, 5, size=37), 1)  # rounded: ties in gold, as STS scores have
    a = gold + rng.normal(0, 2.0, size=37)  # noisy system
    b = gold + rng.normal(0, 0.5, size=37)  # good system
    out = significance.paired_bootstrap_correlation_test(a, b, gold, num_samples=300, seed=2)
    diffs = _naive_correlation_bootstrap(a, b, gold, 300, 2)
    assert out["mean_a"] == pytest.approx(100 * scipy.stats.spearmanr(a, gold).statistic, rel=1e-12)
    assert out["mean_b"] == pytest.approx(100 * scipy.stats.spearmanr(b, gold).statistic, rel=1e-12)
    observed = out["mean_difference"]
    assert observed > 20
    count = np.sum(np.abs(diffs - observed) >= abs(observed) - 1e-9)
    assert out["p_value"] == pytest.approx((count + 1) / 301, abs=1e-12)
    assert out["ci_low"] == pytest.approx(np.percentile(diffs, 2.5)) and out["ci_low"] > 0
    assert out["p_value"] < 0.05 and out["effect_size"] == pytest.approx(observed / np.std(diffs, ddof=1))


def test_correlation_bootstrap_of_identical_systems_is_not_significant():
    rng = np.random.default_rng(6)
    gold = rng.uniform(0, 5, size=50)
    a = gold + rng.normal(0, 1, size=50)
    out = significance.paired_bootstrap_correlation_test(a, a.copy(), gold, num_samples=500)
    assert out["mean_difference"] == 0.0 and out["p_value"] == 1.0
    with pytest.raises(ValueError, match="gold has 3 scores for 50 pairs"):
        significance.paired_bootstrap_correlation_test(a, a, gold[:3])
    with pytest.raises(ValueError, match="method='kendall'"):
        significance.paired_bootstrap_correlation_test(a, a, gold, method="kendall")

"""Paired significance tests on per-query (or per-pair) scores of two systems.

Both tests compare system B against system A on the same queries, from the
per-query differences d_i = b_i - a_i, and test H0: "the mean difference is 0"
two-sided. They return the same dict:

    {"mean_a", "mean_b", "mean_difference", "effect_size", "p_value",
     "ci_low", "ci_high", "num_queries", "num_samples", "exact"}

- effect_size is Cohen's d_z for paired data: mean(d) / std(d, ddof=1) (0 when
  every difference is equal and zero; +-inf when they are equal and non-zero).
- ci_low/ci_high is the 95% paired-bootstrap percentile interval of mean(d)
  (both tests report it, so a table can show it next to either p-value).

Randomised p-values use (count + 1) / (samples + 1), so a p-value is never 0
(the convention of scipy.stats.permutation_test); an exact permutation test
enumerates all 2^n sign patterns and needs no such correction.

A correlation over pairs (STS: Spearman of model similarity against gold) is not a mean of
per-pair scores, so `paired_bootstrap_correlation_test` resamples the pairs themselves and
recomputes both systems' correlations on each resample; it returns the same keys, with the
correlations x100 (as `embedjax.eval.sts` reports them) and ``effect_size`` a z score.

References: Efron & Tibshirani (1993) for the paired bootstrap with the shift
to the null; Smucker, Allan & Carterette, "A comparison of statistical
significance tests for information retrieval evaluation", CIKM 2007, for the
randomisation (permutation) test on per-query scores.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["paired_bootstrap_correlation_test", "paired_bootstrap_test", "paired_permutation_test", "paired_differences",
           "paired_bootstrap_auc", "weighted_auc"]

_CHUNK = 2048  # resamples per vectorised block: bounds memory at _CHUNK x n floats


def paired_differences(scores_a, scores_b) -> np.ndarray:
    """Per-query differences b - a as float64 [n], after checking the inputs pair up."""
    a = np.asarray(scores_a, dtype=np.float64)
    b = np.asarray(scores_b, dtype=np.float64)
    if a.ndim != 1 or b.ndim != 1:
        raise ValueError(f"scores_a and scores_b must be 1-D per-query scores; got shapes {a.shape} and {b.shape}")
    if a.shape != b.shape:
        raise ValueError(
            f"scores_a and scores_b must score the same queries in the same order; got {a.size} and {b.size} values"
        )
    if a.size < 2:
        raise ValueError(f"a paired test needs at least 2 queries; got {a.size}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("scores contain NaN or inf; drop or fix those queries first")
    return b - a


def _effect_size(diff: np.ndarray) -> float:
    sd = float(np.std(diff, ddof=1))
    mean = float(np.mean(diff))
    if sd == 0.0:
        return 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
    return mean / sd


def _check_samples(num_samples: int) -> int:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int; got {num_samples!r}")
    return num_samples


def _bootstrap_means(diff: np.ndarray, num_samples: int, rng: np.random.Generator) -> np.ndarray:
    n = diff.size
    means = np.empty(num_samples)
    for start in range(0, num_samples, _CHUNK):
        stop = min(start + _CHUNK, num_samples)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = diff[idx].mean(axis=1)
    return means


def _summary(a, b, diff, p_value, means_boot, num_samples, exact) -> dict:
    lo, hi = np.percentile(means_boot, [2.5, 97.5])
    return {
        "mean_a": float(np.mean(a)),
        "mean_b": float(np.mean(b)),
        "mean_difference": float(np.mean(diff)),
        "effect_size": _effect_size(diff),
        "p_value": float(p_value),
        "ci_low": float(lo),
        "ci_high": float(hi),
        "num_queries": int(diff.size),
        "num_samples": int(num_samples),
        "exact": bool(exact),
    }


def _ties_tolerance(observed: float, diff: np.ndarray) -> float:
    # Resampled means equal to the observed one must count as "at least as extreme";
    # summing in another order can move them by a few ulps.
    return 1e-9 * max(abs(observed), float(np.max(np.abs(diff))), 1e-300)


def paired_bootstrap_test(scores_a, scores_b, *, num_samples: int = 10_000, seed: int = 0) -> dict:
    """Paired bootstrap test of mean(b - a) = 0, two-sided.

    Resamples queries with replacement; under H0 the resampled mean differences,
    shifted by the observed mean, measure how far chance alone moves the mean:
    p = (#{|mean* - mean| >= |mean|} + 1) / (num_samples + 1).
    """
    diff = paired_differences(scores_a, scores_b)
    num_samples = _check_samples(num_samples)
    rng = np.random.default_rng(seed)
    means = _bootstrap_means(diff, num_samples, rng)
    observed = float(np.mean(diff))
    tol = _ties_tolerance(observed, diff)
    count = int(np.sum(np.abs(means - observed) >= abs(observed) - tol))
    p_value = (count + 1) / (num_samples + 1)
    return _summary(scores_a, scores_b, diff, min(p_value, 1.0), means, num_samples, exact=False)


def paired_permutation_test(scores_a, scores_b, *, num_samples: int = 10_000, seed: int = 0) -> dict:
    """Paired permutation (randomisation) test of mean(b - a) = 0, two-sided.

    Under H0 the labels a/b of each query are exchangeable, so every difference
    keeps or flips its sign with probability 1/2. With 2^n <= num_samples every
    sign pattern is enumerated (exact p-value); otherwise num_samples random
    patterns are drawn and p = (#{|mean*| >= |mean|} + 1) / (num_samples + 1).
    """
    diff = paired_differences(scores_a, scores_b)
    num_samples = _check_samples(num_samples)
    n = diff.size
    observed = float(np.mean(diff))
    tol = _ties_tolerance(observed, diff)
    rng = np.random.default_rng(seed)
    exact = n < 63 and 2**n <= num_samples
    count = 0
    if exact:
        total = 2**n
        bits = np.arange(n, dtype=np.int64)
        for start in range(0, total, _CHUNK):
            # sign pattern number m flips difference i when bit i of m is set
            patterns = np.arange(start, min(start + _CHUNK, total), dtype=np.int64)
            signs = 1.0 - 2.0 * ((patterns[:, None] >> bits[None, :]) & 1)
            means = signs @ diff / n
            count += int(np.sum(np.abs(means) >= abs(observed) - tol))
        p_value = count / total
    else:
        for start in range(0, num_samples, _CHUNK):
            size = min(_CHUNK, num_samples - start)
            signs = rng.choice(np.array([1.0, -1.0]), size=(size, n))
            means = signs @ diff / n
            count += int(np.sum(np.abs(means) >= abs(observed) - tol))
        p_value = (count + 1) / (num_samples + 1)
    boot = _bootstrap_means(diff, num_samples, np.random.default_rng(seed + 1))
    return _summary(scores_a, scores_b, diff, min(p_value, 1.0), boot, num_samples, exact=exact)


# ---------------------------------------------------------------- AUC (not a mean of per-item scores)


def weighted_auc(labels, scores, weights_cn) -> np.ndarray:
    """ROC AUC of ``scores`` [n] for each row of example weights ``weights_cn`` [c, n] (ties count 1/2).

    Integer weights w_i mean "example i appears w_i times" (a bootstrap resample), so each row's
    value equals the plain AUC of the resampled examples. float64 [c].
    """
    y = np.asarray(labels).astype(np.float64)
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    w = np.asarray(weights_cn, dtype=np.float64)[:, order]
    neg, pos = w * (1.0 - y_sorted), w * y_sorted
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
    group = np.cumsum(np.r_[True, s_sorted[1:] != s_sorted[:-1]]) - 1  # tie group of each sorted example
    cum = np.cumsum(neg, axis=1)
    before = np.where(starts > 0, cum[:, np.maximum(starts - 1, 0)], 0.0)  # negatives below each group
    ends = np.r_[starts[1:], s.size] - 1
    within = cum[:, ends] - before  # negatives tied with each group
    credit = before[:, group] + 0.5 * within[:, group]
    return (pos * credit).sum(axis=1) / (pos.sum(axis=1) * neg.sum(axis=1))


def paired_bootstrap_auc(labels, scores_a, scores_b, *, num_samples: int = 2_000, seed: int = 0) -> dict:
    """Paired bootstrap test of AUC(b) - AUC(a) = 0, two-sided, on one shared evaluation set.

    ``scores_a`` / ``scores_b`` are [n] or [seeds, n] (several trained seeds of each system, scored on
    the same n examples): the statistic is the mean over seeds of AUC(b) minus the mean over seeds of
    AUC(a). Examples are resampled with replacement (the same resample for every system and seed);
    p = (#{|diff* - diff| >= |diff|} + 1) / (num_samples + 1), as in `paired_bootstrap_test`. The
    interval is the 95% percentile interval of diff*. ``effect_size`` is diff / std(diff*) (a z score);
    ``num_queries`` counts examples. Same keys as the other tests.
    """
    y = np.asarray(labels)
    a = np.atleast_2d(np.asarray(scores_a, dtype=np.float64))
    b = np.atleast_2d(np.asarray(scores_b, dtype=np.float64))
    if y.ndim != 1 or a.shape[1] != y.size or b.shape[1] != y.size:
        raise ValueError(f"labels [n] and scores [seeds, n] must share n; got {y.shape}, {a.shape}, {b.shape}")
    if not np.isin(y, (0, 1)).all() or y.min() == y.max():
        raise ValueError("labels must be 0/1 with both classes present")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("scores contain NaN or inf")
    num_samples = _check_samples(num_samples)
    ones = np.ones((1, y.size))
    auc_a = float(np.mean([weighted_auc(y, s, ones)[0] for s in a]))
    auc_b = float(np.mean([weighted_auc(y, s, ones)[0] for s in b]))
    observed = auc_b - auc_a
    rng = np.random.default_rng(seed)
    diffs = np.empty(num_samples)
    chunk = max(1, min(_CHUNK, 4_000_000 // y.size))  # bounds the [chunk, n] weight matrix
    for start in range(0, num_samples, chunk):
        size = min(chunk, num_samples - start)
        weights = np.stack([np.bincount(rng.integers(0, y.size, y.size), minlength=y.size) for _ in range(size)])
        mean_a = np.mean([weighted_auc(y, s, weights) for s in a], axis=0)
        mean_b = np.mean([weighted_auc(y, s, weights) for s in b], axis=0)
        diffs[start:start + size] = mean_b - mean_a
    count = int(np.sum(np.abs(diffs - observed) >= abs(observed) - 1e-12))
    sd = float(np.std(diffs, ddof=1)) if num_samples > 1 else 0.0
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"mean_a": auc_a, "mean_b": auc_b, "mean_difference": observed,
            "effect_size": observed / sd if sd > 0 else 0.0, "p_value": min(1.0, (count + 1) / (num_samples + 1)),
            "ci_low": float(lo), "ci_high": float(hi), "num_queries": int(y.size), "num_samples": num_samples,
            "exact": False}

# ---------------------------------------------------------------- correlations (STS)


def _rank_rows(x_sn: np.ndarray) -> np.ndarray:
    from scipy import stats

    return stats.rankdata(x_sn, axis=1)  # average ranks for ties, as scipy.stats.spearmanr


def _row_correlations(x_sn: np.ndarray, y_sn: np.ndarray) -> np.ndarray:
    xc = x_sn - x_sn.mean(axis=1, keepdims=True)
    yc = y_sn - y_sn.mean(axis=1, keepdims=True)
    denom = np.sqrt(np.sum(xc * xc, axis=1) * np.sum(yc * yc, axis=1))
    return np.divide(np.sum(xc * yc, axis=1), denom, out=np.zeros(len(x_sn)), where=denom > 0)


def _correlations(pred_sn, gold_sn, method: str) -> np.ndarray:
    if method == "spearman":
        return _row_correlations(_rank_rows(pred_sn), _rank_rows(gold_sn))
    return _row_correlations(pred_sn, gold_sn)


def paired_bootstrap_correlation_test(pred_a, pred_b, gold, *, method: str = "spearman", num_samples: int = 10_000,
                                      seed: int = 0) -> dict:
    """Paired bootstrap test of corr(b, gold) - corr(a, gold) = 0 over the same pairs, two-sided.

    ``pred_a``, ``pred_b``: each system's score per pair (e.g. cosine similarity) [n], or [seeds, n]
    for several trained seeds of a system (the statistic is then the mean over seeds of each seed's
    correlation, so seed variation stays in the comparison); ``gold`` the gold scores [n];
    ``method`` "spearman" or "pearson". Each resample draws n pairs with
    replacement and scores both systems on them; p = (#{|d* - d| >= |d|} + 1) / (num_samples + 1)
    with d the observed difference (the shift to the null of `paired_bootstrap_test`).
    Correlations are x100; ``effect_size`` is d / std(d*) (a z score, as `paired_bootstrap_auc`).
    """
    if method not in ("spearman", "pearson"):
        raise ValueError(f"method={method!r}: use 'spearman' or 'pearson'")
    a = np.atleast_2d(np.asarray(pred_a, dtype=np.float64))  # [seeds, n]
    b = np.atleast_2d(np.asarray(pred_b, dtype=np.float64))
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"pred_a and pred_b must be [n] or [seeds, n]; got shapes {a.shape} and {b.shape}")
    paired_differences(a[0], b[0])  # same pairs, finite, at least 2
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("predictions contain NaN or inf")
    gold = np.asarray(gold, dtype=np.float64)
    if gold.ndim != 1 or gold.size != a.shape[1] or b.shape[1] != a.shape[1]:
        raise ValueError(f"gold has {gold.size} scores for {a.shape[1]} pairs (pred_b: {b.shape[1]})")
    if not np.all(np.isfinite(gold)):
        raise ValueError("gold scores contain NaN or inf")
    num_samples = _check_samples(num_samples)
    n = gold.size

    def seed_mean(rows_sn, index_rn):  # mean over seeds of each resample's correlation -> [R]
        g = gold[index_rn]
        return np.mean([_correlations(row[index_rn], g, method) for row in rows_sn], axis=0)

    everything = np.arange(n)[None]
    corr_a, corr_b = (100.0 * float(seed_mean(x, everything)[0]) for x in (a, b))
    observed = corr_b - corr_a
    rng = np.random.default_rng(seed)
    diffs = np.empty(num_samples)
    for start in range(0, num_samples, _CHUNK):
        stop = min(start + _CHUNK, num_samples)
        idx = rng.integers(0, n, size=(stop - start, n))
        diffs[start:stop] = 100.0 * (seed_mean(b, idx) - seed_mean(a, idx))
    tol = 1e-9 * max(abs(observed), float(np.max(np.abs(diffs))), 1e-300)
    count = int(np.sum(np.abs(diffs - observed) >= abs(observed) - tol))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    sd = float(np.std(diffs, ddof=1)) if num_samples > 1 else 0.0
    return {"mean_a": corr_a, "mean_b": corr_b, "mean_difference": observed,
            "effect_size": observed / sd if sd > 0 else 0.0,
            "p_value": float(min((count + 1) / (num_samples + 1), 1.0)), "ci_low": float(lo), "ci_high": float(hi),
            "num_queries": int(n), "num_samples": int(num_samples), "exact": False}

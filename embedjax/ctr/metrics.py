"""CTR metrics: ROC AUC (ties count one half) and log loss, in float64 NumPy."""
from __future__ import annotations

import numpy as np

PROB_EPS = 1e-7  # probabilities are clipped to [eps, 1 - eps] before the log


def _check(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or y.shape != s.shape:
        raise ValueError(f"labels and scores must be 1-D of one length; got {y.shape} and {s.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf")
    return y.astype(np.int64), s


def auc(labels, scores) -> float:
    """P(score of a random positive > score of a random negative) + 0.5 P(tie) (the Mann-Whitney U)."""
    y, s = _check(labels, scores)
    pos, neg = int(y.sum()), int(y.size - y.sum())
    if pos == 0 or neg == 0:
        raise ValueError(f"AUC needs both classes; got {pos} positives and {neg} negatives")
    order = np.argsort(s, kind="mergesort")
    s_sorted = s[order]
    ranks = np.empty(s.size, np.float64)
    # average 1-based rank of each tie group
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
    ends = np.r_[starts[1:], s.size]
    group_rank = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(group_rank, ends - starts)
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def per_example_log_loss(labels, probs) -> np.ndarray:
    """float64 [N]: -log p for positives, -log(1 - p) for negatives (p clipped by PROB_EPS)."""
    y, p = _check(labels, probs)
    p = np.clip(p, PROB_EPS, 1.0 - PROB_EPS)
    return -(y * np.log(p) + (1 - y) * np.log1p(-p))


def log_loss(labels, probs) -> float:
    return float(per_example_log_loss(labels, probs).mean())

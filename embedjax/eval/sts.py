"""Semantic textual similarity: rank correlation between model similarities and gold scores."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import stats


def pair_similarities(emb1_nd: np.ndarray, emb2_nd: np.ndarray) -> dict[str, np.ndarray]:
    """Row-wise similarity of paired embeddings [N, D] under four measures (higher = more similar).

    Computed in float64 so the correlation does not depend on summation order.
    """
    a, b = emb1_nd.astype(np.float64), emb2_nd.astype(np.float64)
    norms = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return {
        "cosine": np.sum(a * b, axis=1) / norms,
        "dot": np.sum(a * b, axis=1),
        "euclidean": -np.linalg.norm(a - b, axis=1),
        "manhattan": -np.sum(np.abs(a - b), axis=1),
    }


def sts_scores(emb1_nd: np.ndarray, emb2_nd: np.ndarray, gold_n) -> dict[str, float]:
    """Spearman and Pearson x100 of each similarity measure against gold scores."""
    gold = np.asarray(gold_n, dtype=np.float64)
    if emb1_nd.shape != emb2_nd.shape or emb1_nd.shape[0] != gold.shape[0]:
        raise ValueError(f"embeddings {emb1_nd.shape}, {emb2_nd.shape} and gold {gold.shape} must have the same N")
    if gold.shape[0] < 2:
        raise ValueError("STS needs at least 2 pairs to compute a correlation")
    out = {}
    for name, sim in pair_similarities(emb1_nd, emb2_nd).items():
        out[f"spearman_{name}"] = 100.0 * float(stats.spearmanr(sim, gold).statistic)
        out[f"pearson_{name}"] = 100.0 * float(stats.pearsonr(sim, gold).statistic)
    return out


def sts(encoder, sentences1: Sequence[str], sentences2: Sequence[str], gold_scores, *, batch_size: int = 64,
        show_progress: bool = False) -> dict[str, float]:
    """Encode both sides (each distinct sentence once) and score them with ``sts_scores``."""
    if len(sentences1) != len(sentences2):
        raise ValueError(f"sentences1 has {len(sentences1)} items but sentences2 has {len(sentences2)}")
    unique = list(dict.fromkeys([*sentences1, *sentences2]))
    emb = encoder.encode(unique, batch_size=batch_size, show_progress=show_progress)
    row = {s: i for i, s in enumerate(unique)}
    emb1 = emb[[row[s] for s in sentences1]]
    emb2 = emb[[row[s] for s in sentences2]]
    return sts_scores(emb1, emb2, gold_scores)

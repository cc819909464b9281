"""Zero-shot classification and cross-modal recall@1 when many items share a class.

Image-text evaluation on a labelled image set (digits, CIFAR, ImageNet prompts) scores a
retrieval by class, because captions built from templates repeat: "a photo of the digit three"
describes every 3, so "the right caption" of an image is any caption of its class. One function
covers the three figures CLIP-style papers report:

- zero-shot top-1: images vs class prototypes (`class_prototypes`: the mean of each class's
  L2-normalised template embeddings, renormalised, as CLIP builds its zero-shot classifier);
- image->text recall@1: images vs a pool of captions, a hit when the top caption's class is the
  image's class (pass caption ids as classes to require the exact caption instead);
- text->image recall@1: captions vs images, a hit when the top image is of the caption's class.

`top1_class_hits` returns one 0/1 score per query, so two systems can be compared query by query
with `embedjax.eval.significance`. Similarity is cosine; ties go to the lower key index (argmax).
"""
from __future__ import annotations

import numpy as np

__all__ = ["class_prototypes", "top1_class_hits"]


def _unit_rows(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    if np.any(norms == 0) or not np.all(np.isfinite(x)):
        raise ValueError(f"{name} has zero or non-finite rows; cosine similarity needs finite non-zero vectors")
    return x / norms


def class_prototypes(text_ctd) -> np.ndarray:
    """Per class, the mean of its templates' unit-normalised embeddings, renormalised:
    ``[C, T, D] -> float32 [C, D]`` (unit rows)."""
    text = np.asarray(text_ctd)
    if text.ndim != 3 or 0 in text.shape:
        raise ValueError(f"text_ctd has shape {text.shape}; give [classes, templates, dim] embeddings")
    return _unit_rows(_unit_rows(text, "text_ctd").mean(axis=1), "the template means").astype(np.float32)


def top1_class_hits(queries_qd, keys_kd, query_class_q, key_class_k) -> np.ndarray:
    """float64 [Q] 1.0 where the key most cosine-similar to query i has ``query_class_q[i]``'s
    class, else 0.0 (ties: the lower key index). Classes are any hashable integers; pass
    item ids to require the exact item."""
    q = _unit_rows(queries_qd, "queries_qd")
    k = _unit_rows(keys_kd, "keys_kd")
    query_class = np.asarray(query_class_q)
    key_class = np.asarray(key_class_k)
    if q.ndim != 2 or k.ndim != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"queries {q.shape} and keys {k.shape} must be [Q, D] and [K, D] with the same D")
    if query_class.shape != (q.shape[0],) or key_class.shape != (k.shape[0],):
        raise ValueError(f"query_class_q {query_class.shape} and key_class_k {key_class.shape} need one class per "
                         f"query ({q.shape[0]}) and per key ({k.shape[0]})")
    best_q = np.argmax(q @ k.T, axis=1)
    return (key_class[best_q] == query_class).astype(np.float64)

"""Clustered synthetic token sets (MUVERA-style checks) shared by the multi-vector tests."""
import numpy as np


def clustered(rng, n_docs, n_queries, dim=64, doc_tokens=32, query_tokens=8, centres=512, noise=0.25):
    """Documents are token sets around shared cluster centres; a query is a noisy subset of one
    document's tokens."""
    c = rng.standard_normal((centres, dim))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    docs = c[rng.integers(0, centres, (n_docs, doc_tokens))] + noise * rng.standard_normal((n_docs, doc_tokens, dim)) / np.sqrt(dim)
    src = rng.integers(0, n_docs, n_queries)
    pick = np.stack([rng.choice(doc_tokens, query_tokens, replace=False) for _ in range(n_queries)])
    queries = docs[src[:, None], pick] + noise * rng.standard_normal((n_queries, query_tokens, dim)) / np.sqrt(dim)
    unit = lambda a: (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)
    return unit(queries), unit(docs)

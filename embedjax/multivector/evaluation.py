"""Retrieval evaluation of multi-vector (late-interaction) encoders: exact MaxSim search, or
MUVERA FDE candidates re-ranked by exact MaxSim, scored with the library's metrics and tie order
(`embedjax.eval.metrics`)."""
from __future__ import annotations

import functools
from typing import Iterable, Sequence

import jax
import numpy as np

from embedjax.eval.metrics import retrieval_metrics, tie_order
from embedjax.kernels.topk import check_k, chunked_topk
from embedjax.multivector.maxsim import maxsim


def _maxsim_chunk(q_args, x_args):
    (q, q_mask), (x, x_mask) = q_args, x_args
    return maxsim(q, q_mask, x, x_mask)


@functools.partial(jax.jit, static_argnames=("k", "chunk_size"))
def _exact_topk(q, q_mask, x, x_mask, k, chunk_size):
    return chunked_topk(_maxsim_chunk, (q, q_mask), (x, x_mask), k, chunk_size=chunk_size)


def maxsim_search(q_tokens_qld, q_mask_ql, d_tokens_nld, d_mask_nl, k: int, *, query_batch: int = 32,
                  chunk_size: int = 64):
    """Exact MaxSim top-k ``(scores float32 [Q, k], ids int32 [Q, k])`` numpy, ties -> smaller id.

    Memory per step is query_batch * chunk_size * Lq * Ld floats (the token similarities)."""
    check_k(k, len(d_tokens_nld), what="corpus")
    out_s, out_i = [], []
    for start in range(0, len(q_tokens_qld), query_batch):
        s, i = _exact_topk(np.asarray(q_tokens_qld[start:start + query_batch], np.float32),
                           np.asarray(q_mask_ql[start:start + query_batch], bool), d_tokens_nld, d_mask_nl, k,
                           min(chunk_size, len(d_tokens_nld)))
        out_s.append(np.asarray(s))
        out_i.append(np.asarray(i))
    return np.concatenate(out_s), np.concatenate(out_i)


def retrieval(encoder, corpus, queries, qrels, k_values: Iterable[int] = (1, 10, 100), *, batch_size: int = 64,
              fde: dict | None = None, candidates: int = 100, show_progress: bool = False,
              per_query: bool = False) -> dict:
    """Encode queries and corpus as token vectors and evaluate retrieval (metrics x100).

    Exact MaxSim over the whole corpus by default; with ``fde`` (``MultiVectorIndex.build``
    keywords, e.g. ``{"reps": 20, "k_sim": 5, "d_proj": 16, "quantization": "int8"}``) the FDE
    first stage proposes ``candidates`` documents per query and exact MaxSim re-ranks them."""
    from embedjax.eval.retrieval import document_text

    k_values = sorted({int(k) for k in k_values})
    judged = [q for q in queries if any(g > 0 for g in qrels.get(q, {}).values())]
    if not judged:
        raise ValueError("no query in `queries` has a relevant document in `qrels`: check the ids match")
    doc_ids = list(corpus)
    order = tie_order(doc_ids)  # searched in this order, "ties -> smaller index" is the library's tie rule
    ids_sorted: Sequence[str] = [doc_ids[j] for j in order]
    q_tok, q_mask = encoder.encode_query([queries[q] for q in judged], batch_size=batch_size,
                                         show_progress=show_progress)
    d_tok, d_mask = encoder.encode_document([document_text(corpus[d]) for d in ids_sorted], batch_size=batch_size,
                                            show_progress=show_progress)
    depth = min(k_values[-1], len(doc_ids))
    if fde is None:
        scores, idx = maxsim_search(q_tok, q_mask, d_tok, d_mask, depth)
    else:
        from embedjax.multivector.index import MultiVectorIndex

        index = MultiVectorIndex.build(d_tok, d_mask, **fde)
        scores, idx = index.search(q_tok, q_mask, depth, candidates=max(depth, min(candidates, len(doc_ids))))
    run = {qid: {ids_sorted[j]: float(s) for s, j in zip(scores[i], idx[i]) if j >= 0} for i, qid in enumerate(judged)}
    return retrieval_metrics(run, qrels, k_values, per_query=per_query)

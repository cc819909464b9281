"""Dense retrieval evaluation: embed queries and corpus, search, score with trec_eval conventions."""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

from embedjax.eval.metrics import retrieval_metrics, tie_order
from embedjax.index.exact import exact_search


def document_text(doc: Mapping[str, str] | str) -> str:
    """``title + " " + text`` when the document has a title, else its text."""
    if isinstance(doc, str):
        return doc
    title = (doc.get("title") or "").strip()
    return f"{title} {doc['text']}" if title else doc["text"]


def search(q_qd: np.ndarray, d_nd: np.ndarray, k: int, *, quantization: str | None = None,
           dims: int | None = None, chunk_size: int = 16384):
    """Top-k (scores [Q, k], doc indices [Q, k]) with optional compression and Matryoshka truncation.

    Plain float search is exact and chunked; compressed settings go through
    ``embedjax.index.search_embeddings``.
    """
    if quantization in (None, "float32") and dims is None:
        return exact_search(q_qd, d_nd, k, chunk_size=chunk_size)
    from embedjax.index import search_embeddings

    return search_embeddings(q_qd, d_nd, k, quantization=quantization, dims=dims)


def retrieval_from_embeddings(q_emb, d_emb, query_ids: Sequence[str], doc_ids: Sequence[str], qrels,
                              k_values: Iterable[int] = (1, 10, 100), *, quantization: str | None = None,
                              dims: int | None = None, per_query: bool = False) -> dict:
    """Metrics x100 from precomputed embeddings [Q, D] and [N, D] (rows aligned with the id lists).

    Ties follow the library's one rule (score, then document id, descending; see
    ``eval.metrics``), and each cutoff's metrics are those of a search for exactly that
    cutoff: one search to the deepest cutoff serves them all when the search is
    prefix-consistent, and two-stage settings (``binary+rescore``: a deeper first stage,
    then rescoring) search once per distinct cutoff.
    """
    k_values = sorted({int(k) for k in k_values})
    if not k_values or k_values[0] < 1:
        raise ValueError(f"k_values={k_values} must be positive integers")
    if len(query_ids) != q_emb.shape[0] or len(doc_ids) != d_emb.shape[0]:
        raise ValueError(f"{len(query_ids)} query ids / {len(doc_ids)} doc ids do not match embeddings "
                         f"{q_emb.shape} / {d_emb.shape}")
    from embedjax.index.compressed import depth_dependent

    order = tie_order(doc_ids)
    d_sorted = np.asarray(d_emb)[order]
    ids_sorted = [doc_ids[j] for j in order]

    def run_at(depth: int) -> dict:
        scores, idx = search(q_emb, d_sorted, min(depth, len(doc_ids)), quantization=quantization, dims=dims)
        return {qid: {ids_sorted[j]: float(s) for s, j in zip(scores[i], idx[i])} for i, qid in enumerate(query_ids)}

    if not depth_dependent(quantization):
        return retrieval_metrics(run_at(k_values[-1]), qrels, k_values, per_query=per_query)
    out: dict = {}
    for k in k_values:
        part = retrieval_metrics(run_at(k), qrels, (k,), per_query=per_query)
        for name, value in part.items():
            if name == "per_query":
                out.setdefault("per_query", {}).update(value)
            else:
                out[name] = value
    return out


def retrieval(encoder, corpus, queries, qrels, k_values: Iterable[int] = (1, 10, 100), *,
              quantization: str | None = None, dims: int | None = None, batch_size: int = 64,
              query_prompt: str | None = None, document_prompt: str | None = None,
              show_progress: bool = False, per_query: bool = False, hubness_correction: str | None = None,
              query_bank: Sequence[str] | None = None, hubness_temperature: float = 0.05,
              hubness_dynamic: bool = False) -> dict:
    """Embed queries and corpus with ``encoder`` and evaluate retrieval (metrics x100).

    Args:
        corpus: ``{doc_id: {"title", "text"}}`` (or ``{doc_id: text}``), as ``read_beir`` returns.
        queries: ``{query_id: text}``; only queries with judgements are embedded.
        qrels: ``{query_id: {doc_id: grade}}``.
        quantization: None/"float32", or a compressed setting (``"int8"``, ``"binary+rescore"``, ...).
        dims: Matryoshka truncation of the embeddings before search.
        hubness_correction: None, or ``"inverted_softmax"`` (QB-Norm query-bank normalisation):
            each document's scores are divided by its softmax mass over ``query_bank`` (reference
            query texts, never the test queries) at ``hubness_temperature``; see
            ``embedjax.eval.querybank``.
    """
    from embedjax.models.heads import head_output

    if head_output(getattr(encoder, "head", None)) == "tokens":
        if quantization not in (None, "float32") or dims or hubness_correction or query_prompt or document_prompt:
            raise ValueError("a multi-vector encoder is evaluated by MaxSim (embedjax.multivector.evaluation."
                             "retrieval for FDE candidates); quantization, dims, prompts and hubness correction "
                             "apply to single-vector encoders")
        from embedjax.multivector.evaluation import retrieval as token_retrieval

        return token_retrieval(encoder, corpus, queries, qrels, k_values, batch_size=batch_size,
                               show_progress=show_progress, per_query=per_query)
    if hubness_correction not in (None, "inverted_softmax"):
        raise ValueError(f"hubness_correction={hubness_correction!r}; use None or 'inverted_softmax'")
    if hubness_correction and not query_bank:
        raise ValueError("hubness_correction='inverted_softmax' needs query_bank: a list of reference query texts")
    if hubness_correction and (quantization not in (None, "float32") or dims is not None):
        raise ValueError("hubness_correction works on float32 full-dimension scores; drop quantization/dims")
    judged = [q for q in queries if any(g > 0 for g in qrels.get(q, {}).values())]
    if not judged:
        raise ValueError("no query in `queries` has a relevant document in `qrels`: check the ids match")
    if not corpus:
        raise ValueError("the corpus is empty")
    doc_ids = list(corpus)
    q_emb = encoder.encode([queries[q] for q in judged], batch_size=batch_size, prompt=query_prompt,
                           show_progress=show_progress)
    d_emb = encoder.encode([document_text(corpus[d]) for d in doc_ids], batch_size=batch_size,
                           prompt=document_prompt, show_progress=show_progress)
    if hubness_correction:
        from embedjax.eval.querybank import querybank_retrieval_from_embeddings

        bank_emb = encoder.encode(list(query_bank), batch_size=batch_size, prompt=query_prompt)
        return querybank_retrieval_from_embeddings(q_emb, d_emb, bank_emb, judged, doc_ids, qrels, k_values,
                                                   temperature=hubness_temperature, dynamic=hubness_dynamic,
                                                   per_query=per_query)
    return retrieval_from_embeddings(q_emb, d_emb, judged, doc_ids, qrels, k_values, quantization=quantization,
                                     dims=dims, per_query=per_query)

"""Ranking metrics following trec_eval's conventions.

- nDCG@k uses linear gains (``rel``) and log2(rank + 1) discounts; the ideal ranking
  sorts all judged relevance grades of the query.
- recall@k, MRR@k and MAP@k count a document as relevant when its grade is > 0; MAP@k
  divides by the number of relevant documents (not by min(k, R)), as ``map_cut`` does.
- Queries without any relevant document are left out (trec_eval's default).

Tie order, the one rule of the whole library: score descending, then document id descending
(trec_eval's order; ids compare as strings). The metrics here sort by it, and every search that
feeds them returns candidates in it: ``eval.retrieval`` permutes the corpus into descending-id
order (``tie_order``) before searching, so the search kernels' "ties -> smaller index" rule
picks the larger id. A metric at cutoff k is therefore the same whatever other cutoffs are
requested; two-stage searches (``binary+rescore``) run once per cutoff, so that cutoff k sees
exactly the candidates of a search for k.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import numpy as np

Run = Mapping[str, Mapping[str, float]]
Qrels = Mapping[str, Mapping[str, int]]


def tie_order(doc_ids: Sequence[str]) -> np.ndarray:
    """Permutation int64 [N] putting ``doc_ids`` in descending id order.

    A corpus searched in this order with "ties -> smaller index" returns ties by id
    descending, the order ``rank_documents`` uses.
    """
    return np.asarray(sorted(range(len(doc_ids)), key=doc_ids.__getitem__, reverse=True), dtype=np.int64)


def rank_documents(doc_scores: Mapping[str, float]) -> list[str]:
    """Document ids best first: score descending, ties by id descending (as trec_eval sorts)."""
    return [d for d, _ in sorted(doc_scores.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)]


def query_metrics(ranked: list[str], judged: Mapping[str, int], k_values: Iterable[int]) -> dict[str, float]:
    """All metrics of one query at every cutoff k (x1, not x100)."""
    relevant = {d for d, g in judged.items() if g > 0}
    ideal = sorted((g for g in judged.values() if g > 0), reverse=True)
    out = {}
    for k in k_values:
        top = ranked[:k]
        dcg = sum(judged.get(d, 0) / math.log2(i + 2) for i, d in enumerate(top) if judged.get(d, 0) > 0)
        idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal[:k]))
        hits = [i for i, d in enumerate(top) if d in relevant]
        out[f"ndcg@{k}"] = dcg / idcg if idcg > 0 else 0.0
        out[f"recall@{k}"] = len(hits) / len(relevant)
        out[f"mrr@{k}"] = 1.0 / (hits[0] + 1) if hits else 0.0
        out[f"map@{k}"] = sum((j + 1) / (i + 1) for j, i in enumerate(hits)) / len(relevant)
        out[f"precision@{k}"] = len(hits) / k
    return out


def retrieval_metrics(run: Run, qrels: Qrels, k_values: Iterable[int] = (1, 10, 100),
                      per_query: bool = False) -> dict:
    """Mean of each metric x100 over the queries that have at least one relevant document.

    Args:
        run: ``{query_id: {doc_id: score}}`` (the retrieved candidates with their scores).
        qrels: ``{query_id: {doc_id: grade}}``.
        per_query: also return ``"per_query": {metric: {query_id: value x100}}``.
    """
    k_values = sorted(set(int(k) for k in k_values))
    if not k_values or k_values[0] < 1:
        raise ValueError(f"k_values={k_values} must be positive integers")
    judged_queries = [q for q, docs in qrels.items() if any(g > 0 for g in docs.values())]
    if not judged_queries:
        raise ValueError("qrels hold no query with a relevant (grade > 0) document")
    table: dict[str, dict[str, float]] = {}
    for qid in judged_queries:
        ranked = rank_documents(run.get(qid, {}))
        for name, value in query_metrics(ranked, qrels[qid], k_values).items():
            table.setdefault(name, {})[qid] = 100.0 * value
    out: dict = {name: sum(v.values()) / len(v) for name, v in table.items()}
    out["num_queries"] = len(judged_queries)
    if per_query:
        out["per_query"] = table
    return out

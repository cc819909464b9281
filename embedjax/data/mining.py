"""Offline hard-negative mining: embed a corpus, keep the top-ranked non-positives.

For each judged (query, positive) pair, the corpus is ranked by the query's
similarity with a model; candidates are taken best first, skipping

- every judged positive of the query (never a negative, whatever its grade),
- the first ``skip_top`` remaining candidates (the very top non-positives are often
  unjudged positives),
- any candidate scoring at or above ``max_relative_score`` x the positive's score
  (the "TopK-PercPos" false-negative filter of NV-Retriever, Moreira et al. 2024),

and the first ``num_negatives`` survivors are the pair's hard negatives. Pairs with
fewer survivors within the search depth are dropped (and counted), so every written
example has exactly ``num_negatives`` negatives. The result is written as the
generic pairs JSONL that the ``jsonl`` training source reads
(`embedjax.data.builders`), with a provenance sidecar ``<out>.meta.json`` naming the
dataset split it was mined from, so the training leak check (`embedjax.data.splits`)
sees through the file. Mine the split you train on (the default ``--split train``):

    python -m embedjax.data.mining --model minilm --beir scifact --split train \
        --out runs/mined/scifact-train-1neg.jsonl --num-negatives 1
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
from typing import Sequence

import numpy as np


def select_hard_negatives(
    ranked_ids_k: np.ndarray,
    ranked_scores_k: np.ndarray,
    positive_ids: set[int],
    positive_score: float,
    *,
    num_negatives: int,
    skip_top: int = 0,
    max_relative_score: float | None = None,
) -> list[int]:
    """The hard negatives of one (query, positive) pair from the query's ranking (best first).

    ``positive_score`` is the query's similarity to this pair's positive; a candidate
    is refused when its score >= ``max_relative_score * positive_score``.
    """
    chosen: list[int] = []
    skipped = 0
    ceiling = None if max_relative_score is None else max_relative_score * positive_score
    for doc, score in zip(ranked_ids_k.tolist(), ranked_scores_k.tolist()):
        if doc in positive_ids:
            continue
        if skipped < skip_top:
            skipped += 1
            continue
        if ceiling is not None and score >= ceiling:
            continue
        chosen.append(doc)
        if len(chosen) == num_negatives:
            break
    return chosen


def mine(
    q_emb_qd: np.ndarray,
    d_emb_nd: np.ndarray,
    pairs: Sequence[tuple[int, int]],
    positives_of_query: dict[int, set[int]],
    *,
    num_negatives: int,
    skip_top: int = 0,
    max_relative_score: float | None = 0.95,
    depth: int = 100,
) -> tuple[list[tuple[int, int, list[int]]], int]:
    """Mine negatives for (query row, document row) ``pairs``.

    Returns ``([(query, positive, negatives)], dropped)`` where ``dropped`` counts pairs
    left with fewer than ``num_negatives`` negatives within the top ``depth``.
    """
    from embedjax.index.exact import exact_search

    if num_negatives < 1 or skip_top < 0 or depth < 1:
        raise ValueError(f"num_negatives={num_negatives} must be >= 1, skip_top={skip_top} >= 0, depth={depth} >= 1")
    if max_relative_score is not None and max_relative_score <= 0:
        raise ValueError(f"max_relative_score={max_relative_score} must be positive (or None for no ceiling)")
    queries = sorted({q for q, _ in pairs})
    row_of = {q: i for i, q in enumerate(queries)}
    k = min(depth, d_emb_nd.shape[0])
    scores_qk, ids_qk = exact_search(np.asarray(q_emb_qd)[queries], np.asarray(d_emb_nd), k)
    scores_qk, ids_qk = np.asarray(scores_qk), np.asarray(ids_qk)
    out, dropped = [], 0
    for q, p in pairs:
        positive_score = float(np.dot(q_emb_qd[q], d_emb_nd[p]))
        negatives = select_hard_negatives(
            ids_qk[row_of[q]], scores_qk[row_of[q]], positives_of_query[q], positive_score,
            num_negatives=num_negatives, skip_top=skip_top, max_relative_score=max_relative_score,
        )
        if len(negatives) < num_negatives:
            dropped += 1
        else:
            out.append((q, p, negatives))
    return out, dropped


def mine_beir(
    encoder,
    folder: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    split: str = "train",
    min_relevance: int = 1,
    num_negatives: int = 3,
    skip_top: int = 0,
    max_relative_score: float | None = 0.95,
    depth: int = 100,
    max_queries: int = 0,
    batch_size: int = 64,
    show_progress: bool = False,
) -> dict:
    """Mine a BEIR folder's ``split`` with ``encoder``; write the training JSONL and its provenance
    sidecar (`embedjax.data.splits.write_provenance`); returns counts."""
    from embedjax.data.readers import read_beir
    from embedjax.data.splits import SplitRef, resolve_beir_split, write_provenance
    from embedjax.eval.retrieval import document_text

    resolved, split = resolve_beir_split(str(folder), split, "mining")
    corpus, queries, qrels = read_beir(resolved, split=split)
    doc_ids = list(corpus)
    doc_row = {d: i for i, d in enumerate(doc_ids)}
    query_ids = [q for q in sorted(qrels) if q in queries]
    if max_queries > 0:
        query_ids = query_ids[:max_queries]
    if not query_ids:
        raise ValueError(f"BEIR folder {folder!s} has no judged queries to mine for")
    positives = {i: {doc_row[d] for d, g in qrels[q].items() if d in doc_row and g >= min_relevance}
                 for i, q in enumerate(query_ids)}
    # Every judged document is excluded from the negatives, whatever its grade.
    judged = {i: {doc_row[d] for d in qrels[q] if d in doc_row} for i, q in enumerate(query_ids)}
    pairs = [(i, p) for i in range(len(query_ids)) for p in sorted(positives[i])]
    doc_texts = [document_text(corpus[d]) for d in doc_ids]
    d_emb = encoder.encode(doc_texts, batch_size=batch_size, show_progress=show_progress)
    q_emb = encoder.encode([queries[q] for q in query_ids], batch_size=batch_size, show_progress=show_progress)
    mined, dropped = mine(q_emb, d_emb, pairs, judged, num_negatives=num_negatives, skip_top=skip_top,
                          max_relative_score=max_relative_score, depth=depth)
    out_path = pathlib.Path(out_path)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for q, p, negatives in mined:
            f.write(json.dumps({
                "query": queries[query_ids[q]],
                "positive": doc_texts[p],
                "negatives": [doc_texts[n] for n in negatives],
                "query_id": query_ids[q],
                "positive_id": doc_ids[p],
                "negative_ids": [doc_ids[n] for n in negatives],
            }) + "\n")
    os.replace(tmp, out_path)  # written whole or not at all
    counts = {"written": len(mined), "dropped": dropped, "queries": len(query_ids)}
    settings = {"num_negatives": num_negatives, "skip_top": skip_top, "max_relative_score": max_relative_score,
                "depth": depth, "max_queries": max_queries, "min_relevance": min_relevance}
    meta = write_provenance(out_path, [SplitRef(resolved.resolve().name, split)], tool="embedjax.data.mining",
                            model=str(getattr(encoder, "source", "")), settings=settings, counts=counts)
    return {**counts, "out": str(out_path), "provenance": str(meta)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m embedjax.data.mining", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="minilm", help="model folder (or 'minilm') that ranks the corpus")
    parser.add_argument("--beir", required=True, help="BEIR folder (path, or relative to EMBEDJAX_DATA_DIR)")
    parser.add_argument("--out", required=True, help="JSONL file to write (the jsonl training source)")
    parser.add_argument("--split", default="train",
                        help="qrels split to mine (train: mining an evaluation split makes a training leak)")
    parser.add_argument("--num-negatives", type=int, default=3)
    parser.add_argument("--skip-top", type=int, default=0)
    parser.add_argument("--max-relative-score", type=float, default=0.95, help="<= 0 turns the ceiling off")
    parser.add_argument("--depth", type=int, default=100)
    parser.add_argument("--max-queries", type=int, default=0)
    args = parser.parse_args(argv)
    from embedjax.encoder import Encoder

    encoder = Encoder.from_pretrained(args.model)
    ceiling = args.max_relative_score if args.max_relative_score > 0 else None
    return mine_beir(encoder, args.beir, args.out, split=args.split, num_negatives=args.num_negatives,
                     skip_top=args.skip_top, max_relative_score=ceiling, depth=args.depth,
                     max_queries=args.max_queries, show_progress=True)


if __name__ == "__main__":
    print(json.dumps(main()))

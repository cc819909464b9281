"""Evaluations run by the train loop: STS correlation and BEIR retrieval of the current params.

They reuse the library's `Encoder` (the same bucketed, jitted inference path users
call) with the training parameters swapped in, and the library's metric functions,
so a score logged during training is exactly what ``python -m embedjax eval`` would
report for the exported model.

Test sets (``eval.sts_test``, BEIR test splits and evaluation-only sets such as msmarco) are
scored only before and after training, never in between, so no schedule selects on them;
other BEIR splits (``nfcorpus:dev``) are scored on the ``eval.every_steps`` schedule too.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Mapping

from embedjax.data.builders import resolve_source
from embedjax.data.readers import read_beir, read_sts
from embedjax.data.splits import is_evaluation_only, parse_eval_sets
from embedjax.eval.retrieval import retrieval
from embedjax.eval.sts import sts


def query_subset(qrels: Mapping[str, Mapping[str, int]], max_queries: int) -> dict:
    """The judged queries (a grade > 0) with the ``max_queries`` smallest sha1 of their ids, and their qrels.

    The subset depends only on the ids, so every run (and every model) is scored on the same queries.
    """
    judged = [q for q, docs in qrels.items() if any(g > 0 for g in docs.values())]
    keep = sorted(judged, key=lambda q: hashlib.sha1(q.encode("utf-8")).hexdigest())[:max_queries]
    return {q: dict(qrels[q]) for q in sorted(keep)}


class Evaluators:
    """Named evaluation sets, read once; ``run(params, names)`` -> flat ``{"sts-dev/spearman_cosine": ...}``.

    Args:
        sts_dev / sts_test: STS files ("" = none); the test file is a test set.
        beir: BEIR sets in the ``eval.beir`` grammar (`embedjax.data.splits.parse_eval_sets`).
        max_queries: > 0 scores each BEIR set on `query_subset` of that many queries; the set's
            name then ends in ``-q<N>``.
    """

    def __init__(self, encoder, *, sts_dev: str = "", sts_test: str = "", beir: str = "", max_queries: int = 0,
                 batch_size: int = 64):
        if max_queries < 0:
            raise ValueError(f"eval.max_queries={max_queries} must be >= 0 (0 = every judged query)")
        self.encoder = encoder
        self.batch_size = batch_size
        self.sets: dict[str, tuple] = {}
        self.test_names: set[str] = set()
        for path, is_test in ((sts_dev, False), (sts_test, True)):
            if path:
                name = pathlib.Path(path).stem  # e.g. "sts-dev", "sts-test"
                self.sets[name] = ("sts", read_sts(resolve_source(path)))
                if is_test:
                    self.test_names.add(name)
        for entry in parse_eval_sets(beir) if beir else []:
            corpus, queries, qrels = read_beir(resolve_source(entry.path), split=entry.split)
            name = entry.name
            if max_queries and sum(any(g > 0 for g in d.values()) for d in qrels.values()) > max_queries:
                qrels, name = query_subset(qrels, max_queries), f"{name}-q{max_queries}"
            self.sets[name] = ("beir", (corpus, queries, qrels))
            if entry.split == "test" or is_evaluation_only(entry.ref):
                self.test_names.add(name)

    def names(self, *, include_test: bool = True) -> list[str]:
        """The sets to evaluate; test sets only before and after training, never in between."""
        return [n for n in self.sets if include_test or n not in self.test_names]

    def run(self, params, names=None, *, per_query_file: str | os.PathLike | None = None) -> dict[str, float]:
        """Evaluate ``params`` on the named sets; the encoder places them (sharded on its mesh).

        ``per_query_file``: also write each BEIR set's per-query scores there, as
        ``{"<set>/<metric>": {query_id: score x100}}`` (the layout `embedjax.results` reads).
        """
        self.encoder.params = params
        out: dict[str, float] = {}
        per_query: dict[str, dict] = {}
        for name in self.names() if names is None else names:
            kind, payload = self.sets[name]
            if kind == "sts":
                s1, s2, gold = payload
                scores = sts(self.encoder, s1, s2, gold, batch_size=self.batch_size)
            else:
                corpus, queries, qrels = payload
                scores = retrieval(self.encoder, corpus, queries, qrels, k_values=(1, 10, 100),
                                   batch_size=self.batch_size, per_query=True)
                per_query.update({f"{name}/{metric}": table for metric, table in scores.pop("per_query").items()})
            out.update({f"{name}/{metric}": float(value) for metric, value in scores.items()})
        if per_query_file is not None and per_query:
            path = pathlib.Path(per_query_file)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(json.dumps(per_query))
            os.replace(tmp, path)
        return out

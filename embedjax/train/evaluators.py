"""Evaluations run by the train loop: STS correlation and BEIR retrieval of the current params.

They reuse the library's `Encoder` (the same bucketed, jitted inference path users
call) with the training parameters swapped in, and the library's metric functions,
so a score logged during training is exactly what ``python -m embedjax eval`` would
report for the exported model.
"""
from __future__ import annotations

import pathlib

from embedjax.data.builders import resolve_source
from embedjax.data.readers import read_beir, read_sts
from embedjax.eval.retrieval import retrieval
from embedjax.eval.sts import sts


class Evaluators:
    """Named evaluation sets, read once; ``run(params, names)`` -> flat ``{"sts-dev/spearman_cosine": ...}``."""

    def __init__(self, encoder, *, sts_dev: str = "", sts_test: str = "", beir: str = "",
                 beir_split: str = "test", batch_size: int = 64):
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
        if beir:
            self.sets[f"{pathlib.Path(beir).name}-{beir_split}"] = (
                "beir", read_beir(resolve_source(beir), split=beir_split))

    def names(self, *, include_test: bool = True) -> list[str]:
        """The sets to evaluate; test sets only before and after training, never in between."""
        return [n for n in self.sets if include_test or n not in self.test_names]

    def run(self, params, names=None) -> dict[str, float]:
        """Evaluate ``params`` on the named sets; the encoder places them (sharded on its mesh)."""
        self.encoder.params = params
        out: dict[str, float] = {}
        for name in self.names() if names is None else names:
            kind, payload = self.sets[name]
            if kind == "sts":
                s1, s2, gold = payload
                scores = sts(self.encoder, s1, s2, gold, batch_size=self.batch_size)
            else:
                corpus, queries, qrels = payload
                scores = retrieval(self.encoder, corpus, queries, qrels, k_values=(1, 10, 100))
            out.update({f"{name}/{metric}": float(value) for metric, value in scores.items()})
        return out

"""The train loop's evaluation sets (several BEIR splits, a query limit, per-query scores) and its leak
check: refused before the workdir exists, or let through by data.allow_eval_overlap and recorded."""
import hashlib
import json
import zlib

import numpy as np
import pytest

from embedjax import results
from embedjax.data.readers import read_beir
from embedjax.data.splits import EvaluationLeakError
from embedjax.eval.retrieval import retrieval
from embedjax.eval.significance import paired_permutation_test
from embedjax.train.evaluators import Evaluators, query_subset
from train_runs import tiny_config


class _BagOfWordsEncoder:
    """A deterministic stand-in for a model: hashed bag-of-words vectors (real retrieval, no compile)."""

    params = {}

    def encode(self, texts, batch_size=64, prompt=None, show_progress=False):
        x = np.zeros((len(texts), 64), np.float32)
        for i, text in enumerate(texts):
            for word in text.lower().split():
                x[i, zlib.crc32(word.encode()) % 64] += 1.0
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-9)


def test_several_beir_splits_with_a_query_limit_and_per_query_scores(data_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("EMBEDJAX_DATA_DIR", str(data_dir))
    encoder = _BagOfWordsEncoder()
    ev = Evaluators(encoder, beir="nfcorpus:test,nfcorpus:dev,limit-small", max_queries=40)
    assert list(ev.sets) == ["nfcorpus-test-q40", "nfcorpus-dev-q40", "limit-small-test-q40"]
    # test splits and evaluation-only sets never run between the start and the end of training
    assert ev.names(include_test=False) == ["nfcorpus-dev-q40"]
    out = ev.run({}, ["nfcorpus-dev-q40"], per_query_file=tmp_path / "pq.json")
    corpus, queries, qrels = read_beir(data_dir / "nfcorpus", split="dev")
    subset = query_subset(qrels, 40)
    judged = sorted(q for q, d in qrels.items() if any(g > 0 for g in d.values()))
    by_hash = sorted(judged, key=lambda q: hashlib.sha1(q.encode()).hexdigest())
    assert sorted(subset) == sorted(by_hash[:40]) != judged[:40]
    expected = retrieval(encoder, corpus, queries, subset, k_values=(1, 10, 100), per_query=True)
    assert out["nfcorpus-dev-q40/ndcg@10"] == pytest.approx(expected["ndcg@10"], abs=1e-9)
    assert out["nfcorpus-dev-q40/num_queries"] == 40
    stored = json.loads((tmp_path / "pq.json").read_text())
    assert stored["nfcorpus-dev-q40/ndcg@10"] == pytest.approx(expected["per_query"]["ndcg@10"])
    assert list(Evaluators(encoder, beir="limit-small", max_queries=5000).sets) == ["limit-small-test"]  # no cut
    with pytest.raises(ValueError, match="eval.max_queries=-1"):
        Evaluators(encoder, beir="limit-small", max_queries=-1)


def test_leaking_configs_are_refused_before_the_workdir_exists(tmp_path, tfds_cache):
    from embedjax.train.loop import train

    workdir = tmp_path / "w"
    with pytest.raises(EvaluationLeakError, match=r"'beir:scifact:test' is the evaluation set eval.beir scifact:test"):
        train(tiny_config("data.train=beir:scifact:test", "eval.beir=scifact:test", f"data.cache_dir={tfds_cache}"),
              workdir)
    with pytest.raises(EvaluationLeakError, match="msmarco:test, which is evaluation-only"):
        train(tiny_config("data.train=beir:msmarco", f"data.cache_dir={tfds_cache}"), workdir)
    with pytest.raises(EvaluationLeakError, match=r"'sts:stsb/sts-dev.csv' is the evaluation set eval.sts"):
        train(tiny_config("data.train=sts:stsb/sts-dev.csv", "eval.sts=stsb/sts-dev.csv", "train.loss=cosent",
                          "train.ring=False", f"data.cache_dir={tfds_cache}"), workdir)
    assert not workdir.exists()


@pytest.mark.slow  # a real (tiny) training run: ~12 compiles, 2-3 min on the shared 2 cores under load 16
def test_allowed_overlap_runs_records_it_and_tests_before_against_after(tmp_path, tfds_cache):
    """A 2-step tiny run trained on limit-small and scored on 50 of its queries before and after."""
    from embedjax.train.loop import train

    workdir = tmp_path / "overlap"
    summary = train(tiny_config("data.train=beir:limit-small", "data.allow_eval_overlap=True", "eval.beir=limit-small",
                                "eval.max_queries=50", "eval.at_start=True", "train.num_steps=2", "optim.warmup_steps=1",
                                "train.ring=False", "train.matryoshka_dims=()",
                                "mesh.num_devices=1",
                                f"data.cache_dir={tfds_cache}"), workdir, log=lambda m: None)
    assert len(summary["eval_overlap"]) == 2  # the evaluated set itself, and evaluation-only data
    assert all("limit-small:test" in o for o in summary["eval_overlap"])
    assert json.loads((workdir / "summary.json").read_text())["eval_overlap"] == summary["eval_overlap"]
    [row] = [r for r in results.before_after(workdir, num_samples=500) if r["set"] == "limit-small-test-q50"]
    before = json.loads((workdir / "evals" / "step_0.per_query.json").read_text())["limit-small-test-q50/ndcg@10"]
    after = json.loads((workdir / "evals" / "step_2.per_query.json").read_text())["limit-small-test-q50/ndcg@10"]
    assert len(before) == len(after) == row["num_queries"] == 50
    assert row["mean_a"] == pytest.approx(summary["eval_before"]["limit-small-test-q50/ndcg@10"], abs=1e-9)
    assert row["mean_b"] == pytest.approx(summary["eval_after"]["limit-small-test-q50/ndcg@10"], abs=1e-9)
    queries = sorted(before)
    expected = paired_permutation_test([before[q] for q in queries], [after[q] for q in queries], num_samples=500,
                                       seed=0)
    assert row["p_value"] == expected["p_value"] and row["mean_difference"] == expected["mean_difference"]
    # `results` reads the run's own final per-query scores, and refuses nothing the run allowed ...
    run = results.load_runs(tmp_path)[0]
    keys = results.ensure_per_query([run], None, [results.BASE_SETTING], "ndcg@10", compute=False)
    assert keys == ["limit-small-test-q50/ndcg@10"]
    # ... but will not score a run on data it trained on unless the run allowed it
    run["config"]["data.allow_eval_overlap"] = False
    with pytest.raises(EvaluationLeakError, match="would be scored on data it trained on"):
        results.ensure_per_query([run], "limit-small", [results.BASE_SETTING], "ndcg@10", compute=False)

"""experiments/retrieval_finetune/report.py on a synthetic run folder: before/after rows per test set with
the paired tests of `embedjax.results.before_after`, the mined file's provenance, per-query CSV, plot."""
import csv
import importlib.util
import json
import pathlib

import numpy as np
import pytest

from embedjax.data.splits import SplitRef, write_provenance
from embedjax.eval.significance import paired_permutation_test

REPO = pathlib.Path(__file__).resolve().parents[2]
SETS = {"scifact-test": 30, "nfcorpus-test": 25, "msmarco-test": 12}


def _report():
    spec = importlib.util.spec_from_file_location("rf_report", REPO / "experiments/retrieval_finetune/report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def run(tmp_path):
    """A finished run: step-0 and step-5 per-query evaluations; scifact improves by ~6, msmarco does not."""
    rng = np.random.default_rng(1)
    mined = tmp_path / "mined.jsonl"
    mined.write_text('{"query": "q", "positive": "p", "negatives": ["n"]}\n')
    write_provenance(mined, [SplitRef("scifact", "train")], counts={"written": 1}, settings={"depth": 100},
                     model="minilm", tool="embedjax.data.mining")
    workdir = tmp_path / "run"
    (workdir / "evals").mkdir(parents=True)
    before, after = {}, {}
    for name, n in SETS.items():
        for metric in ("ndcg@10", "recall@100"):
            base = rng.uniform(0, 100, n)
            shift = 6.0 if name == "scifact-test" else 0.0
            before[f"{name}/{metric}"] = {f"{name[0]}{i}": float(v) for i, v in enumerate(base)}
            after[f"{name}/{metric}"] = {f"{name[0]}{i}": float(v + shift + rng.normal(0, 3))
                                          for i, v in enumerate(base)}
        before[f"{name}/ndcg@1"] = after[f"{name}/ndcg@1"] = {"x": 1.0}  # a metric the report leaves out
    (workdir / "evals" / "step_0.per_query.json").write_text(json.dumps(before))
    (workdir / "evals" / "step_5.per_query.json").write_text(json.dumps(after))
    (workdir / "summary.json").write_text(json.dumps({"step": 5, "status": "completed", "final_loss": 0.5,
                                                      "devices": 1, "train_pairs_per_s": 2.0}))
    config = {"data": {"train": f"jsonl:{mined},triplets:nli/triplets.tsv", "num_negatives": 1},
              "train": {"loss": "infonce", "ring": True, "matryoshka_dims": [64, 128]}, "seed": 0}
    (workdir / "config.json").write_text(json.dumps(config))
    (workdir / "metrics.jsonl").write_text("\n".join(json.dumps({"step": s, "kind": "train", "loss": 2.0 - s / 5})
                                                     for s in range(1, 6)))
    return workdir, before, after


def test_report_pairs_before_and_after_per_set(run, tmp_path):
    workdir, before, after = run
    out = tmp_path / "out"
    out.mkdir()
    printed = _report().main(["--workdir", str(workdir), "--out", str(out)])
    report = json.loads((out / "summary.json").read_text())
    assert printed["rows"] == 6 and printed["per_query_rows"] == 2 * sum(SETS.values())
    assert [(r["metric"], r["set"]) for r in report["rows"]] == [
        (m, s) for m in ("ndcg@10", "recall@100") for s in ("scifact-test", "nfcorpus-test", "msmarco-test")]
    for row in report["rows"]:
        key = f"{row['set']}/{row['metric']}"
        queries = sorted(before[key])
        a, b = [before[key][q] for q in queries], [after[key][q] for q in queries]
        expected = paired_permutation_test(a, b, num_samples=10_000, seed=0)
        assert row["before"] == pytest.approx(np.mean(a)) and row["after"] == pytest.approx(np.mean(b))
        assert row["p_value"] == expected["p_value"] and row["num_queries"] == len(queries)
    scifact = report["rows"][0]
    assert scifact["difference"] > 3 and scifact["p_value"] < 0.01 and scifact["ci_low"] > 0
    assert report["training"] == {"steps": 5, "status": "completed", "final_loss": 0.5, "first_loss": 1.8,
                                  "train_pairs_per_s": 2.0, "devices": 1}
    assert report["mined"][0]["sources"] == [{"dataset": "scifact", "split": "train"}]
    assert report["settings"]["train.matryoshka_dims"] == [64, 128] and report["settings"]["train.ring"] is True
    assert "report.py --workdir" in report["command"] and "retrieval_infonce.py:mined" in report["train_command"]
    with open(out / "per_query.csv") as f:
        rows = list(csv.DictReader(f))
    first = next(r for r in rows if r["set"] == "scifact-test" and r["metric"] == "ndcg@10" and r["query_id"] == "s0")
    assert float(first["before"]) == before["scifact-test/ndcg@10"]["s0"]
    assert float(first["after"]) == after["scifact-test/ndcg@10"]["s0"]
    assert (out / "ndcg10_before_after.png").stat().st_size > 1000
    table = (out / "table.md").read_text().splitlines()[2:]
    assert len(table) == 6 and table[0].startswith(f"| scifact-test | ndcg@10 | {scifact['before']:.2f} | ")
    assert table[5].endswith("| [json](summary.json#/rows/5) |")


def test_report_refuses_a_mined_file_changed_after_mining(run, tmp_path):
    workdir, _, _ = run
    (tmp_path / "mined.jsonl").write_text("edited\n")
    with pytest.raises(ValueError, match="sha256 differs"):
        _report().main(["--workdir", str(workdir), "--out", str(tmp_path)])

"""The table-compression report on a synthetic sweep: grouping by family, paired tests against the
full table, the multiplexing comparison, the Pareto front, infeasible budgets, and the README blocks."""
import importlib.util
import json
import pathlib

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
VOCAB = [944, 1645, 62, 3, 22, 796, 73, 217]


def _report():
    spec = importlib.util.spec_from_file_location("tc_report", REPO / "experiments/table_compression/report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_run(root, name, overrides, prob, label, serve_fraction):
    run = root / name
    run.mkdir(parents=True)
    full = sum(VOCAB) * 16 * 4
    summary = {"status": "completed", "train_seconds": 1.0, "vocab_sizes": VOCAB, "table": {"dim": 16},
               "memory": {"serve_bytes": int(serve_fraction * full), "full_bytes": full, "train_bytes": full}}
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "sweep_run.json").write_text(json.dumps({"name": name, "overrides": overrides}))
    np.savez(run / "predictions.npz", prob=prob.astype(np.float32), label=label.astype(np.int8),
             source_row=np.arange(len(label)))


@pytest.fixture()
def sweep(tmp_path):
    rng = np.random.default_rng(0)
    n = 400
    for dataset in ("movielens", "frappe"):
        label = (rng.random(n) < 0.4).astype(int)
        systems = {  # noise level: full best, multiplex next, hash worst
            ("full", 1.0, 1.0): ({"table.method": "full"}, 0.5),
            ("hash", 0.1, 0.0999): ({"table.method": "hash"}, 2.0),
            ("multiplex", 0.1, 0.099): ({"table.method": "multiplex"}, 1.0),
        }
        for (family, budget, fraction), (table, noise) in systems.items():
            for seed in range(3):
                logit = (label - 0.4) * 2 + rng.normal(0, noise, n)
                overrides = {**table, "table.budget": budget, "seed": seed}
                _fake_run(tmp_path / dataset, f"{family}-{budget}-{seed}", overrides, 1 / (1 + np.exp(-logit)), label,
                          fraction)
    return tmp_path


def test_report_groups_tests_and_ranks(sweep):
    report = _report()
    result = report.analyse(sweep, samples=300)
    rows = [r for r in result["rows"] if r["dataset"] == "movielens"]
    assert [(r["variant"], r["budget"]) for r in rows] == [("full", 1.0), ("hash", 0.1), ("multiplex", 0.1)]
    full, hashed, multiplexed = rows
    assert full["seeds"] == [0, 1, 2] and "auc_difference" not in full
    assert hashed["auc_difference"] < 0 and hashed["auc_p"] < 0.01 and hashed["logloss_difference"] > 0
    assert hashed["auc_mean"] < multiplexed["auc_mean"] < full["auc_mean"]
    # Pareto: full (most AUC) and multiplex (less memory and more AUC than hash) survive; hash does not
    assert full["pareto"] and multiplexed["pareto"] and not hashed["pareto"]
    comparison = [c for c in result["comparisons"] if c["dataset"] == "movielens"]
    assert len(comparison) == 1 and comparison[0]["a"] == "hash" and comparison[0]["auc_difference"] > 0
    best = [b for b in result["best"] if b["dataset"] == "movielens"]
    assert best[0]["best"] == "multiplex" and best[0]["runner_up"] == "hash" and best[0]["budget"] == 0.1
    infeasible = {(r["variant"], r["budget"]) for r in result["infeasible"] if r["dataset"] == "movielens"}
    assert ("qr", 0.001) in infeasible and ("multiplex", 0.001) not in infeasible
    assert {"dataset": "movielens", "variant": "multiplex", "budget": 0.001} in result["missing"]  # fits, not run
    qr = next(r for r in result["infeasible"] if (r["variant"], r["budget"]) == ("qr", 0.001))
    assert qr["smallest_budget"] > 0.001 and "too small for qr" in qr["reason"]


def test_report_tables_link_their_rows_and_refuse_mixed_examples(sweep, tmp_path):
    report = _report()
    result = report.analyse(sweep, samples=100)
    table = report.rows_table(result, "frappe")
    first_frappe = next(i for i, r in enumerate(result["rows"]) if r["dataset"] == "frappe")
    assert f"[json](results.json#/rows/{first_frappe})" in table and table.count("\n") == 4
    text = "a\n<!-- report:x -->\nold\n<!-- /report:x -->\nb"
    assert report.replace_block(text, "x", "new") == "a\n<!-- report:x -->\nnew\n<!-- /report:x -->\nb"
    with pytest.raises(ValueError, match="no <!-- report:y -->"):
        report.replace_block(text, "y", "new")
    # a run scored on other examples cannot be paired
    run = sweep / "movielens" / "hash-0.1-0"
    stored = dict(np.load(run / "predictions.npz"))
    np.savez(run / "predictions.npz", **{**stored, "source_row": stored["source_row"][::-1]})
    with pytest.raises(ValueError, match="evaluated on other examples"):
        report.analyse(sweep, samples=50)

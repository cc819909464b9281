"""experiments/merging/run.py's sweep bookkeeping (seconds, no model): the grid runs round robin
so a stopped sweep has points on every curve, a grid point skips itself only when an earlier
sitting evaluated the same method, setting and parents, and the table and plot draw every
method's curve from the rows there are."""
import importlib.util
import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run():
    spec = importlib.util.spec_from_file_location("merging_run", ROOT / "experiments" / "merging" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_smoke_grid_runs_round_robin_over_every_method(run):
    grid = run.merge_grid(run.SCALES["smoke"], None, None, None, None)
    names = [g[0] for g in grid]
    assert len(grid) == 15 and len(set(names)) == 15
    order = [(g[1], run.grid_value(g[2])) for g in run.round_robin(grid)]
    assert order[:5] == [("soup", 0.25), ("slerp", 0.25), ("task_arithmetic", 0.5), ("ties", 0.5), ("dare", 0.5)]
    assert order[-1] == ("dare", 1.5) and sorted(order) == sorted((g[1], run.grid_value(g[2])) for g in grid)
    ties = [g[2] for g in grid if g[1] == "ties"]
    assert ties == [{"density": 0.2, "lambda": lam} for lam in (0.5, 1.0, 1.5)]
    assert all(g[2]["p"] == 0.9 for g in grid if g[1] == "dare")


def test_a_grid_point_skips_itself_only_for_the_same_merge(run, tmp_path):
    merge_record = {"method": "ties", "setting": {"density": 0.2, "lambda": 0.5},
                    "inputs": {"base": "a", "stsb_parent": "b", "retrieval_parent": "c"}}
    assert run.finished_point(tmp_path, "ties density=0.2 lambda=0.5", merge_record) is None
    record = {"name": "ties density=0.2 lambda=0.5", "params": "f00", "merge": merge_record}
    run.write_json(tmp_path / "evals" / f"{run.slug(record['name'])}.json", record)
    assert run.finished_point(tmp_path, record["name"], merge_record) == record
    other_parent = {**merge_record, "inputs": {**merge_record["inputs"], "retrieval_parent": "d"}}
    assert run.finished_point(tmp_path, record["name"], other_parent) is None
    run.write_json(tmp_path / "evals" / f"{run.slug(record['name'])}.json", {**record, "merge": None})  # older sitting
    assert run.finished_point(tmp_path, record["name"], merge_record) is None


def test_table_and_plot_draw_each_method_from_a_partial_grid(run, tmp_path):
    def fake(name, method, setting, stsb, scifact):
        return {"name": name, "method": method, "setting": setting, "params": name, "stsb_spearman": stsb,
                "scifact_ndcg@10": scifact, "msmarco_ndcg@10": 90.0, "tests": {}}

    rows = [fake("base", "base", {}, 78.8, 85.8), fake("stsb_parent", "stsb_parent", {}, 81.5, 82.0),
            fake("retrieval_parent", "retrieval_parent", {}, 78.9, 87.0),
            fake("soup t=0.25", "soup", {"t": 0.25}, 81.0, 84.0), fake("soup t=0.5", "soup", {"t": 0.5}, 81.2, 86.2),
            fake("ties density=0.2 lambda=0.5", "ties", {"density": 0.2, "lambda": 0.5}, 80.0, 86.0)]
    text = run.table(rows, "results.json")
    assert text.count("\n") == len(rows) + 1 and "| soup t=0.25 | 81.00 |" in text
    run.plot(rows, tmp_path / "tradeoff.png")
    assert (tmp_path / "tradeoff.png").stat().st_size > 10_000


def test_paired_tests_are_computed_once_per_pair_of_models(run, tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    gold = rng.uniform(0, 5, 40)

    def record(key, noise):
        return {"params": key, "stsb": {"cosine": (gold + noise * rng.standard_normal(40)).tolist()},
                **{s: {"per_query_ndcg@10": rng.uniform(0, 1, 12).tolist()} for s in run.RETRIEVAL_SETS}}

    a, b = record("a", 0.5), record("b", 2.0)
    first = run.paired_tests(b, a, gold, 200, tmp_path)
    assert first["stsb"]["difference"] < 0 and (tmp_path / "b-vs-a-200.json").is_file()
    b["stsb"]["cosine"] = a["stsb"]["cosine"]  # were it recomputed, the difference would now be 0
    assert run.paired_tests(b, a, gold, 200, tmp_path) == first
    assert run.paired_tests(b, a, gold, 200)["stsb"]["difference"] == 0

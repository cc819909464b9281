"""Synthetic sweep folders for the results and notebook tests: the ablation grid with planted effects."""
import json
import pathlib

import numpy as np

from embedjax import sweep
from embedjax.train.config import default_config

ABLATION = pathlib.Path(__file__).resolve().parents[2] / "configs" / "ablation_pooling_matryoshka.py"

QUERIES = [f"q{i}" for i in range(40)]


def synthetic_root(tmp_path, with_records=True):
    """The pooling x Matryoshka x 2-seed grid as finished runs with per-query nDCG@10 of 40 queries:
    cls adds +8 to every query (plus noise), Matryoshka adds nothing. Without records (sweep_run.json),
    results infers each run's overrides from the config.json differences.

    Returns (root, {run name: (overrides, scores [40], final loss)}).
    """
    rng = np.random.default_rng(7)
    base = rng.uniform(20, 80, size=len(QUERIES))
    root = tmp_path / "runs"
    grid = sweep.expand(sweep.load_sweep(f"{ABLATION}:small"))
    truth = {}
    for run in grid:
        o = run["overrides"]
        scores = base + (8.0 if o["model.pooling"] == "cls" else 0.0) + rng.normal(0, 3, size=len(QUERIES))
        workdir = root / run["name"]
        workdir.mkdir(parents=True)
        loss = 2.0 + 0.1 * o["seed"] + (0.5 if o["model.pooling"] == "cls" else 0.0)
        (workdir / "summary.json").write_text(json.dumps({"status": "completed", "final_loss": loss}))
        config = default_config()
        config.model.pooling = o["model.pooling"]
        config.train.matryoshka_dims = o["train.matryoshka_dims"]
        config.seed = o["seed"]
        (workdir / "config.json").write_text(json.dumps(config.to_dict()))
        if with_records:
            (workdir / "sweep_run.json").write_text(json.dumps(run))
        (workdir / "per_query.json").write_text(json.dumps({
            "limit-small-test/ndcg@10": dict(zip(QUERIES, scores.tolist()))}))
        truth[run["name"]] = (o, scores, loss)
    (root / "sweep.json").write_text(json.dumps({"runs": grid}))  # the sweep order: the first run is the baseline
    return root, truth


def group_scores(truth, pooling, dims):
    members = [s for o, s, _ in truth.values() if o["model.pooling"] == pooling and o["train.matryoshka_dims"] == dims]
    assert len(members) == 2
    order = np.argsort(QUERIES)  # results pairs the queries in sorted-id order (randomised p-values depend on it)
    return np.mean(members, axis=0)[order]

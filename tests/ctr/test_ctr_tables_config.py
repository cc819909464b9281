"""configs/ctr_tables.py: every family at both scales, the budget sweep (infeasible budgets left out),
and a sweep run in-process through `embedjax.sweep` (finished runs skipped)."""
import json

import pytest

from embedjax.ctr.cli import load_config
from embedjax.train.config import load_config_module

CONFIG = "configs/ctr_tables.py"


def _module():
    return load_config_module(CONFIG, prefix="test_ctr_tables")[0]


def test_every_family_loads_at_both_scales():
    module = _module()
    for family in module.VARIANTS:
        for dataset in module.DATASETS:
            smoke = load_config(f"{CONFIG}:{family},{dataset}")
            full = load_config(f"{CONFIG}:{family},{dataset},full")
            assert smoke.data.name == full.data.name == dataset
            assert smoke.table.dim == 16 and full.table.dim == 64 and full.train.batch_size > smoke.train.batch_size
            for key, value in module.VARIANTS[family].items():
                section, leaf = key.split(".")
                assert smoke[section][leaf] == value
    assert load_config(f"{CONFIG}:full,frappe").optim.sparse_learning_rate == 0.2
    for bad in ("bloom", "hash,avazu", "hash,movielens,full,extra"):
        with pytest.raises(ValueError, match="ctr_tables.py argument"):
            load_config(f"{CONFIG}:{bad}")


def test_the_sweep_crosses_families_budgets_and_seeds_without_infeasible_budgets(ctr_cache_dir):
    grid = _module().get_sweep("all,movielens")
    assert grid[0] == {"table.method": "full", "table.budget": 1.0, "seed": 0}
    assert [g["seed"] for g in grid[:6]] == [0, 1, 2, 0, 1, 2]
    configs = {(g["table.method"], g.get("table.storage"), g.get("table.update"), g["table.budget"]) for g in grid}
    assert ("multiplex", None, None, 0.001) in configs and ("lowbit", "int4", None, 0.001) in configs
    assert ("qr", None, None, 0.001) not in configs and ("mde", None, None, 0.01) not in configs  # too small
    assert len(grid) % 3 == 0 and len(grid) == 3 * len(configs)


@pytest.mark.slow
def test_an_in_process_sweep_trains_then_skips_finished_runs(ctr_cache_dir, tmp_path):
    from embedjax.cli import main

    argv = ["sweep", "--config", f"{CONFIG}:hash,criteo", "--workdir", str(tmp_path), "--launcher", "inprocess",
            "--only", "budget=0.1,seed=0", "--config.train.num_steps=3", "--config.train.batch_size=256",
            "--config.train.progress=false", f"--config.data.cache_dir={ctr_cache_dir}"]
    assert main(argv) == 0
    run = tmp_path / "method=hash,budget=0.1,seed=0"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["table"]["method"] == "hash"
    assert "test/auc" in (run / "sweep_stdout.log").read_text()
    manifest = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["name"] for r in manifest["runs"]] == [run.name] and manifest["config"].endswith("hash,criteo")
    assert main(argv) == 0  # the second time the run is finished and skipped
    assert json.loads((run / "summary.json").read_text())["train_seconds"] == summary["train_seconds"]

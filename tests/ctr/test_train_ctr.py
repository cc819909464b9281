"""The CTR trainer end to end on real MovieLens-CTR rows: CLI summary line, memory figures measured,
resume, 1 device = 8 fake devices, pruning methods, and configs refused before the workdir exists."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from embedjax.ctr.cli import load_config
from embedjax.ctr.train import train_ctr

CONFIG = "configs/ctr_tables.py"
SHORT = ["--config.train.num_steps=24", "--config.train.batch_size=256", "--config.train.progress=false",
         "--config.train.log_every=8"]


def _cfg(family, ctr_cache_dir, *extra):
    return load_config(f"{CONFIG}:{family}", SHORT + [f"--config.data.cache_dir={ctr_cache_dir}", *extra])


def test_cli_trains_and_prints_the_summary_as_the_last_line(ctr_cache_dir, tmp_path, data_dir):
    env = {**os.environ, "EMBEDJAX_DATA_DIR": str(data_dir), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    out = subprocess.run([sys.executable, "-m", "embedjax", "train-ctr", "--config", f"{CONFIG}:multiplex",
                          "--workdir", str(tmp_path / "run"), *SHORT, f"--config.data.cache_dir={ctr_cache_dir}",
                          "--config.table.budget=0.01"], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["status"] == "completed" and summary["step"] == 24
    assert summary["table"]["method"] == "multiplex" and summary["memory"]["serve_fraction"] <= 0.01
    mem = summary["memory"]
    assert mem["measured_param_bytes"] == mem["param_bytes"] and mem["measured_optimizer_bytes"] == mem["optimizer_bytes"]
    assert 0.6 < summary["eval_after"]["test/auc"] < 0.9
    stored = np.load(tmp_path / "run" / "predictions.npz")
    assert stored["prob"].shape == (20_000,) and set(np.unique(stored["label"])) == {0, 1}
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["eval_after"] == summary["eval_after"]


@pytest.mark.slow
def test_resume_continues_exactly(ctr_cache_dir, tmp_path):
    straight = train_ctr(_cfg("lowbit-int8", ctr_cache_dir), tmp_path / "a", log=lambda m: None)
    part = train_ctr(_cfg("lowbit-int8", ctr_cache_dir, "--config.train.stop_after=10"), tmp_path / "b",
                     log=lambda m: None)
    assert part["status"] == "stopped_after" and part["step"] == 10 and "eval_after" not in part
    resumed = train_ctr(_cfg("lowbit-int8", ctr_cache_dir), tmp_path / "b", log=lambda m: None)
    assert resumed["step"] == 24
    np.testing.assert_array_equal(np.load(tmp_path / "a" / "predictions.npz")["prob"],
                                  np.load(tmp_path / "b" / "predictions.npz")["prob"])


@pytest.mark.slow
def test_eight_devices_train_like_one(ctr_cache_dir, tmp_path):
    one = train_ctr(_cfg("tt", ctr_cache_dir, "--config.mesh.num_devices=1"), tmp_path / "one", log=lambda m: None)
    eight = train_ctr(_cfg("tt", ctr_cache_dir, "--config.mesh.num_devices=8"), tmp_path / "eight",
                      log=lambda m: None)
    assert one["row_shards"] == 1 and eight["row_shards"] == 8 and eight["devices"] == 8
    p1 = np.load(tmp_path / "one" / "predictions.npz")["prob"]
    p8 = np.load(tmp_path / "eight" / "predictions.npz")["prob"]
    np.testing.assert_allclose(p8, p1, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_pruning_methods_meet_the_budget(ctr_cache_dir, tmp_path):
    summary = train_ctr(_cfg("pep", ctr_cache_dir), tmp_path, log=lambda m: None)
    table = summary["table"]
    assert 0 < table["kept"] <= table["keep"]
    assert summary["memory"]["serve_bytes_realised"] <= 0.1 * summary["memory"]["full_bytes"]


def test_bad_configs_are_refused_before_the_workdir_exists(ctr_cache_dir, tmp_path):
    workdir = tmp_path / "never"
    cases = [
        (("--config.table.budget=0.001",), "too small for qr"),
        (("--config.data.fields=('user','city')",), "not fields of movielens"),
        (("--config.table.probes=4",), "has no effect on table.method='qr'"),
        (("--config.mesh.num_devices=3", "--config.train.batch_size=256"), "not divisible"),
    ]
    for extra, message in cases:
        with pytest.raises(ValueError, match=message):
            train_ctr(_cfg("qr", ctr_cache_dir, *extra), workdir, log=lambda m: None)
    with pytest.raises(ValueError, match="unknown config key 'table.budgett'"):
        _cfg("qr", ctr_cache_dir, "--config.table.budgett=0.1")
    assert not workdir.exists()


@pytest.mark.slow
def test_validation_fraction_evaluates_on_held_out_training_rows(ctr_cache_dir, tmp_path):
    summary = train_ctr(_cfg("hash", ctr_cache_dir, "--config.data.validation_fraction=0.1"), tmp_path,
                        log=lambda m: None)
    assert summary["eval_split"] == "validation" and "validation/auc" in summary["eval_after"]
    assert len(np.load(tmp_path / "predictions.npz")["prob"]) == 8_000


@pytest.mark.slow
def test_criteo_rows_train_through_the_dense_and_categorical_pipeline(ctr_cache_dir, tmp_path):
    cfg = load_config(f"{CONFIG}:hash,criteo", ["--config.train.num_steps=12", "--config.train.batch_size=256",
                                                "--config.train.progress=false", f"--config.data.cache_dir={ctr_cache_dir}"])
    summary = train_ctr(cfg, tmp_path, log=lambda m: None)
    assert summary["status"] == "completed" and summary["fields"][0] == "C1" and len(summary["vocab_sizes"]) == 26
    assert summary["memory"]["serve_fraction"] <= 0.1 and np.isfinite(summary["final_loss"])
    assert 0.5 < summary["eval_after"]["test/auc"] < 0.9  # 1,600 held-out rows, 12 steps: above chance

"""Fixtures of the training tests (helpers live in train_runs.py)."""
import os

import pytest

from train_runs import read_losses, tiny_config


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """A persistent XLA compilation cache shared by the in-process runs and the training
    subprocesses: the tiny step compiles once per session instead of once per process.
    Only speed depends on it (a cached executable is the same program)."""
    import jax

    path = str(tmp_path_factory.mktemp("xla_cache"))
    settings = {"jax_compilation_cache_dir": path, "jax_persistent_cache_min_compile_time_secs": 0,
                "jax_persistent_cache_min_entry_size_bytes": -1}
    previous = {name: getattr(jax.config, name) for name in settings}
    env = {name.upper(): str(value) for name, value in settings.items()}
    saved_env = {name: os.environ.get(name) for name in env}
    for name, value in settings.items():
        jax.config.update(name, value)
    os.environ.update(env)
    yield path
    for name, value in previous.items():
        jax.config.update(name, value)
    for name, value in saved_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def tfds_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds_cache"))


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, tfds_cache, data_dir):
    """An uninterrupted 1-device run of the tiny config (40 steps, checkpoints every 5, export on)."""
    from embedjax.train.loop import train

    workdir = tmp_path_factory.mktemp("reference")
    # A 24-pair slice of STS-B dev (same file format) exercises evaluation before and after.
    sts_slice = tmp_path_factory.mktemp("sts") / "sts-dev-slice.csv"
    lines = (data_dir / "stsb" / "sts-dev.csv").read_text(encoding="utf-8").splitlines()[:24]
    sts_slice.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = tiny_config("train.num_steps=40", "checkpoint.every_steps=5", "mesh.num_devices=1",
                      f"data.cache_dir={tfds_cache}", "export.enabled=True", f"eval.sts={sts_slice}",
                      "eval.at_start=True")
    summary = train(cfg, workdir, log=lambda m: None)
    return workdir, summary, read_losses(workdir)

"""Crash safety: kill -9 and resume, SIGTERM, interrupted checkpoint writes, NaN losses."""
import json
import signal
import time

import jax
import numpy as np
import pytest

from train_runs import read_losses, start_training, tiny_config


def _wait_for_step(workdir, proc, step, timeout=240.0):
    deadline = time.time() + timeout
    path = workdir / "metrics.jsonl"
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training exited early (rc {proc.returncode}): {proc.stderr.read()[-2000:]}")
        if path.is_file() and any(json.loads(l)["step"] >= step for l in path.read_text().splitlines() if l):
            return
        time.sleep(0.02)
    raise AssertionError(f"step {step} never logged")


def test_sigterm_then_kill9_then_resume_reproduce_the_uninterrupted_losses(tmp_path, reference_run, tfds_cache):
    ref_dir, ref_summary, ref_losses = reference_run
    assert ref_summary["status"] == "completed" and sorted(ref_losses) == list(range(1, 41))
    workdir = tmp_path / "run"
    overrides = ("train.num_steps=40", "mesh.num_devices=1", f"data.cache_dir={tfds_cache}")
    # Runs 1-2 checkpoint only on SIGTERM, so the kill -9 of run 2 always loses steps that run 3 replays.
    rare = "checkpoint.every_steps=100"

    # 1. SIGTERM: the run saves where it is and exits 0 with a "preempted" summary.
    proc = start_training(workdir, *overrides, rare)
    _wait_for_step(workdir, proc, 3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["status"] == "preempted" and summary["step"] < 40
    stopped_at = summary["step"]
    assert (workdir / "checkpoints" / str(stopped_at)).is_dir()

    # 2. Resume, then kill -9 in the middle (no chance to save).
    proc = start_training(workdir, *overrides, rare)
    _wait_for_step(workdir, proc, stopped_at + 3)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    # 3. Resume to the end, in this process this time (checkpointing every 5 steps on the way).
    from embedjax.train.loop import train

    summary = train(tiny_config(*overrides, "checkpoint.every_steps=5"), workdir, log=lambda m: None)
    assert summary["status"] == "completed" and summary["step"] == 40

    losses = read_losses(workdir)
    assert sorted(losses) == list(range(1, 41))
    assert len(losses[stopped_at + 1]) == 2, "the steps after the SIGTERM checkpoint ran twice (killed, replayed)"
    for step, values in losses.items():
        # Every logged value of a step, before or after an interruption, equals the uninterrupted run's: exactly.
        assert values == [ref_losses[step][0]] * len(values), step


def test_an_interrupted_checkpoint_write_leaves_the_previous_one_restorable(tmp_path):
    from embedjax.train.checkpoint import Checkpointer

    state = {"w": jax.numpy.arange(6.0).reshape(2, 3), "step": jax.numpy.int32(2)}
    ckpt = Checkpointer(tmp_path / "ckpt", keep=3, async_save=False)
    ckpt.save(2, state, {"next_index": 2})
    ckpt.wait()
    newer = {"w": state["w"] + 100.0, "step": jax.numpy.int32(4)}
    with pytest.raises(Exception):
        # The data item cannot be serialised: the write of step 4 fails after it began.
        ckpt.save(4, newer, {"next_index": object()})
        ckpt.wait()
    assert (tmp_path / "ckpt" / "4.orbax-checkpoint-tmp").is_dir()  # the half-written step is still there
    ckpt.manager.close()
    reopened = Checkpointer(tmp_path / "ckpt", keep=3)
    assert reopened.latest_step() == 2
    abstract = jax.eval_shape(lambda: state)
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), state)
    restored, data_state = reopened.restore(2, abstract, shardings)
    assert data_state == {"next_index": 2}
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert reopened.all_steps() == [2]  # the unfinished step is not offered for restore
    reopened.close()


def test_a_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path, tfds_cache):
    from embedjax.train.loop import TrainingDiverged, train

    # An infinite learning rate (1e999 parses to inf) turns the weights into inf/NaN at the
    # first update, so step 1 is finite (and checkpointed) and step 2 is not.
    cfg = tiny_config("train.num_steps=10", "checkpoint.every_steps=1", "checkpoint.async_save=False",
                      "mesh.num_devices=1", "optim.warmup_steps=0", "optim.warmup_ratio=0.0",
                      "optim.learning_rate=1e999", "optim.schedule=constant", f"data.cache_dir={tfds_cache}")
    with pytest.raises(TrainingDiverged, match=r"loss became .* at step 2.*last good checkpoint is step 1"):
        train(cfg, tmp_path, log=lambda m: None)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]
    assert not (tmp_path / "summary.json").exists()


def test_resuming_with_settings_that_change_the_state_names_the_leaves_and_the_fix(tmp_path):
    """A checkpoint written with threefry dropout keys (2 words) and without a LoRA adapter,
    resumed with rbg keys (4 words) and an adapter: the error names both leaves and the settings,
    where orbax alone says only "Requested shape: (4,) is not compatible" and suggests padding.
    The state that wrote it restores (a real TrainState: optimizer chain, empty states)."""
    import optax

    from embedjax.train.checkpoint import Checkpointer
    from embedjax.train.state import create_state

    tx = optax.adamw(1e-3)
    params = {"w": jax.numpy.ones((3, 5))}
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(7, create_state(params, tx, 0), {"next_index": 7})
    ckpt.wait()

    def shardings_of(abstract):
        return jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)

    same = jax.eval_shape(lambda: create_state(params, tx, 0))
    restored, _ = ckpt.restore(7, same, shardings_of(same))
    np.testing.assert_array_equal(restored.params["w"], params["w"])
    other = jax.eval_shape(lambda: create_state({**params, "lora": jax.numpy.zeros((2,))}, tx, 0, dropout_rng="rbg"))
    with pytest.raises(ValueError) as caught:
        ckpt.restore(7, other, shardings_of(other))
    message = str(caught.value)
    assert "rng: saved (2,) uint32, this run (4,) uint32" in message
    assert "params.lora: not in the checkpoint, this run (2,) float32" in message
    assert "opt_state.0.mu.lora: not in the checkpoint" in message and "opt_state.0.nu.lora" in message
    assert str(tmp_path / "ckpt" / "7") in message and "train.dropout_rng" in message and "--workdir" in message
    ckpt.close()


def test_a_refused_resume_keeps_the_config_that_wrote_the_checkpoints(tmp_path, reference_run, tfds_cache):
    """Resuming the reference run's workdir with rbg dropout keys (a different train state) is
    refused, and its config.json still says what wrote the checkpoints (threefry keys)."""
    import shutil

    from embedjax.train.loop import train

    ref_dir, _, _ = reference_run
    workdir = tmp_path / "copy"
    shutil.copytree(ref_dir, workdir, ignore=shutil.ignore_patterns("export", "tensorboard"))
    before = (workdir / "config.json").read_bytes()
    assert json.loads(before)["train"]["dropout_rng"] == "threefry2x32"
    cfg = tiny_config("train.num_steps=40", "checkpoint.every_steps=5", "mesh.num_devices=1",
                      f"data.cache_dir={tfds_cache}", "train.dropout_rng=rbg")
    with pytest.raises(ValueError, match=r"does not fit this run's train state \(rng: saved \(2,\) uint32"):
        train(cfg, workdir, log=lambda m: None)
    assert (workdir / "config.json").read_bytes() == before

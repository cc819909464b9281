"""GradCache in the train step (train.gradcache_sub_batch): the same losses as plain autodiff."""
import numpy as np
import pytest

from train_runs import read_losses, tiny_config


@pytest.mark.slow  # one more compile of the tiny step (~1 min on 2 shared cores)
def test_gradcache_steps_match_the_plain_steps(tmp_path, reference_run, tfds_cache):
    from embedjax.train.loop import train

    _, _, ref = reference_run
    # Same 40-step schedule as the reference, stopped after 6 steps; 4 sub-batches of 4 rows
    # (strided over the 8 devices' row blocks), ring loss on.
    summary = train(tiny_config("train.num_steps=40", "train.stop_after=6", "train.gradcache_sub_batch=4",
                                "checkpoint.every_steps=100", f"data.cache_dir={tfds_cache}"),
                    tmp_path, log=lambda m: None)
    assert summary["status"] == "stopped_after" and summary["step"] == 6
    got = read_losses(tmp_path)
    # GradCache's gradients equal plain autodiff up to float32 summation order; Adam then
    # amplifies little over 6 steps (same tolerance as the device-count comparison).
    np.testing.assert_allclose([got[s][-1] for s in range(1, 7)], [ref[s][0] for s in range(1, 7)],
                               rtol=0, atol=1e-5)

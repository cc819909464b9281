"""experiments/image_text/run.py: the split, captions and batches (seconds, no model), and the
whole runner at its check scale (slow: it compiles four training steps)."""
import importlib.util
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run():
    spec = importlib.util.spec_from_file_location("image_text_run", ROOT / "experiments" / "image_text" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_split_is_stratified_disjoint_and_fixed(run):
    from sklearn.datasets import load_digits

    labels = load_digits().target
    train, held_out = run.split_indices(labels, split_seed=0, held_out_fraction=0.2, max_train_images=0)
    assert len(train) + len(held_out) == 1797 and not set(train) & set(held_out)
    assert len(held_out) == 360
    # stratified: every class holds its share of the held-out part to within one scan
    share = np.bincount(labels[held_out], minlength=10) / np.bincount(labels, minlength=10)
    assert np.all(np.abs(share - 0.2) * np.bincount(labels, minlength=10) <= 1)
    again, _ = run.split_indices(labels, split_seed=0, held_out_fraction=0.2, max_train_images=0)
    np.testing.assert_array_equal(train, again)
    sub, held_again = run.split_indices(labels, split_seed=0, held_out_fraction=0.2, max_train_images=100)
    assert len(sub) == 100 and set(sub) <= set(train)
    np.testing.assert_array_equal(held_out, held_again)  # the held-out part never depends on the subset


def test_caption_ids_name_their_class(run):
    captions = run.all_captions()
    t = len(run.TEMPLATES)
    assert len(captions) == 10 * t == len(set(captions))
    assert captions[3 * t] == "a photo of the digit three" and captions[3 * t + 1] == "a scan of a handwritten 3"
    for cid, text in enumerate(captions):
        label = cid // t
        assert run.NUMBER_WORDS[label] in text.split() or str(label) in text.split()


def test_batch_order_covers_each_epoch_without_repeats(run):
    order = run.batch_order(10, 4, 5, seed=1)  # 2 batches per epoch, the 2 leftover rows dropped
    assert order.shape == (5, 4)
    for epoch in (order[0:2], order[2:4]):
        assert len(set(epoch.ravel())) == 8
    np.testing.assert_array_equal(order, run.batch_order(10, 4, 5, seed=1))
    with pytest.raises(ValueError, match="exceeds"):
        run.batch_order(10, 11, 1, seed=0)


@pytest.mark.slow
def test_runner_check_scale(tmp_path):
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(ROOT / "experiments/image_text/run.py"), "--scale", "check",
                    "--runs", str(tmp_path / "runs"), "--out", str(out)], check=True, cwd=ROOT)
    results = json.loads((out / "results.json").read_text())
    assert results["command"].endswith("--scale check --runs " + str(tmp_path / "runs") + " --out " + str(out))
    assert list(results["configs"]) == ["untrained", "clip-dense", "siglip-dense", "clip-ring", "siglip-ring"]
    assert results["meta"]["num_held_out"] == 360 and results["meta"]["num_train"] == 240
    for row in results["configs"].values():
        assert row["num_seeds"] == 2 and all(0 <= v <= 100 for v in row["zero_shot_top1"]["per_seed"])
    # ring = dense: same seeds, init and batches -> the same losses up to float32 reordering
    assert len(results["ring_vs_dense"]) == 4
    for gap in results["ring_vs_dense"]:
        assert gap["max_abs_loss_diff"] < 1e-4 and gap["max_abs_feature_diff"] < 1e-3 * gap["feature_scale"]
    assert {t["comparison"] for t in results["paired_tests"]} >= {"SigLIP vs CLIP loss (dense)", "ring vs dense (CLIP)"}
    assert all(0 < t["p_value"] <= 1 for t in results["paired_tests"])
    assert len(list((out / "per_seed").glob("*.json"))) == 10
    assert (out / "zero_shot.png").stat().st_size > 1000 and (out / "curves.png").stat().st_size > 1000
    assert "[json](results.json#/configs/clip-ring)" in (out / "table.md").read_text()

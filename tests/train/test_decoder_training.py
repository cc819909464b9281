"""The training loop is family-agnostic: a tiny Qwen3 (decoder, left padding, EOS appended) trains
through the same config path as BERT, with a projection head, and its export reloads."""
import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "models"))
from decoder_fixtures import WORDS, save_tiny_decoder  # noqa: E402

import embedjax as ej  # noqa: E402
from embedjax.train.config import apply_overrides, default_config  # noqa: E402


def _pairs(path: pathlib.Path, n: int = 32):
    rng = np.random.default_rng(0)
    with path.open("w") as f:
        for i in range(n):
            words = rng.choice(WORDS[:18], size=6)
            f.write(json.dumps({"query": " ".join(words[:3]), "positive": " ".join(words), "query_id": f"q{i}",
                                "positive_id": f"d{i}"}) + "\n")
    return path


def test_a_tiny_decoder_with_a_projection_head_trains_and_exports(tmp_path):
    from embedjax.train.loop import train

    folder = save_tiny_decoder(tmp_path / "qwen3", "qwen3")
    data = _pairs(tmp_path / "pairs.jsonl")
    cfg = apply_overrides(default_config(), [
        f"model.path={folder}", "model.pooling=lasttoken", "model.max_length=16", "model.config.attention=bidirectional",
        "model.head.type=projection", "model.head.dim=24", f"data.train=jsonl:{data}", "data.pad_to_max_length=True",
        f"data.cache_dir={tmp_path / 'tfds'}", "train.loss=infonce", "train.batch_size=8", "train.num_epochs=0",
        "train.num_steps=4", "train.progress=False", "optim.learning_rate=1e-3", "optim.warmup_steps=1",
        "mesh.num_devices=1", "eval.sts=", "eval.at_start=False", "checkpoint.every_steps=100"])
    summary = train(cfg, tmp_path / "run", log=lambda m: None)
    assert summary["status"] == "completed" and summary["family"] == "qwen3"
    assert np.isfinite(summary["final_loss"])
    enc = ej.Encoder.from_pretrained(summary["export"])
    assert enc.family.name == "qwen3" and enc.dim == 24 and enc.config.attention == "bidirectional"
    # The export records the trained weights: they differ from the starting checkpoint's.
    start = ej.Encoder.from_pretrained(folder, pooling="lasttoken")
    texts = ["the man plays", "a dog runs fast"]
    assert not np.allclose(enc.encode(texts)[:, :5], start.encode(texts)[:, :5], atol=1e-3)

"""Import, export, and reload in sentence-transformers / transformers; clear errors for bad folders."""
import json
import shutil

import jax
import numpy as np
import pytest

import embedjax as ej
from embedjax.convert import hf

TEXTS = ["A man is playing a flute.", "", "The quick brown fox jumps over the lazy dog " * 5, "query: hello"]


def test_export_reloads_in_sentence_transformers(tmp_path, minilm_dir, minilm_encoder):
    from sentence_transformers import SentenceTransformer

    enc = minilm_encoder
    # Perturb the weights so the test cannot pass by re-reading the original files.
    rng = np.random.default_rng(0)
    params = jax.tree.map(np.array, enc.params)
    kernel = params["backbone"]["layers"]["mlp"]["mlp_in"]["kernel"]  # [layers, in, out]: perturb layer 0 only
    kernel[0] += 0.02 * rng.standard_normal(kernel.shape[1:], dtype=np.float32)
    out = hf.export_pretrained(tmp_path / "export", enc.config, params["backbone"], minilm_dir, pooling="mean",
                               normalize=True, max_length=enc.max_length)
    ours = ej.Encoder(enc.model, params, enc.tokenizer, pooling="mean", normalize=True).encode(TEXTS)
    reloaded = ej.Encoder.from_pretrained(out).encode(TEXTS)
    theirs = SentenceTransformer(str(out), device="cpu").encode(TEXTS, convert_to_numpy=True)
    assert np.min(np.sum(ours * theirs, 1)) >= 0.99999
    np.testing.assert_allclose(reloaded, ours, atol=1e-6)
    assert np.min(np.sum(ours * minilm_encoder.encode(TEXTS), 1)) < 0.9999  # the perturbation is visible


def test_export_refuses_to_overwrite(tmp_path, minilm_dir, minilm_encoder):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not empty"):
        hf.export_pretrained(target, minilm_encoder.config, minilm_encoder.params["backbone"], minilm_dir)
    assert (target / "keep.txt").read_text() == "precious"


def _copy_model(minilm_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(minilm_dir, dst)
    return dst


def test_missing_weights_file_is_a_clear_error(tmp_path, minilm_dir):
    folder = _copy_model(minilm_dir, tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        ej.Encoder.from_pretrained(folder)


def test_corrupt_weights_file_is_a_clear_error(tmp_path, minilm_dir):
    folder = _copy_model(minilm_dir, tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        ej.Encoder.from_pretrained(folder)


def test_mismatched_tensors_are_all_listed(minilm_dir):
    config, _ = hf.load_pretrained(minilm_dir)
    tensors = hf.read_safetensors(minilm_dir)
    del tensors["encoder.layer.3.output.dense.bias"]
    tensors["encoder.layer.9.extra.weight"] = np.zeros(3, np.float32)
    tensors["embeddings.word_embeddings.weight"] = tensors["embeddings.word_embeddings.weight"][:100]
    with pytest.raises(ValueError) as err:
        hf.params_from_tensors(tensors, config)
    text = str(err.value)
    assert "missing (1): encoder.layer.3.output.dense.bias" in text
    assert "unexpected (1): encoder.layer.9.extra.weight" in text
    assert "embeddings.word_embeddings.weight: file (100, 384) vs config (30522, 384)" in text


def test_pooling_settings_are_read_from_the_folder(tmp_path, minilm_dir):
    assert hf.read_pooling_settings(minilm_dir) == hf.PoolingSettings("mean", True, 256)
    folder = _copy_model(minilm_dir, tmp_path)
    cfg = json.loads((folder / "1_Pooling" / "config.json").read_text())
    cfg.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(cfg))
    enc = ej.Encoder.from_pretrained(folder, max_length=64)
    assert (enc.pooling, enc.normalize, enc.max_length) == ("cls", True, 64)


def test_unknown_pooling_name_is_rejected(minilm_dir):
    with pytest.raises(ValueError, match="unknown pooling 'sum'"):
        ej.Encoder.from_pretrained(minilm_dir, pooling="sum")

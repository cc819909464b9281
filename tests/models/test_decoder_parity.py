"""Decoder families (Llama, Mistral, Qwen2, Qwen3) against transformers on tiny random checkpoints.

Tolerances: float32 on both sides with different summation orders gives ~1e-6 relative per token
on these models; the issue's bound is relative 1e-4 per real token and cosine >= 0.99999 for pooled
embeddings. bfloat16 compute rounds every matmul input to 8 bits of mantissa: pooled cosine >= 0.999.
"""
import dataclasses
import json

import numpy as np
import pytest

import embedjax as ej
from embedjax.convert import hf
from embedjax.models.registry import family_for_config
from decoder_fixtures import (CONFIGS, VOCAB, cosines, hf_last_hidden, random_batch,  # sibling helper
                              save_tiny_decoder, token_relative_errors)

FAMILIES = sorted(CONFIGS)


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_decoders")
    return {family: save_tiny_decoder(root / family, family, seed=i) for i, family in enumerate(FAMILIES)}


def _ours(folder, batch, *, attention=None, dtype="float32"):
    """embedjax's last hidden state [B, L, D] as float32."""
    config, params = hf.load_pretrained(folder, attention=attention)
    model = family_for_config(config).build(config, dtype=dtype)
    last, _ = model.apply({"params": params}, batch)
    return np.asarray(last, np.float32)


def _pooled(hidden, mask, pooling):
    """embedjax's pooler on embedjax's states (the path `embed_batch` takes)."""
    return np.asarray(ej.models.pool(hidden, mask, pooling))


def _pool(hidden, mask, pooling):
    m = mask.astype(np.float64)[..., None]
    if pooling == "mean":
        return (hidden * m).sum(1) / m.sum(1)
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
    return hidden[np.arange(len(mask)), last]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_hidden_states_and_pooled_embeddings_match_transformers(tiny_folders, family, attention):
    rng = np.random.default_rng(hash((family, attention)) % 2**32)
    side = "left" if attention == "causal" else "right"
    batch = random_batch(rng, rows=5, length=11, vocab=len(VOCAB), side=side)
    if family == "mistral" and attention == "bidirectional":
        batch = random_batch(rng, rows=5, length=5, vocab=len(VOCAB), side=side)  # within the window
    mask = batch["attention_mask"]
    ref = hf_last_hidden(tiny_folders[family], batch, bidirectional=attention == "bidirectional")
    ours = _ours(tiny_folders[family], batch, attention=attention)
    errors = token_relative_errors(ours, ref, mask)
    assert errors.max() <= 1e-4, (family, attention, errors.max())
    bf16 = _ours(tiny_folders[family], batch, attention=attention, dtype="bfloat16")
    for pooling in ("mean", "lasttoken"):
        assert cosines(_pooled(ours, mask, pooling), _pool(ref, mask, pooling)).min() >= 0.99999
        assert cosines(_pooled(bf16, mask, pooling), _pool(ref, mask, pooling)).min() >= 0.999


def test_the_sliding_window_masks_keys_past_it(tiny_folders):
    """Mistral's window (5) is shorter than the sequence (11): causal states match transformers'
    windowed attention, differ from full causal attention, and bidirectional past it is refused."""
    rng = np.random.default_rng(3)
    batch = random_batch(rng, rows=3, length=11, vocab=len(VOCAB))
    ours = _ours(tiny_folders["mistral"], batch)
    assert token_relative_errors(ours, hf_last_hidden(tiny_folders["mistral"], batch), batch["attention_mask"]).max() <= 1e-4
    config, params = hf.load_pretrained(tiny_folders["mistral"])
    assert config.sliding_window == 5
    config = dataclasses.replace(config, sliding_window=None)
    unwindowed, _ = family_for_config(config).build(config).apply({"params": params}, batch)
    assert np.abs(np.asarray(unwindowed) - ours)[:, 6:].max() > 1e-3  # tokens past the window see more keys
    with pytest.raises(ValueError, match="exceeds the sliding window 5 under bidirectional"):
        _ours(tiny_folders["mistral"], batch, attention="bidirectional")


def test_padding_side_and_batch_size_do_not_change_embeddings(tiny_folders):
    texts = ["the man plays the flute in the park", "a dog runs", "cat", "the sky is blue and green",
             "find passage : the cat sleeps on a green park with the dog"]
    for family in ("llama", "qwen3"):
        enc = ej.Encoder.from_pretrained(tiny_folders[family], pooling="lasttoken")
        alone = np.stack([enc.encode([t], batch_size=1)[0] for t in texts])  # no padding at all
        for side in ("left", "right"):
            enc.tokenizer.padding_side = side
            for batch_size in (2, 5):
                batched = enc.encode(texts, batch_size=batch_size)
                assert cosines(batched, alone).min() >= 0.99999, (family, side, batch_size)


def test_eos_is_appended_and_the_prompt_is_left_out_of_pooling(tiny_folders):
    enc = ej.Encoder.from_pretrained(tiny_folders["qwen2"], pooling="mean", include_prompt=False)
    ids = enc.tokenizer.token_ids(["the dog"], prompt="instruct : find")[0]
    words = {w: i for i, w in enumerate(VOCAB)}
    assert ids == [words["instruct"], words[":"], words["find"], words["the"], words["dog"], words["</s>"]]
    # Pooling without the prompt = mean over the text tokens (and EOS) of the prompted sequence.
    batch = enc.tokenizer.pad([ids])
    last, _ = enc.model.apply({"params": enc.params["backbone"]}, batch)
    expected = np.asarray(last)[0, -3:].mean(0)
    got = enc.encode(["the dog"], prompt="instruct : find")[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    with_prompt = ej.Encoder.from_pretrained(tiny_folders["qwen2"], pooling="mean", include_prompt=True)
    assert not np.allclose(with_prompt.encode(["the dog"], prompt="instruct : find")[0], got, atol=1e-4)


def test_config_is_causal_false_and_the_attention_option(tmp_path, tiny_folders):
    config = hf.read_config(tiny_folders["qwen2"])
    assert config.attention == "causal"
    assert hf.read_config(tiny_folders["qwen2"], attention="bidirectional").attention == "bidirectional"
    raw = json.loads((tiny_folders["qwen2"] / "config.json").read_text())
    assert family_for_config(config).config_cls.from_hf({**raw, "is_causal": False}).attention == "bidirectional"
    with pytest.raises(ValueError, match="bidirectional only"):
        ej.Encoder.from_pretrained("all-MiniLM-L6-v2", attention="causal")


def test_transformers_4_and_5_rope_keys_read_the_same(tiny_folders):
    raw = json.loads((tiny_folders["llama"] / "config.json").read_text())
    rope = dict(raw["rope_parameters"])
    v4 = {k: v for k, v in raw.items() if k != "rope_parameters"}
    v4["rope_theta"] = rope.pop("rope_theta")
    v4["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
    cls = hf.read_config(tiny_folders["llama"]).__class__
    assert cls.from_hf(v4) == cls.from_hf(raw) == hf.read_config(tiny_folders["llama"])
    assert dict(cls.from_hf(raw).rope_scaling)["type"] == "llama3"


def test_bfloat16_sharded_checkpoints_load(tmp_path):
    """A bf16 checkpoint in shards (model.safetensors.index.json) loads to the same states as
    transformers reading the same files in float32."""
    import torch

    folder = save_tiny_decoder(tmp_path / "bf16", "qwen3", seed=7, dtype=torch.bfloat16, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    rng = np.random.default_rng(1)
    batch = random_batch(rng, rows=3, length=9, vocab=len(VOCAB))
    ours = _ours(folder, batch)
    assert token_relative_errors(ours, hf_last_hidden(folder, batch), batch["attention_mask"]).max() <= 1e-4


def test_export_round_trip_loads_in_transformers(tmp_path, tiny_folders):
    """An embedjax export (perturbed weights, bf16 on disk, sharded) reloads in transformers and in
    embedjax with the same hidden states."""
    import jax

    config, params = hf.load_pretrained(tiny_folders["llama"])
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: np.asarray(x) + 0.01 * rng.standard_normal(np.shape(x)).astype(np.float32), params)
    out = hf.export_pretrained(tmp_path / "export", config, params, tiny_folders["llama"], pooling="lasttoken",
                               normalize=True, max_length=32, max_shard_bytes=30_000)
    assert (out / "model.safetensors.index.json").is_file()
    batch = random_batch(rng, rows=4, length=10, vocab=len(VOCAB), side="left")
    model = family_for_config(config).build(config)
    ours = np.asarray(model.apply({"params": params}, batch)[0])
    assert token_relative_errors(ours, hf_last_hidden(out, batch), batch["attention_mask"]).max() <= 1e-4
    reloaded = _ours(out, batch)
    np.testing.assert_allclose(reloaded, ours, rtol=1e-6, atol=1e-6)
    enc = ej.Encoder.from_pretrained(out)
    assert (enc.pooling, enc.normalize, enc.max_length) == ("lasttoken", True, 32)


# ---------------------------------------------------------------- bad input


def test_unknown_family_lists_the_supported_ones(tmp_path, tiny_folders):
    folder = tmp_path / "gptneox"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    with pytest.raises(ValueError, match=r"model_type='gpt_neox'.*supported families: \[.*'bert'.*'llama'.*'siglip'.*'vit'"):
        ej.Encoder.from_pretrained(folder)
    with pytest.raises(ValueError, match="unknown model family 'gpt2'"):
        ej.models.get_family("gpt2")


def test_unsupported_rope_type_is_named(tiny_folders):
    raw = json.loads((tiny_folders["llama"] / "config.json").read_text())
    raw["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0, "factor": 2.0}
    cls = hf.read_config(tiny_folders["llama"]).__class__
    with pytest.raises(ValueError, match="RoPE scaling type 'longrope'.*supported: \\['linear', 'llama3', 'ntk', 'self_extend', 'yarn'\\]"):
        cls.from_hf(raw)
    with pytest.raises(ValueError, match="no option\\(s\\) \\['rope_scaling'\\]"):
        ej.Encoder.from_pretrained("all-MiniLM-L6-v2", rope_scaling={"type": "linear", "factor": 2.0})


def test_missing_and_misshaped_tensors_are_named(tiny_folders):
    config = hf.read_config(tiny_folders["qwen2"])
    tensors = dict(hf.read_safetensors(tiny_folders["qwen2"]))
    del tensors["layers.1.self_attn.k_proj.bias"]
    tensors["layers.0.mlp.up_proj.weight"] = np.zeros((7, 48), np.float32)
    with pytest.raises(ValueError) as err:
        hf.params_from_tensors(tensors, config, source="tiny qwen2")
    text = str(err.value)
    assert "tiny qwen2 does not match the qwen2 config" in text
    assert "missing (1): layers.1.self_attn.k_proj.bias" in text
    assert "layers.0.mlp.up_proj.weight: file (7, 48) vs config (40, 48)" in text

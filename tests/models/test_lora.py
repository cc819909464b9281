"""LoRA on the Linen param tree (embedjax.models.lora) and its peft files (embedjax.convert.peft).

Tiny random decoders saved by transformers (decoder_fixtures): GQA, head_dim != hidden/heads,
biases, 3 layers. Tolerances: merged vs unmerged differ only by float32 summation order
(W x + s x A B vs (W + s A B) x): 1e-5 absolute on hidden states of RMS ~1; embedjax vs
transformers + peft: cosine >= 1 - 1e-5 (the issue's bound).
"""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import embedjax as ej
from embedjax.convert import hf
from embedjax.convert.peft import load_peft, save_peft
from embedjax.encoder import encoder_params, init_encoder_params
from embedjax.models import lora as L
from embedjax.models.registry import family_for_config
from decoder_fixtures import VOCAB, cosines, random_batch, save_tiny_decoder  # sibling helper


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = save_tiny_decoder(tmp_path_factory.mktemp("lora") / "llama", "llama", seed=3)
    config, params = hf.load_pretrained(folder)
    family = family_for_config(config)
    model = family.build(config)
    return folder, config, family, model, params


def _batch(seed=0, side="left"):
    batch = random_batch(np.random.default_rng(seed), rows=4, length=9, vocab=len(VOCAB), side=side)
    return {k: jnp.asarray(v) for k, v in batch.items()}


def _random_adapters(model, backbone, batch, config, seed=1, scale=0.3):
    adapters = L.init_adapters(model, backbone, batch, config, jax.random.PRNGKey(seed))
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 100), 64))
    # B = 0 at init; give every B a random value so the adapters change the model.
    return jax.tree_util.tree_map_with_path(
        lambda path, x: scale * jax.random.normal(next(keys), x.shape) if path[-1].key == "b" else x, adapters)


def test_fresh_adapters_leave_the_model_unchanged(tiny):
    _, _, _, model, backbone = tiny
    batch = _batch()
    config = L.LoRAConfig(rank=4, alpha=8.0, dropout=0.3)
    adapters = L.init_adapters(model, backbone, batch, config, jax.random.PRNGKey(0))
    # every q/k/v/o/gate/up/down kernel got one adapter per layer, B exactly 0
    leaves = {L.path_string(p): (a.shape, b.shape) for p, a, b in L.adapter_leaves(adapters)}
    assert leaves["layers/attention/q"] == ((3, 48, 4), (3, 4, 64))  # 4 heads x head_dim 16
    assert leaves["layers/attention/o"] == ((3, 64, 4), (3, 4, 48))
    assert leaves["layers/mlp/down"] == ((3, 40, 4), (3, 4, 48))
    assert len(leaves) == 7
    assert all(float(jnp.abs(b).max()) == 0.0 for _, _, b in L.adapter_leaves(adapters))
    base, _ = model.apply({"params": backbone}, batch)
    params = {"backbone": backbone, "head": {}, "lora": adapters}
    ours, _ = L.apply_model(model, params, batch, lora=config)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(base))
    # dropout acts on the adapter's input only: with B = 0 it cannot change anything either
    dropped, _ = L.apply_model(model, params, batch, lora=config, deterministic=False,
                               rngs={"dropout": jax.random.PRNGKey(5)})
    np.testing.assert_array_equal(np.asarray(dropped), np.asarray(base))


def test_merged_equals_unmerged_and_base_gradients_are_zero(tiny):
    _, _, _, model, backbone = tiny
    batch = _batch(1, side="right")
    config = L.LoRAConfig(rank=4, alpha=8.0, dropout=0.2)
    adapters = _random_adapters(model, backbone, batch, config)
    params = {"backbone": backbone, "head": {}, "lora": adapters}
    base, _ = model.apply({"params": backbone}, batch)
    unmerged, _ = L.apply_model(model, params, batch, lora=config)
    merged, _ = model.apply({"params": L.merge(backbone, adapters, config)}, batch)
    assert float(jnp.abs(unmerged - base).max()) > 0.1  # the adapters do change the model
    np.testing.assert_allclose(np.asarray(merged), np.asarray(unmerged), atol=1e-5)

    def loss(p):
        out, _ = L.apply_model(model, p, batch, lora=config, deterministic=False, rngs={"dropout": jax.random.PRNGKey(2)})
        return jnp.sum(out ** 2)

    grads = jax.grad(loss)(params)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads["backbone"]))
    assert all(float(jnp.abs(g).max()) > 0.0 for g in jax.tree.leaves(grads["lora"]))


def test_dropout_masks_the_adapter_input_only():
    """One Dense layer, A = B = identity, scale 1: the adapter term is exactly dropout(x)."""
    dense = nn.Dense(6, use_bias=False)
    x = jnp.arange(1.0, 1.0 + 5 * 6).reshape(5, 6)
    kernel = dense.init(jax.random.PRNGKey(0), x)["params"]["kernel"]
    config = L.LoRAConfig(rank=6, alpha=6.0, dropout=0.5, targets=("kernel",))
    variables = {"params": {"kernel": kernel}, "lora": {"a": jnp.eye(6), "b": jnp.eye(6)}}
    with L.lora_scope(config, deterministic=False):
        out = dense.apply(variables, x, rngs={"dropout": jax.random.PRNGKey(1)})
    term = np.asarray(out - x @ kernel)
    kept = np.isclose(term, 2.0 * np.asarray(x), rtol=1e-6)
    dropped = np.isclose(term, 0.0, atol=1e-5)
    assert np.all(kept | dropped) and kept.any() and dropped.any()
    with L.lora_scope(config, deterministic=True):
        np.testing.assert_allclose(np.asarray(dense.apply(variables, x)), np.asarray(x @ kernel + x), rtol=1e-6)


def test_peft_round_trip_both_ways(tiny, tmp_path):
    """embedjax adapters -> peft files -> transformers + peft gives embedjax's embeddings, and a
    peft-made adapter loads into embedjax with the same embeddings."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModel

    folder, config, _, model, backbone = tiny
    batch = _batch(2)
    mask = np.asarray(batch["attention_mask"])
    lora = L.LoRAConfig(rank=4, alpha=8.0)
    adapters = _random_adapters(model, backbone, batch, lora, seed=7)
    ours, _ = L.apply_model(model, {"backbone": backbone, "head": {}, "lora": adapters}, batch, lora=lora)
    ours = np.asarray(ours)
    save_peft(tmp_path / "adapter", adapters, lora, config, base_model=str(folder))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["lora_alpha"] == 8.0
    assert sorted(saved["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]

    def torch_hidden(torch_model):
        m = torch.tensor(mask).long()
        with torch.no_grad():
            out = torch_model(input_ids=torch.tensor(np.asarray(batch["input_ids"])).long(), attention_mask=m,
                              position_ids=torch.clamp(torch.cumsum(m, 1) - 1, min=0))
        return out.last_hidden_state.numpy()

    base = AutoModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    theirs = torch_hidden(PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval())
    keep = mask.astype(bool)
    assert cosines(ours[keep], theirs[keep]).min() >= 1 - 1e-5
    pooled = ej.models.pool(ours, mask, "lasttoken"), ej.models.pool(theirs, mask, "lasttoken")
    assert cosines(np.asarray(pooled[0]), np.asarray(pooled[1])).min() >= 1 - 1e-5

    # peft -> embedjax: an adapter peft initialised (B random, only some modules and layers)
    torch.manual_seed(0)
    made = get_peft_model(AutoModel.from_pretrained(str(folder), dtype=torch.float32),
                          LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "down_proj"],
                                     layers_to_transform=[0, 2], layers_pattern="layers",
                                     init_lora_weights=False)).eval()
    made.save_pretrained(str(tmp_path / "made"))
    expected = torch_hidden(made)
    loaded, loaded_config = load_peft(tmp_path / "made", config, backbone)
    assert loaded_config.rank == 2 and loaded_config.scale == 2.5
    got, _ = L.apply_model(model, {"backbone": backbone, "head": {}, "lora": loaded}, batch, lora=loaded_config)
    assert cosines(np.asarray(got)[keep], expected[keep]).min() >= 1 - 1e-5
    # the layer the adapter skips carries exactly zero factors
    assert float(np.abs(loaded["layers"]["attention"]["q"]["b"][1]).max()) == 0.0


def test_encoder_with_adapters_and_export_of_the_merged_folder(tiny, tmp_path):
    folder, config, family, model, backbone = tiny
    lora = L.LoRAConfig(rank=4, alpha=8.0)
    batch = _batch()
    params = init_encoder_params(model, None, family, jax.random.PRNGKey(0), backbone=backbone, lora=lora)
    params["lora"] = _random_adapters(model, backbone, batch, lora, seed=9)
    tokenizer = ej.Encoder.from_pretrained(folder).tokenizer
    texts = ["the dog runs in the park", "a cat sleeps", "blue sky and green park"]
    enc = ej.Encoder(model, params, tokenizer, pooling="mean", normalize=True, lora=lora)
    ours = enc.encode(texts)
    merged = L.merge_encoder_params(params, lora)
    assert "lora" not in merged
    out = hf.export_pretrained(tmp_path / "merged", config, jax.tree.map(np.asarray, merged["backbone"]), folder,
                               pooling="mean", normalize=True, max_length=32)
    reloaded = ej.Encoder.from_pretrained(out).encode(texts)
    assert np.min(np.sum(reloaded * ours, axis=1)) >= 1 - 1e-6


def test_bad_lora_inputs_are_named(tiny, tmp_path):
    folder, config, _, model, backbone = tiny
    batch = _batch()
    with pytest.raises(ValueError, match=r"matches no kernel; the model's kernels are \['layers/attention/k/kernel'"):
        L.init_adapters(model, backbone, batch, L.LoRAConfig(targets=("attention/query",)), jax.random.PRNGKey(0))
    for rank in (0, -2):
        with pytest.raises(ValueError, match=f"LoRA rank={rank} must be an int >= 1"):
            L.LoRAConfig(rank=rank)
    with pytest.raises(ValueError, match="model.lora has no option"):
        L.LoRAConfig.from_dict({"rank": 4, "r": 4})
    with pytest.raises(ValueError, match="carry LoRA adapters but no LoRAConfig"):
        L.apply_model(model, {"backbone": backbone, "head": {},
                              "lora": L.init_adapters(model, backbone, batch, L.LoRAConfig(rank=2),
                                                      jax.random.PRNGKey(0))}, batch)
    # an adapter made for another base: a wider model (shapes) and another family's module names
    other = save_tiny_decoder(tmp_path / "wide", "llama", seed=1, hidden_size=64)
    wide_config, wide_backbone = hf.load_pretrained(other)
    wide_model = family_for_config(wide_config).build(wide_config)
    lora = L.LoRAConfig(rank=2)
    save_peft(tmp_path / "wide_adapter", L.init_adapters(wide_model, wide_backbone, batch, lora, jax.random.PRNGKey(0)),
              lora, wide_config, base_model="tiny-wide-llama")
    with pytest.raises(ValueError, match=r"made for base model 'tiny-wide-llama'\) does not fit this llama model:\n"
                                         r"[\s\S]*layers.0.self_attn.q_proj.lora_A: file \(2, 64\) vs model \(r=2, in=48\)"):
        load_peft(tmp_path / "wide_adapter", config)
    from safetensors.numpy import save_file

    bert_like = tmp_path / "bert_adapter"
    bert_like.mkdir()
    (bert_like / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                                "base_model_name_or_path": "bert-base"}))
    save_file({"base_model.model.encoder.layer.0.attention.self.query.lora_A.weight": np.zeros((2, 48), np.float32),
               "base_model.model.encoder.layer.0.attention.self.query.lora_B.weight": np.zeros((48, 2), np.float32)},
              str(bert_like / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"'bert-base'\) does not fit[\s\S]*modules this llama model does not have \(1\): "
                                         r"encoder.layer.0.attention.self.query"):
        load_peft(bert_like, config)

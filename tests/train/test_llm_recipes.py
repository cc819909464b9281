"""The LLM recipes through the trainer on a tiny tied-embedding Llama: LoRA (frozen backbone, optimizer
over adapters + head only, merged export, peft adapter folder), the latent-attention head, ring
InfoNCE with a hard negative, GradCache, 8 devices = 1, MNTP and the MNTP -> contrastive chain,
instruction prompts in training and in the exported folder.

Training data: the first rows of the shared NLI triplets (training data), written as a jsonl source.
"""
import csv
import json
import pathlib
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "models"))
from decoder_fixtures import save_tiny_decoder  # noqa: E402  (sibling test helper)
from train_runs import read_losses  # noqa: E402

import embedjax as ej  # noqa: E402
from embedjax.convert import hf  # noqa: E402
from embedjax.convert.peft import load_peft  # noqa: E402
from embedjax.models import lora as L  # noqa: E402


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A tiny Llama whose LM head is its input embedding (tied), as SmolLM2's."""
    return save_tiny_decoder(tmp_path_factory.mktemp("llm_recipes") / "llama", "llama", seed=5,
                             tie_word_embeddings=True)


@pytest.fixture(scope="module")
def nli_jsonl(data_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("nli") / "nli.jsonl"
    with open(data_dir / "nli" / "triplets.tsv", newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)
        rows = [next(reader) for _ in range(64)]
    path.write_text("".join(json.dumps({"query": a, "positive": p, "negatives": [n]}) + "\n" for a, p, n, *_ in rows))
    return path


def _config(tiny_llama, nli_jsonl, tfds_cache, *overrides):
    from embedjax.train.config import apply_overrides, default_config

    base = [f"model.path={tiny_llama}", "model.max_length=16", "data.pad_to_max_length=True", f"data.train=jsonl:{nli_jsonl}",
            "data.num_negatives=1", f"data.cache_dir={tfds_cache}", "model.pooling=mean",
            "model.config.attention=bidirectional", "train.loss=infonce", "train.batch_size=8", "train.num_steps=4",
            "train.num_epochs=0", "train.progress=False", "optim.learning_rate=0.01", "optim.warmup_steps=1",
            "eval.sts=", "eval.at_start=False", "checkpoint.every_steps=100", "mesh.num_devices=1"]
    return apply_overrides(default_config(), [*base, *overrides])


LORA = ["model.lora.rank=4", "model.lora.alpha=8.0", "model.lora.dropout=0.1"]
LATENT = ["model.head.type=latent_attention", "model.head.n_latents=4", "model.head.heads=2", "model.head.mlp_ratio=1"]


@pytest.mark.slow  # a tiny LoRA + latent-attention run, export and peft reload (~180 s on 2 loaded cores)
def test_lora_latent_attention_ring_training_exports_merged_and_peft(tiny_llama, nli_jsonl, tfds_cache, tmp_path):
    from embedjax.train.loop import train

    cfg = _config(tiny_llama, nli_jsonl, tfds_cache, *LORA, *LATENT, "train.ring=True")
    summary = train(cfg, tmp_path / "run", log=lambda m: None)
    assert summary["status"] == "completed" and summary["step"] == 4
    export, adapter = pathlib.Path(summary["export"]), pathlib.Path(summary["adapter"])
    assert (export / "2_LatentAttention" / "model.safetensors").is_file()
    config, base = hf.load_pretrained(tiny_llama)
    _, merged = hf.load_pretrained(export)
    adapters, lora = load_peft(adapter, config, base)
    assert lora.rank == 4 and lora.scale == 2.0 and lora.dropout == 0.1
    # The backbone was frozen: the export is the base plus the adapters' delta and nothing else.
    expected = L.merge(base, adapters, lora)
    for path, got in jax.tree_util.tree_flatten_with_path(merged)[0]:
        want = expected
        for key in path:
            want = want[key.key]
        np.testing.assert_allclose(got, np.asarray(want), atol=1e-6, err_msg=str(path))
    changed = [L.path_string(p) for p, _, b in L.adapter_leaves(adapters) if np.abs(b).max() > 0]
    assert len(changed) == 7  # every B moved away from 0
    assert np.array_equal(merged["embed_tokens"]["embedding"], base["embed_tokens"]["embedding"])
    # The exported folder reloads with its head, and equals base + adapters + the same head.
    texts = ["the dog runs in the park", "a cat sleeps on the green sky", "query : find passage"]
    reloaded = ej.Encoder.from_pretrained(export)
    assert type(reloaded.head).__name__ == "LatentAttentionHead"
    unmerged = ej.Encoder(reloaded.model, {"backbone": base, "head": reloaded.params["head"], "lora": adapters},
                          reloaded.tokenizer, pooling="mean", normalize=True, head=reloaded.head, lora=lora)
    assert np.min(np.sum(reloaded.encode(texts) * unmerged.encode(texts), axis=1)) >= 1 - 1e-5


def test_the_optimizer_holds_only_adapters_and_head(tiny_llama):
    import optax

    from embedjax.encoder import init_encoder_params
    from embedjax.models.heads import build_head
    from embedjax.models.registry import family_for_config
    from embedjax.train.state import create_state

    config, base = hf.load_pretrained(tiny_llama)
    family = family_for_config(config)
    model = family.build(config)
    head = build_head({"type": "latent_attention", "n_latents": 4, "heads": 2}, pooling="mean")
    lora = L.LoRAConfig(rank=4)
    params = init_encoder_params(model, head, family, jax.random.PRNGKey(0), backbone=base, lora=lora)
    state = create_state(params, optax.adamw(1e-3), 0, trainable=("head", "lora"))
    trainable = L.count_parameters(params["head"]) + L.count_parameters(params["lora"])
    moments = L.count_parameters(state.opt_state) - 1  # Adam's mu and nu, plus its step count
    assert moments == 2 * trainable
    shapes = {tuple(x.shape) for x in jax.tree.leaves(state.opt_state)}
    assert base["embed_tokens"]["embedding"].shape not in shapes  # no moment of a backbone tensor


@pytest.mark.slow  # three more compiles of the tiny LoRA step (~3 min on 2 shared cores)
def test_lora_gradcache_and_eight_devices_give_the_same_steps(tiny_llama, nli_jsonl, tfds_cache, tmp_path):
    from embedjax.train.loop import train

    common = [*LORA, "model.lora.dropout=0.0", *LATENT, "train.ring=True", "export.enabled=False"]
    losses = {}
    for name, extra in (("plain", []), ("gradcache", ["train.gradcache_sub_batch=2"]),
                        ("devices8", ["mesh.num_devices=8", "mesh.rules=fsdp"])):
        train(_config(tiny_llama, nli_jsonl, tfds_cache, *common, *extra), tmp_path / name, log=lambda m: None)
        losses[name] = [v[-1] for _, v in sorted(read_losses(tmp_path / name).items())]
    np.testing.assert_allclose(losses["gradcache"], losses["plain"], atol=1e-5)
    np.testing.assert_allclose(losses["devices8"], losses["plain"], atol=1e-5)


@pytest.mark.slow  # two tiny runs (~3 min on 2 shared cores)
def test_mntp_then_contrastive_chain(tiny_llama, nli_jsonl, tfds_cache, tmp_path):
    from embedjax.train.loop import train

    mntp = train(_config(tiny_llama, nli_jsonl, tfds_cache, *LORA, "train.objective=mntp", "train.num_steps=6",
                         "train.mntp_probability=0.3"), tmp_path / "mntp", log=lambda m: None)
    assert mntp["status"] == "completed"
    losses = [v[-1] for _, v in sorted(read_losses(tmp_path / "mntp").items())]
    assert all(np.isfinite(losses)) and losses[0] > 2.0  # cross-entropy over a 64-token vocabulary
    _, base = hf.load_pretrained(tiny_llama)
    _, after = hf.load_pretrained(mntp["export"])
    assert not np.allclose(after["layers"]["attention"]["q"]["kernel"], base["layers"]["attention"]["q"]["kernel"])
    chained = train(_config(pathlib.Path(mntp["export"]), nli_jsonl, tfds_cache, *LORA), tmp_path / "contrastive",
                    log=lambda m: None)
    assert chained["status"] == "completed"


def test_mntp_refuses_what_it_cannot_train(tiny_llama, nli_jsonl, tfds_cache, tmp_path):
    from embedjax.train.loop import train

    with pytest.raises(ValueError, match="trains bidirectional attention; set model.config.attention='bidirectional'"):
        train(_config(tiny_llama, nli_jsonl, tfds_cache, "train.objective=mntp", "model.config.attention=causal"),
              tmp_path / "a", log=lambda m: None)
    with pytest.raises(ValueError, match="a pooling head \\(model.head\\) has nothing to learn"):
        train(_config(tiny_llama, nli_jsonl, tfds_cache, "train.objective=mntp", *LATENT), tmp_path / "b",
              log=lambda m: None)
    with pytest.raises(ValueError, match="MNTP mask probability 1.5 must be in \\(0, 1\\)"):
        train(_config(tiny_llama, nli_jsonl, tfds_cache, "train.objective=mntp", "train.mntp_probability=1.5"),
              tmp_path / "c", log=lambda m: None)
    with pytest.raises(ValueError, match="train.objective='typo': use 'contrastive' or 'mntp'"):
        train(_config(tiny_llama, nli_jsonl, tfds_cache, "train.objective=typo"), tmp_path / "d", log=lambda m: None)
    assert not any((tmp_path / name).exists() for name in "abcd")  # refused before writing anything

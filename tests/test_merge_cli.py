"""``python -m embedjax merge``: merged folders load in embedjax and sentence-transformers with the
embeddings of the in-memory merge; bad input is a clear error (exit 2, JSON last line)."""
import dataclasses
import json

import jax
import numpy as np
import pytest

import embedjax as ej
from embedjax import cli, merge
from embedjax.merge_cli import layer_stacking, read_model, write_model

TEXTS = ["A man is playing a flute.", "Two dogs run across a field of snow.", "", "query: merging"]


def fine_tuned(folder, out, seed, *, scale=0.05, head=None):
    """A copy of ``folder`` with every weight moved by seeded noise: a stand-in for a fine-tune."""
    model = read_model(folder)
    rng = np.random.default_rng(seed)
    params = model.params
    if head is not None:
        from embedjax.encoder import init_encoder_params
        from embedjax.models.registry import family_for_config

        family = family_for_config(model.config)
        params = init_encoder_params(family.build(model.config), head, family, jax.random.PRNGKey(seed),
                                     backbone=params["backbone"])
        model = dataclasses.replace(model, head=head)
    params = jax.tree.map(lambda x: np.asarray(x) + scale * rng.standard_normal(np.shape(x)).astype(np.float32), params)
    write_model(out, model, params, max_length=64)
    return read_model(out)


def run_cli(args, capsys):
    code = cli.main(["merge", *map(str, args)])
    captured = capsys.readouterr()
    return code, json.loads(captured.out.strip().splitlines()[-1]), captured.err


def encode_params(model, params):
    from embedjax.data.tokenization import Tokenizer
    from embedjax.models.registry import family_for_config

    family = family_for_config(model.config)
    tokenizer = Tokenizer.from_folder(model.path, 64, needs=family.tokenizer)
    enc = ej.Encoder(family.build(model.config), params, tokenizer, pooling=model.settings.pooling,
                     normalize=model.settings.normalize, head=model.head)
    return enc.encode(TEXTS)


def test_ties_folder_loads_in_both_libraries_with_the_in_memory_embeddings(tmp_path, tiny_st_model, capsys):
    from sentence_transformers import SentenceTransformer

    a = fine_tuned(tiny_st_model, tmp_path / "a", 1)
    b = fine_tuned(tiny_st_model, tmp_path / "b", 2)
    base = read_model(tiny_st_model)
    code, result, _ = run_cli(["--method", "ties", "--models", a.path, b.path, "--base", tiny_st_model,
                               "--density", "0.4", "--out", tmp_path / "merged"], capsys)
    assert code == 0 and result["method"] == "ties" and result["max_length"] == 64
    expected = encode_params(a, merge.ties(base.params, [a.params, b.params], 0.4, stacked=layer_stacking(a)))
    ours = ej.Encoder.from_pretrained(tmp_path / "merged").encode(TEXTS)
    theirs = SentenceTransformer(str(tmp_path / "merged"), device="cpu").encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(ours, expected, atol=1e-6)
    np.testing.assert_allclose(theirs, expected, atol=2e-5)
    merged = read_model(tmp_path / "merged").params
    for parent in (a, b, base):  # the merge is none of its inputs
        gap = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), merged, parent.params)
        assert max(jax.tree.leaves(gap)) > 1e-2


def test_a_soup_of_models_with_projection_heads_merges_the_heads_too(tmp_path, tiny_st_model, capsys):
    from sentence_transformers import SentenceTransformer

    from embedjax.models.heads import build_head

    head = build_head({"type": "projection", "dim": 8}, pooling="mean")
    a = fine_tuned(tiny_st_model, tmp_path / "a", 3, head=head)
    b = fine_tuned(tiny_st_model, tmp_path / "b", 4, head=head)
    code, result, _ = run_cli(["--method", "soup", "--models", a.path, b.path, "--weights", "1", "3",
                               "--out", tmp_path / "soup"], capsys)
    assert code == 0, result
    soup = read_model(tmp_path / "soup")
    np.testing.assert_allclose(soup.params["head"]["dense"]["kernel"],
                               0.25 * a.params["head"]["dense"]["kernel"] + 0.75 * b.params["head"]["dense"]["kernel"],
                               rtol=1e-5, atol=1e-6)
    expected = encode_params(a, merge.soup([a.params, b.params], [1, 3]))
    assert expected.shape == (len(TEXTS), 8)
    theirs = SentenceTransformer(str(tmp_path / "soup"), device="cpu").encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(ej.Encoder.from_pretrained(tmp_path / "soup").encode(TEXTS), expected, atol=1e-6)
    np.testing.assert_allclose(theirs, expected, atol=2e-5)


def test_bad_merge_requests_are_clear_errors(tmp_path, tiny_st_model, minilm_dir, capsys):
    a = fine_tuned(tiny_st_model, tmp_path / "a", 5)
    out = tmp_path / "out"
    cases = [
        (["--method", "slerp", "--models", a.path, tiny_st_model, "--t", "1.5"], r"t=1.5 is not a number in \[0, 1\]"),
        (["--method", "ties", "--models", a.path, "--base", tiny_st_model, "--density", "-0.2"],
         r"density=-0.2 is not a number in \[0, 1\]"),
        (["--method", "dare", "--models", a.path, "--base", tiny_st_model, "--p", "2"], r"p=2.0 is not a number in \[0, 1\]"),
        (["--method", "ties", "--models", a.path, "--density", "0.2"], "needs --base"),
        (["--method", "soup", "--models", a.path, tiny_st_model, "--t", "0.5"], "does not take --t"),
        (["--method", "soup", "--models", a.path, minilm_dir], r"--models\[1\] .* has another config than --models\[0\]"),
    ]
    for args, message in cases:
        code, result, err = run_cli([*args, "--out", out], capsys)
        assert code == 2 and result["command"] == "merge", args
        assert __import__("re").search(message, err), (message, err)
        assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _, err = run_cli(["--method", "soup", "--models", a.path, tiny_st_model, "--out", out], capsys)
    assert code == 2 and "not empty" in err and (out / "keep.txt").read_text() == "precious"


def test_mismatched_parameter_trees_name_the_first_path(tmp_path, tiny_st_model):
    a = read_model(tiny_st_model)
    other = jax.tree.map(np.asarray, a.params)
    other["backbone"]["layers"]["mlp"]["mlp_in"]["kernel"] = other["backbone"]["layers"]["mlp"]["mlp_in"]["kernel"][..., :5]
    with pytest.raises(ValueError, match=r"models\[1\]\['backbone'\]\['layers'\]\['mlp'\]\['mlp_in'\]\['kernel'\] has "
                                         r"shape \(2, 16, 5\) but models\[0\]"):
        merge.soup([a.params, other])


def _peft_adapter(folder, model_folder, seed, rank):
    """A peft LoRA folder on q and v of ``model_folder`` with random (non-zero) A and B."""
    from embedjax.convert.peft import save_peft
    from embedjax.models import lora as L
    from embedjax.models.registry import family_for_config

    base = read_model(model_folder)
    model = family_for_config(base.config).build(base.config)
    tokens = {"input_ids": np.full((2, 5), 7, np.int32), "attention_mask": np.ones((2, 5), np.int32)}
    config = L.LoRAConfig(rank=rank, alpha=2.0 * rank, targets=(r"attention/(q|v)/kernel$",))
    adapters = L.init_adapters(model, base.params["backbone"], tokens, config, jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)
    adapters = jax.tree_util.tree_map_with_path(
        lambda path, x: 0.3 * rng.standard_normal(x.shape).astype(np.float32) if path[-1].key == "b" else np.asarray(x),
        adapters)
    return save_peft(folder, adapters, config, base.config, base_model="tiny-bert")


def test_peft_adapters_merge_through_the_cli_into_a_model_or_an_adapter(tmp_path, tiny_st_model, capsys):
    """peft folders in; --lora fold writes a model folder, --lora adapters a peft folder that
    transformers + peft load with the fold's hidden states (exact rank concatenation)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModel

    from embedjax.merge_lora import LoRAAdapter

    a = _peft_adapter(tmp_path / "a", tiny_st_model, 1, rank=2)
    b = _peft_adapter(tmp_path / "b", tiny_st_model, 2, rank=3)
    base = read_model(tiny_st_model)
    common = ["--method", "task_arithmetic", "--models", a, b, "--base", tiny_st_model, "--lambdas", "0.5", "1.5"]
    code, folded, err = run_cli([*common, "--lora", "fold", "--out", tmp_path / "folded"], capsys)
    assert code == 0, err
    code, adapted, err = run_cli([*common, "--lora", "adapters", "--out", tmp_path / "adapted"], capsys)
    assert code == 0, err
    assert adapted["rank"] == 5 and adapted["truncation_error_max"] == 0.0 and folded["options"]["lora"] == "fold"

    inputs = [LoRAAdapter.from_peft(f, base.config, base.params["backbone"]) for f in (a, b)]
    expected = encode_params(base, merge.task_arithmetic(base.params, inputs, [0.5, 1.5], lora="fold"))
    np.testing.assert_allclose(ej.Encoder.from_pretrained(tmp_path / "folded").encode(TEXTS), expected, atol=1e-6)
    merged = LoRAAdapter.from_peft(tmp_path / "adapted", base.config, base.params["backbone"])
    assert merged.config.rank == 5 and merged.config.scale == 1.0 and merged.base_model == "tiny-bert"

    ids = torch.tensor([[101, 1037, 2158, 2003, 2652, 1037, 8928, 102]])
    with torch.no_grad():
        plain = AutoModel.from_pretrained(str(tmp_path / "folded")).eval()(input_ids=ids).last_hidden_state.numpy()
        peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(str(tiny_st_model)), str(tmp_path / "adapted"))
        with_adapter = peft_model.eval()(input_ids=ids).last_hidden_state.numpy()
        untouched = AutoModel.from_pretrained(str(tiny_st_model)).eval()(input_ids=ids).last_hidden_state.numpy()
    np.testing.assert_allclose(with_adapter, plain, atol=2e-5)
    assert np.max(np.abs(with_adapter - untouched)) > 1e-2  # the adapters do change the model

    # a non-linear merge refactorised to rank 2, with its truncation error reported per module
    code, ties, err = run_cli(["--method", "ties", "--models", a, b, "--base", tiny_st_model, "--density", "0.5",
                               "--lora", "adapters", "--rank", "2", "--out", tmp_path / "ties"], capsys)
    assert code == 0, err
    assert ties["rank"] == 2 and 0.0 < ties["truncation_error_max"] < 1.0
    assert sorted(ties["truncation_error"]) == ["layers/attention/q", "layers/attention/v"]
    assert LoRAAdapter.from_peft(tmp_path / "ties", base.config).config.rank == 2

    cases = [([*common, "--out", tmp_path / "x"], r"--models\[0\] .* is a LoRA adapter folder: pass --lora fold"),
             (["--method", "soup", "--models", a, b, "--lora", "adapters", "--out", tmp_path / "x"],
              r"is a LoRA adapter folder: pass --base"),
             ([*common, "--lora", "adapters", "--rank", "17", "--out", tmp_path / "x"], r"rank=17 cannot be met"),
             (["--method", "soup", "--models", tiny_st_model, tiny_st_model, "--lora", "fold", "--out", tmp_path / "x"],
              r"no --models folder is a LoRA adapter")]
    for args, message in cases:
        code, result, err = run_cli(args, capsys)
        assert code == 2 and __import__("re").search(message, err), (message, err)
        assert not (tmp_path / "x").exists()

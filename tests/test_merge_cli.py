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

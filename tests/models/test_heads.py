"""Trainable heads on the encoder's {"backbone", "head"} tree: a projection head changes the
width, exports as a sentence-transformers Dense module and reloads in both libraries."""
import jax
import numpy as np
import pytest

import embedjax as ej
from embedjax.convert import hf
from embedjax.encoder import init_encoder_params
from embedjax.models.heads import build_head

TEXTS = ["A man is playing a flute.", "A dog runs in the park", "", "query: heads"]


def test_projection_head_exports_as_a_dense_module_and_reloads(tmp_path, minilm_dir, minilm_encoder):
    from sentence_transformers import SentenceTransformer

    head = build_head({"type": "projection", "dim": 128}, pooling="mean")
    params = init_encoder_params(minilm_encoder.model, head, minilm_encoder.family, jax.random.PRNGKey(3),
                                 backbone=minilm_encoder.params["backbone"])
    assert params["head"]["dense"]["kernel"].shape == (384, 128)
    enc = ej.Encoder(minilm_encoder.model, params, minilm_encoder.tokenizer, pooling="mean", normalize=True,
                     head=head)
    assert enc.dim == 128
    ours = enc.encode(TEXTS)
    # The head is pooled-then-projected: the same as projecting the plain pooled embedding.
    pooled = ej.Encoder(minilm_encoder.model, params, minilm_encoder.tokenizer, pooling="mean",
                        normalize=False).encode(TEXTS)
    projected = pooled @ np.asarray(params["head"]["dense"]["kernel"])
    np.testing.assert_allclose(ours, projected / np.linalg.norm(projected, axis=1, keepdims=True), atol=1e-5)

    out = hf.export_pretrained(tmp_path / "export", minilm_encoder.config, params["backbone"], minilm_dir,
                               pooling="mean", normalize=True, head=head, head_params=params["head"])
    assert (out / "2_Dense" / "config.json").is_file() and (out / "3_Normalize").is_dir()
    reloaded = ej.Encoder.from_pretrained(out)
    assert reloaded.dim == 128
    np.testing.assert_allclose(reloaded.encode(TEXTS), ours, atol=1e-6)
    theirs = SentenceTransformer(str(out), device="cpu").encode(TEXTS, convert_to_numpy=True)
    assert np.min(np.sum(theirs * ours, 1)) >= 0.99999


def test_bad_head_specs_are_named():
    with pytest.raises(ValueError, match="head type 'attention' is unknown; choose one of \\[.*'projection'.*\\]"):
        build_head({"type": "attention"}, pooling="mean")
    with pytest.raises(ValueError, match="head 'projection' has no option\\(s\\) \\['width'\\]"):
        build_head({"type": "projection", "width": 3}, pooling="mean")
    assert build_head({}, pooling="mean") is None

"""ViT, CLIP and SigLIP families against transformers on tiny random checkpoints.

Tolerances: float32 on both sides; features must have cosine >= 0.99999 (the issue's bar) and
losses agree within rtol 1e-5. Observed differences are ~1e-7 relative (summation order).
"""
import numpy as np
import pytest

from embedjax.convert import hf
from embedjax.losses.two_tower import clip_loss, siglip_loss
from embedjax.models.registry import family_for_config
from tests.models import image_text_fixtures as fx


def _cosines(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _load(folder):
    config, params = hf.load_pretrained(folder)
    return config, family_for_config(config).build(config), params


def _nchw(x):
    import torch

    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def test_vit_matches_transformers_on_a_non_square_patch_grid(tmp_path):
    import torch

    ref = fx.save_vit(tmp_path, image_size=(16, 24), patch_size=8)  # 2 x 3 patches
    config, model, params = _load(tmp_path)
    assert config.vision.grid == (2, 3)
    x = fx.pixels(np.random.default_rng(0), 3, 16, 24)
    tokens, pooled = model.apply({"params": params}, x)
    feats = model.apply({"params": params}, x, method="encode_image")
    with torch.no_grad():
        out = ref(pixel_values=_nchw(x))
    want_tokens = out.last_hidden_state.numpy()
    assert tokens.shape == want_tokens.shape == (3, 7, 32)
    assert _cosines(tokens.reshape(-1, 32), want_tokens.reshape(-1, 32)).min() >= 0.99999
    np.testing.assert_allclose(tokens, want_tokens, rtol=1e-4, atol=1e-5)
    assert _cosines(feats, out.pooler_output.numpy()).min() >= 0.99999
    np.testing.assert_allclose(feats, pooled)


@pytest.mark.parametrize("eos_token_id", [98, 2], ids=["first-eos", "legacy-argmax"])
def test_clip_matches_transformers(tmp_path, eos_token_id):
    import torch

    ref = fx.save_clip(tmp_path, eos_token_id=eos_token_id)
    config, model, params = _load(tmp_path)
    rng = np.random.default_rng(1)
    # Under the legacy rule the EOS is found as the largest id (98 = vocab - 1 here).
    ids, mask = fx.text_batch(rng, [5, 12, 3, 8], 12, eos_id=98)
    x = fx.pixels(rng, 4, 20, 20)
    text = model.apply({"params": params}, {"input_ids": ids, "attention_mask": mask}, method="encode_text")
    image = model.apply({"params": params}, x, method="encode_image")
    with torch.no_grad():
        out = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), pixel_values=_nchw(x),
                  return_loss=True)
    assert _cosines(text, out.text_embeds.numpy()).min() >= 0.99999
    assert _cosines(image, out.image_embeds.numpy()).min() >= 0.99999
    with torch.no_grad():  # unnormalised features, as get_text_features / get_image_features give them
        want_text = ref.get_text_features(input_ids=torch.from_numpy(ids),
                                          attention_mask=torch.from_numpy(mask)).pooler_output.numpy()
        want_image = ref.get_image_features(pixel_values=_nchw(x)).pooler_output.numpy()
    np.testing.assert_allclose(text, want_text, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(image, want_image, rtol=1e-4, atol=1e-5)
    log_scale, _ = model.apply({"params": params}, method="logit_params")
    loss = clip_loss(text, image, log_scale)
    np.testing.assert_allclose(float(loss), float(out.loss), rtol=1e-5)


def test_siglip_matches_transformers(tmp_path):
    import torch

    ref = fx.save_siglip(tmp_path)
    config, model, params = _load(tmp_path)
    rng = np.random.default_rng(2)
    ids, _ = fx.text_batch(rng, [5, 12, 3, 8, 6], 12, eos_id=98)  # padded to max length, pad attended
    x = fx.pixels(rng, 5, 20, 20)
    text = model.apply({"params": params}, {"input_ids": ids, "attention_mask": np.ones_like(ids)},
                       method="encode_text")
    image = model.apply({"params": params}, x, method="encode_image")
    with torch.no_grad():
        out = ref(input_ids=torch.from_numpy(ids), pixel_values=_nchw(x), return_loss=True)
    assert _cosines(text, out.text_embeds.numpy()).min() >= 0.99999
    assert _cosines(image, out.image_embeds.numpy()).min() >= 0.99999
    log_scale, bias = model.apply({"params": params}, method="logit_params")
    np.testing.assert_allclose([float(log_scale), float(bias)], [np.log(10.0), -3.0], rtol=1e-6)
    loss = siglip_loss(text, image, log_scale, bias)
    np.testing.assert_allclose(float(loss), float(out.loss), rtol=1e-5)


@pytest.mark.parametrize("save", [fx.save_vit, fx.save_clip, fx.save_siglip], ids=["vit", "clip", "siglip"])
def test_export_round_trips_through_transformers(tmp_path, save):
    """Params -> HF tensors -> the same file transformers wrote, and the config reads back equal."""
    save(tmp_path / "ref")
    config, params = hf.load_pretrained(tmp_path / "ref")
    written = hf.read_safetensors(tmp_path / "ref")
    exported = hf.tensors_from_params(params, config)
    family = family_for_config(config)
    import re

    kept = {k: v for k, v in written.items() if not any(re.match(p, k) for p in family.hf_ignored)}
    assert sorted(exported) == sorted(kept)
    for name, value in kept.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    assert family.config_cls.from_hf(config.to_hf()) == config


def test_sentence_transformers_export_refuses_image_families(tmp_path):
    config = hf.read_config(_saved_config(tmp_path))
    with pytest.raises(ValueError, match="export_pretrained writes sentence-transformers text folders"):
        hf.export_pretrained(tmp_path / "out", config, {}, tmp_path)


def _saved_config(folder):
    import json

    (folder / "config.json").write_text(json.dumps({"model_type": "vit", "image_size": [16, 24], "patch_size": 8,
                                                    "hidden_size": 32, "num_attention_heads": 4}))
    return folder

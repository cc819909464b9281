"""Encoder.encode / encode_images on image-text folders against transformers end to end
(tokenizer, preprocessing, batching, pooling and projection). Tolerance: feature cosine >= 0.99999
and rtol 1e-4 on unnormalised features (float32 both sides; observed ~1e-6)."""
import numpy as np
import pytest

import embedjax as ej
from tests.models import image_text_fixtures as fx

TEXTS = ["a photo of the digit three", "cat", "a big blurry dog", "the digit zero", "a small photo of a cat dog"]


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 27, 33, 3), dtype=np.uint8)


def _hf_pixels(processor, images):
    import torch

    return torch.from_numpy(np.asarray(processor(list(images), return_tensors="np")["pixel_values"]))


def _assert_features(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    cos = np.sum(got * want, -1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
    assert cos.min() >= 0.99999
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    folder = tmp_path_factory.mktemp("clip")
    ref = fx.save_clip(folder, eos_token_id=98)
    fx.save_word_tokenizer(folder, bos=True)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 20}, crop_size={"height": 20, "width": 20})
    processor.save_pretrained(folder)
    return folder, ref, processor


def test_clip_encoder_matches_transformers(clip_dir):
    import torch
    from transformers import PreTrainedTokenizerFast

    folder, ref, processor = clip_dir
    enc = ej.Encoder.from_pretrained(folder)
    assert enc.dim == 16 and not enc.normalize
    tok = PreTrainedTokenizerFast.from_pretrained(folder)
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    images = _images(5)
    with torch.no_grad():
        want_text = ref.get_text_features(**batch).pooler_output.numpy()
        want_image = ref.get_image_features(pixel_values=_hf_pixels(processor, images)).pooler_output.numpy()
    _assert_features(enc.encode(TEXTS, batch_size=2), want_text)
    _assert_features(enc.encode_images(images, batch_size=3), want_image)
    from PIL import Image

    _assert_features(enc.encode_images([Image.fromarray(x) for x in images]), want_image)


def test_siglip_encoder_pads_text_to_max_length(tmp_path):
    import torch
    from transformers import PreTrainedTokenizerFast
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    ref = fx.save_siglip(tmp_path)
    fx.save_word_tokenizer(tmp_path, bos=False)
    processor = SiglipImageProcessorPil(size={"height": 20, "width": 20})
    processor.save_pretrained(tmp_path)
    enc = ej.Encoder.from_pretrained(tmp_path)
    assert enc.max_length == 12
    tok = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    ids = tok(TEXTS, padding="max_length", max_length=12, return_tensors="pt")["input_ids"]
    images = _images(3, seed=1)
    with torch.no_grad():  # SigLIP's processor gives no attention mask: the padding is attended
        want_text = ref.get_text_features(input_ids=ids).pooler_output.numpy()
        want_image = ref.get_image_features(pixel_values=_hf_pixels(processor, images)).pooler_output.numpy()
    _assert_features(enc.encode(TEXTS, batch_size=4), want_text)
    _assert_features(enc.encode_images(images), want_image)
    normed = ej.Encoder.from_pretrained(tmp_path, normalize=True).encode_images(images)
    np.testing.assert_allclose(np.linalg.norm(normed, axis=1), 1.0, rtol=1e-6)


def test_vit_encoder_embeds_images_only(tmp_path):
    import torch
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    ref = fx.save_vit(tmp_path, image_size=(16, 24), patch_size=8)
    processor = ViTImageProcessorPil(size={"height": 16, "width": 24})
    processor.save_pretrained(tmp_path)
    enc = ej.Encoder.from_pretrained(tmp_path)
    images = _images(3, seed=2)
    with torch.no_grad():
        want = ref(pixel_values=_hf_pixels(processor, images)).pooler_output.numpy()
    _assert_features(enc.encode_images(images), want)
    with pytest.raises(ValueError, match="embeds images only; use encode_images"):
        enc.encode(["a cat"])


@pytest.mark.parametrize("images, error, message", [
    (np.zeros((2, 20, 20, 3), np.float32), ValueError, "dtype float32; images must be uint8"),
    (np.zeros((2, 20, 20, 4), np.uint8), ValueError, "has 4 channels"),
    (np.zeros((20, 20, 3), np.uint8), ValueError, r"pass a uint8 batch \[N, H, W, 3\]"),
    (np.zeros((2, 3, 20, 20), np.uint8), ValueError, "has 20 channels"),
])
def test_encode_images_rejects_bad_images(clip_dir, images, error, message):
    enc = ej.Encoder.from_pretrained(clip_dir[0])
    with pytest.raises(error, match=message):
        enc.encode_images(images)


def test_text_encoder_has_no_image_tower(minilm_dir):
    enc = ej.Encoder.from_pretrained(minilm_dir)
    with pytest.raises(ValueError, match="has no image tower"):
        enc.encode_images(np.zeros((1, 8, 8, 3), np.uint8))

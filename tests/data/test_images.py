"""Image preprocessing against transformers' PIL image processors, and bad-input errors."""
import numpy as np
import pytest

from embedjax.data.images import ImageProcessor, as_images


def _processors():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    return {
        "clip": CLIPImageProcessorPil(size={"shortest_edge": 20}, crop_size={"height": 18, "width": 18}),
        "siglip": SiglipImageProcessorPil(size={"height": 16, "width": 16}),
        "vit": ViTImageProcessorPil(size={"height": 16, "width": 24}, do_convert_rgb=True),  # bilinear, non-square
    }


@pytest.mark.parametrize("name", ["clip", "siglip", "vit"])
def test_pixels_match_transformers_processor(tmp_path, name):
    from PIL import Image

    reference = _processors()[name]
    reference.save_pretrained(tmp_path)
    ours = ImageProcessor.from_folder(tmp_path)
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (37, 23, 3), dtype=np.uint8), rng.integers(0, 256, (23, 41, 3), dtype=np.uint8)]
    pil = [Image.fromarray(rng.integers(0, 256, (29, 31), dtype=np.uint8), mode="L"),  # grey: converted to RGB
           Image.fromarray(rng.integers(0, 256, (30, 30, 4), dtype=np.uint8), mode="RGBA")]
    for images in (arrays, pil):
        want = np.asarray(reference(images, return_tensors="np")["pixel_values"]).transpose(0, 2, 3, 1)
        got = ours(images)
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert ours.output_size == want.shape[1:3]


def test_batch_array_equals_list_of_arrays():
    proc = ImageProcessor.from_dict({"size": {"height": 8, "width": 8}})
    batch = np.random.default_rng(1).integers(0, 256, (3, 12, 10, 3), dtype=np.uint8)
    np.testing.assert_array_equal(proc(batch), proc(list(batch)))


@pytest.mark.parametrize("images, message", [
    (np.zeros((2, 8, 8, 3), np.float32), "dtype float32"),
    (np.zeros((2, 8, 8, 4), np.uint8), "4 channels"),
    (np.zeros((2, 8, 8, 1), np.uint8), "1 channels"),
    (np.zeros((8, 8, 3), np.uint8), r"shape \(8, 8, 3\); pass a uint8 batch"),
    (np.zeros((2, 3, 8, 8), np.uint8), "8 channels"),  # channels-first
    ([np.zeros((8, 8), np.uint8)], r"images\[0\] has shape \(8, 8\)"),
    ([np.zeros((8, 8, 3), np.int64)], r"images\[0\] has dtype int64"),
    ("cat.png", "must be a uint8 array"),
])
def test_bad_images_get_clear_errors(images, message):
    with pytest.raises((ValueError, TypeError), match=message):
        as_images(images)


def test_single_pil_image_must_be_wrapped():
    from PIL import Image

    with pytest.raises(TypeError, match=r"pass a list of images: \[image\]"):
        as_images(Image.new("RGB", (4, 4)))

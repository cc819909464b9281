"""The image-caption ArrayRecord builder and its grain decoding, on real images (scikit-learn's
digit scans written as PNG, JPEG and palette files) and broken folders."""
import json

import numpy as np
import pytest

from embedjax.data.image_builders import image_caption_dataset, prepare_image_captions
from embedjax.data.images import ImageProcessor


def _digits(n):
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images[:n] * (255 / 16)).round().astype(np.uint8)
    return images, digits.target[:n]


def _write_folder(folder, n=5):
    from PIL import Image

    images, labels = _digits(n)
    rows = []
    for i, (image, label) in enumerate(zip(images, labels)):
        rgb = np.repeat(image[..., None], 3, -1)
        if i % 3 == 0:
            name, pil = f"img/{i}.png", Image.fromarray(rgb)
        elif i % 3 == 1:
            name, pil = f"img/{i}.bmp", Image.fromarray(image, mode="L")  # grey: decoded to RGB
        else:
            name, pil = f"img/{i}.gif", Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE)  # palette, exact for <= 256 greys
        (folder / "img").mkdir(exist_ok=True)
        pil.save(folder / name)
        rows.append({"image": name, "caption": f"a photo of the digit {label}"})
    (folder / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return rgb_images(images), labels


def rgb_images(images):
    return np.repeat(images[..., None], 3, -1)


def test_folder_round_trips_through_array_record_and_grain(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    images, labels = _write_folder(src)
    builder = prepare_image_captions(src, cache_dir=tmp_path / "cache")
    processor = ImageProcessor.from_dict({"size": {"height": 8, "width": 8}, "image_mean": 0.5, "image_std": 0.5})
    dataset = image_caption_dataset(builder, processor)
    assert len(dataset) == 5
    seen = set()
    for element in dataset:
        i = int(element["image_path"].split("/")[1].split(".")[0])
        seen.add(i)
        assert element["caption"] == f"a photo of the digit {labels[i]}"
        np.testing.assert_allclose(element["pixels"], processor([images[i]])[0], atol=1e-6)  # lossless formats
    assert seen == set(range(5))
    shuffled = [e["caption"] for e in image_caption_dataset(builder, processor, seed=3)]
    assert sorted(shuffled) == sorted(dataset[i]["caption"] for i in range(5))
    again = prepare_image_captions(src, cache_dir=tmp_path / "cache")  # prepared once, read again
    assert again.info.splits["train"].num_examples == 5


def test_broken_folders_name_the_line(tmp_path):
    (tmp_path / "captions.jsonl").write_text('{"image": "missing.png", "caption": "a cat"}\n')
    with pytest.raises(ValueError, match=r"captions.jsonl:1: image file 'missing.png' does not exist"):
        prepare_image_captions(tmp_path, cache_dir=tmp_path / "cache")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    (tmp_path / "captions.jsonl").write_text('\n{"image": "bad.png", "caption": "a cat"}\n')
    with pytest.raises(ValueError, match=r"captions.jsonl:2: 'bad.png' is not an image PIL can read"):
        prepare_image_captions(tmp_path, cache_dir=tmp_path / "cache2")
    (tmp_path / "captions.jsonl").write_text('{"image": "bad.png"}\n')
    with pytest.raises(ValueError, match='needs string "image" and "caption" fields'):
        prepare_image_captions(tmp_path, cache_dir=tmp_path / "cache3")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="has no captions.jsonl"):
        prepare_image_captions(empty, cache_dir=tmp_path / "cache4")

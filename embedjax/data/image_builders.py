"""A TFDS builder of image-caption pairs from a local folder, and its grain decoding.

The source is a folder holding the images and a ``captions.jsonl`` with one pair per line::

    {"image": "relative/path.png", "caption": "a photo of the digit three"}

`prepare_image_captions` writes it once as an ArrayRecord dataset (no TensorFlow needed: the
image file's bytes are stored as they are, checked to open with PIL at build time, so a broken
file or a missing path is reported with its line number then, not mid-training).
`image_caption_dataset` reads it back as a ``grain.MapDataset`` whose records are decoded by a
grain ``MapTransform`` into uint8 [H, W, 3] and preprocessed by an
`embedjax.data.images.ImageProcessor` into float32 pixels: ``{"pixels", "caption", "image_path"}``.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import pathlib

import grain
import numpy as np
import tensorflow_datasets as tfds

from embedjax.data.builders import _fingerprint, _LocalSourceBuilder, default_cache_dir, resolve_source
from embedjax.data.images import ImageProcessor

CAPTIONS_FILE = "captions.jsonl"


@dataclasses.dataclass
class ImageFolderConfig(tfds.core.BuilderConfig):
    source: str = ""  # the folder holding captions.jsonl and the images


def read_caption_lines(folder: pathlib.Path):
    """``(line number, image path, caption)`` of every pair in ``folder/captions.jsonl``, checked."""
    path = folder / CAPTIONS_FILE
    if not path.is_file():
        raise ValueError(f"{folder} has no {CAPTIONS_FILE}: give a folder of images with a captions file "
                         '(one {"image": path, "caption": text} per line)')
    pairs = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where} is not valid JSON: {err}") from err
        if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not isinstance(row.get("caption"), str):
            raise ValueError(f'{where}: each line needs string "image" and "caption" fields')
        if not row["caption"].strip():
            raise ValueError(f"{where}: the caption is empty")
        image = (folder / row["image"]).resolve()
        if folder.resolve() not in image.parents:
            raise ValueError(f"{where}: image path {row['image']!r} leaves the folder")
        if not image.is_file():
            raise ValueError(f"{where}: image file {row['image']!r} does not exist")
        pairs.append((lineno, row["image"], row["caption"]))
    if not pairs:
        raise ValueError(f"{path} holds no pairs")
    return pairs


class ImageCaptions(_LocalSourceBuilder):
    """Image-caption pairs of a local folder: ``{"image_bytes", "caption", "image_path"}``."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image_bytes": tfds.features.Tensor(shape=(), dtype=np.object_),  # the file as stored
            "caption": tfds.features.Text(),
            "image_path": tfds.features.Text(),
        }))

    def _generate_examples(self):
        from PIL import Image

        folder = pathlib.Path(self.builder_config.source)
        for lineno, rel, caption in read_caption_lines(folder):
            data = (folder / rel).read_bytes()
            try:
                Image.open(io.BytesIO(data)).verify()
            except Exception as err:  # PIL raises several types for broken files
                raise ValueError(f"{folder / CAPTIONS_FILE}:{lineno}: {rel!r} is not an image PIL can read ({err})") \
                    from err
            yield lineno, {"image_bytes": data, "caption": caption, "image_path": rel}


def prepare_image_captions(source: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None):
    """Build (once per folder state) and return the `ImageCaptions` builder of ``source``."""
    folder = resolve_source(str(source))
    if not folder.is_dir():
        raise ValueError(f"image-caption source {str(folder)!r} is not a folder")
    config = ImageFolderConfig(name=f"images-{_fingerprint(folder)}", source=str(folder))
    builder = ImageCaptions(config=config, data_dir=str(cache_dir or default_cache_dir()), file_format="array_record")
    tfds.disable_progress_bar()
    builder.download_and_prepare()
    return builder


class DecodeImage(grain.transforms.Map):
    """A stored record -> ``{"image": uint8 [H, W, 3], "caption", "image_path"}`` (any PIL mode made
    RGB, as the processor would)."""

    def map(self, record):
        from PIL import Image

        from embedjax.data.images import to_rgb

        with Image.open(io.BytesIO(record["image_bytes"])) as image:
            rgb = np.asarray(to_rgb(image))
        return {"image": rgb, "caption": _text(record["caption"]), "image_path": _text(record["image_path"])}


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class Preprocess(grain.transforms.Map):
    """``{"image", ...}`` -> ``{"pixels": float32 [H, W, 3], ...}`` with ``processor``."""

    def __init__(self, processor: ImageProcessor):
        self.processor = processor

    def map(self, element):
        rest = {k: v for k, v in element.items() if k != "image"}
        return {"pixels": self.processor.process_one(element["image"]), **rest}


def image_caption_dataset(builder, processor: ImageProcessor, *, seed: int | None = None) -> grain.MapDataset:
    """The prepared pairs as a grain dataset of ``{"pixels", "caption", "image_path"}``, shuffled by
    ``seed`` (None: the order TFDS stored them in)."""
    dataset = grain.MapDataset.source(builder.as_data_source()["train"])
    if seed is not None:
        dataset = dataset.shuffle(seed=seed)
    return dataset.map(DecodeImage()).map(Preprocess(processor))

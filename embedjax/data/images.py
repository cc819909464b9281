"""Image inputs: checking them and preprocessing them as a model folder's processor does.

`ImageProcessor.from_folder` reads ``preprocessor_config.json`` (transformers' CLIP, SigLIP and ViT
image processors) and applies, in NumPy/PIL, the same steps in the same order: convert to RGB
(transparency composited onto white), resize with the processor's PIL filter (``{"shortest_edge":
s}`` keeping the aspect ratio, or ``{"height", "width"}``), centre crop, rescale (to [0, 1]), normalise by mean and std. PIL is
used for resizing because ``jax.image.resize``'s bicubic is not PIL's: the pixels must match
what the model was trained on. Output: float32 [N, H, W, 3], channels last (the towers' layout).

`as_images` accepts uint8 arrays [N, H, W, 3] or a list of PIL images / uint8 [H, W, 3] arrays,
and rejects anything else with an error naming the problem.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import numpy as np

from embedjax.jsonfile import read_json_file

PIL_FILTERS = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}


def as_images(images) -> list:
    """uint8 [N, H, W, 3] or a list of PIL images / uint8 [H, W, 3] arrays -> a list of per-image
    inputs (PIL images or uint8 [H, W, 3]); a wrong shape, dtype or channel count is a ValueError."""
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ValueError(f"images has shape {images.shape}; pass a uint8 batch [N, H, W, 3] (one image: "
                             "images[None])")
        _check_array(images, "images", batch=True)
        return list(images)
    if _is_pil(images):
        raise TypeError("images is a single PIL image; pass a list of images: [image]")
    if not isinstance(images, (list, tuple)):
        raise TypeError(f"images must be a uint8 array [N, H, W, 3] or a list of PIL images or uint8 [H, W, 3] "
                        f"arrays, got {type(images).__name__}")
    out = []
    for i, image in enumerate(images):
        if _is_pil(image):
            out.append(image)
        elif isinstance(image, np.ndarray):
            if image.ndim != 3:
                raise ValueError(f"images[{i}] has shape {image.shape}; each array image must be [H, W, 3]")
            _check_array(image, f"images[{i}]", batch=False)
            out.append(image)
        else:
            raise TypeError(f"images[{i}] is {type(image).__name__}; pass PIL images or uint8 [H, W, 3] arrays")
    return out


def _check_array(x: np.ndarray, name: str, *, batch: bool) -> None:
    layout = "[N, H, W, 3]" if batch else "[H, W, 3]"
    if x.dtype != np.uint8:
        raise ValueError(f"{name} has dtype {x.dtype}; images must be uint8 {layout} (0-255). Convert float images "
                         "with (x * 255).round().astype(np.uint8)")
    if x.shape[-1] != 3:
        raise ValueError(f"{name} has {x.shape[-1]} channels (shape {x.shape}); images must be RGB {layout}, "
                         "channels last. Grey images: np.repeat(x[..., None], 3, -1); RGBA: drop the alpha")
    if 0 in x.shape:
        raise ValueError(f"{name} has shape {x.shape}: an image must have at least one pixel")


def _is_pil(x) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        return False
    return isinstance(x, Image.Image)


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
    """The preprocessing of ``preprocessor_config.json`` (field names as transformers writes them)."""

    size: tuple  # (("height", h), ("width", w)) or (("shortest_edge", s),) as sorted items
    resample: int = 3
    do_resize: bool = True
    do_center_crop: bool = False
    crop_size: tuple | None = None  # (height, width)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)
    do_convert_rgb: bool = True

    def __post_init__(self):
        size = dict(self.size)
        if set(size) not in ({"height", "width"}, {"shortest_edge"}):
            raise ValueError(f"preprocessor size {size}: embedjax implements {{'height', 'width'}} or "
                             "{'shortest_edge'}")
        if self.resample not in PIL_FILTERS:
            raise ValueError(f"resample={self.resample} is not a PIL filter code {sorted(PIL_FILTERS)}")
        if self.do_center_crop and self.crop_size is None:
            raise ValueError("do_center_crop needs crop_size")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("image_mean and image_std need one value per RGB channel")

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "ImageProcessor":
        path = pathlib.Path(folder) / "preprocessor_config.json"
        return cls.from_dict(read_json_file(path, missing="an image model folder needs its preprocessor_config.json"))

    @classmethod
    def from_dict(cls, cfg: dict) -> "ImageProcessor":
        size = cfg.get("size", {"height": 224, "width": 224})
        if isinstance(size, int):
            size = {"height": size, "width": size} if cfg.get("default_to_square", True) else {"shortest_edge": size}
        crop = cfg.get("crop_size")
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}

        def triple(v):
            return tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else [v] * 3))

        return cls(size=tuple(sorted(size.items())), resample=int(cfg.get("resample", 3)),
                   do_resize=bool(cfg.get("do_resize", True)), do_center_crop=bool(cfg.get("do_center_crop", False)),
                   crop_size=(crop["height"], crop["width"]) if crop else None,
                   do_rescale=bool(cfg.get("do_rescale", True)),
                   rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
                   do_normalize=bool(cfg.get("do_normalize", True)),
                   image_mean=triple(cfg.get("image_mean", 0.5)), image_std=triple(cfg.get("image_std", 0.5)),
                   do_convert_rgb=bool(cfg.get("do_convert_rgb", True)))

    def to_dict(self) -> dict[str, Any]:
        """The ``preprocessor_config.json`` fields (transformers reads them back)."""
        out = {"size": dict(self.size), "resample": self.resample, "do_resize": self.do_resize,
               "do_center_crop": self.do_center_crop, "do_rescale": self.do_rescale,
               "rescale_factor": self.rescale_factor, "do_normalize": self.do_normalize,
               "image_mean": list(self.image_mean), "image_std": list(self.image_std),
               "do_convert_rgb": self.do_convert_rgb}
        if self.crop_size:
            out["crop_size"] = {"height": self.crop_size[0], "width": self.crop_size[1]}
        return out

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every processed image, or None when it depends on the input."""
        if self.do_center_crop:
            return tuple(self.crop_size)
        size = dict(self.size)
        return (size["height"], size["width"]) if self.do_resize and "height" in size else None

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize step (transformers' rule for ``shortest_edge``)."""
        size = dict(self.size)
        if "height" in size:
            return size["height"], size["width"]
        s = size["shortest_edge"]
        if width <= height:
            return int(s * height / width), s
        return s, int(s * width / height)

    def process_one(self, image) -> np.ndarray:
        """One PIL image or uint8 [H, W, 3] -> float32 [H', W', 3]."""
        from PIL import Image

        pil = image if _is_pil(image) else Image.fromarray(image)
        if self.do_convert_rgb and pil.mode != "RGB":
            pil = to_rgb(pil)
        if self.do_resize:
            h, w = self.resized_shape(pil.height, pil.width)
            pil = pil.resize((w, h), resample=getattr(Image.Resampling, PIL_FILTERS[self.resample]), reducing_gap=None)
        x = np.asarray(pil)
        if x.ndim != 3 or x.shape[-1] != 3:
            raise ValueError(f"an image has mode {pil.mode!r} (shape {x.shape}); it must be RGB (the folder's "
                             "processor has do_convert_rgb=false)")
        if self.do_center_crop:
            x = center_crop(x, *self.crop_size)
        out = x.astype(np.float64) * self.rescale_factor if self.do_rescale else x
        out = out.astype(np.float32)
        if self.do_normalize:
            out = (out - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return out

    def __call__(self, images) -> np.ndarray:
        """Images (see `as_images`) -> float32 [N, H, W, 3]; all must come out the same size."""
        items = as_images(images)
        processed = [self.process_one(im) for im in items]
        shapes = {p.shape for p in processed}
        if len(shapes) > 1:
            raise ValueError(f"processed images have different shapes {sorted(shapes)}; the folder's processor does "
                             "not fix the size (shortest_edge without a crop): resize them to one size first")
        if not processed:
            return np.zeros((0, *(self.output_size or (0, 0)), 3), np.float32)
        return np.stack(processed)


def to_rgb(pil):
    """An RGB copy of a PIL image; transparent images are composited onto white first (as
    transformers does: dropping the alpha channel would expose arbitrary colours)."""
    from PIL import Image

    if "A" in pil.getbands() or pil.info.get("transparency") is not None:
        rgba = pil.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return pil.convert("RGB")


def center_crop(x_hwc: np.ndarray, height: int, width: int) -> np.ndarray:
    """The central height x width window (transformers' offsets: floor of half the excess)."""
    h, w = x_hwc.shape[:2]
    if height > h or width > w:
        raise ValueError(f"centre crop {height}x{width} is larger than the resized image {h}x{w}; the folder's "
                         "preprocessor_config.json is inconsistent")
    top, left = (h - height) // 2, (w - width) // 2
    return x_hwc[top:top + height, left:left + width]


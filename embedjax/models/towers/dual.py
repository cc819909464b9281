"""Image-text dual encoders (CLIP, SigLIP): a text tower and an image tower, each pooled and
projected into one shared space, plus the learned logit scale (and SigLIP's bias).

``DualEncoder(config)`` exposes ``encode_text(tokens) -> [B, P]`` and ``encode_image(pixels_bhwc)
-> [B, P]`` (Linen ``method=``), ``logit_params() -> (log_scale, bias)`` and ``__call__(tokens,
pixels)``, which touches every parameter (``init``). Features come unnormalised, as transformers'
``get_text_features`` / ``get_image_features`` return them. The params tree is::

    {"text": TextTower, "vision": VisionTower, "text_projection": {"kernel", ["bias"]},
     ["image_projection": {"kernel"}], "logit": {"log_scale", ["bias"]}}

Each family (`towers.clip`, `towers.siglip`) writes a config subclass of `DualConfig` (reading and
writing its config.json) and its HF table; the per-layer rows, the same for both, come from
`encoder_layer_rules`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from embedjax.convert.tables import TensorRule
from embedjax.models import layers
from embedjax.models.towers.text import TextSpec, TextTower
from embedjax.models.towers.vision import VisionSpec, VisionTower

Dtype = Any


@dataclasses.dataclass(frozen=True)
class DualConfig:
    """Fields shared by the dual-encoder families; subclasses set ``model_type`` and the HF mapping."""

    text: TextSpec
    vision: VisionSpec
    projection_dim: int
    text_projection_bias: bool = False
    image_projection: bool = True  # False: the image tower's pooled vector is the feature (SigLIP)
    logit_bias: bool = False
    logit_scale_init: float = float(np.log(1 / 0.07))  # log of the scale (CLIP's init: temperature 0.07)
    logit_bias_init: float = 0.0
    model_type: str = ""
    attention_impl: str = "auto"  # accepted for the Encoder's options; the towers use the default

    def __post_init__(self):
        if isinstance(self.text, dict):
            object.__setattr__(self, "text", TextSpec(**self.text))
        if isinstance(self.vision, dict):
            object.__setattr__(self, "vision", VisionSpec(**self.vision))
        if not self.image_projection and self.vision.hidden_size != self.projection_dim:
            raise ValueError(f"without an image projection the vision width {self.vision.hidden_size} must equal "
                             f"the text projection's {self.projection_dim}")

    # The fields every family config has (embedjax.models.registry), for the text side.
    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.projection_dim

    @property
    def num_layers(self) -> int:
        return self.text.num_layers

    @property
    def max_position_embeddings(self) -> int:
        return self.text.max_position_embeddings

    @property
    def max_supported_length(self) -> int:
        return self.text.max_position_embeddings


class LogitParams(nn.Module):
    """The learned logit scale (as its log) and, optionally, the logit bias: ``() -> (log_scale, bias)``."""

    log_scale_init: float
    bias_init: float | None  # None: no bias (returns 0.0)

    @nn.compact
    def __call__(self):
        log_scale = self.param("log_scale", nn.initializers.constant(self.log_scale_init), (), jnp.float32)
        if self.bias_init is None:
            return log_scale, jnp.float32(0.0)
        return log_scale, self.param("bias", nn.initializers.constant(self.bias_init), (), jnp.float32)


class DualEncoder(nn.Module):
    config: DualConfig
    dtype: Dtype = jnp.float32
    remat: str = "none"
    scan_unroll: int = 1

    def setup(self):
        cfg = self.config
        self.text = TextTower(cfg.text, self.dtype, self.remat, self.scan_unroll)
        self.vision = VisionTower(cfg.vision, self.dtype, self.remat, self.scan_unroll)
        init = nn.initializers.normal(cfg.text.initializer_range)
        self.text_projection = nn.Dense(cfg.projection_dim, use_bias=cfg.text_projection_bias, dtype=self.dtype,
                                        kernel_init=layers.logical(init, ("embed", None)),
                                        bias_init=layers.logical(nn.initializers.zeros, (None,)))
        if cfg.image_projection:
            self.image_projection = nn.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype,
                                             kernel_init=layers.logical(init, ("embed", None)))
        self.logit = LogitParams(cfg.logit_scale_init, cfg.logit_bias_init if cfg.logit_bias else None)

    def encode_text(self, tokens, *, deterministic: bool = True):
        """Token batch -> float32 [B, P] text features."""
        _, pooled_bd = self.text(tokens, deterministic=deterministic)
        return self.text_projection(pooled_bd.astype(self.dtype)).astype(jnp.float32)

    def encode_image(self, pixels_bhwc, *, deterministic: bool = True):
        """Preprocessed pixels [B, H, W, C] -> float32 [B, P] image features."""
        _, pooled_bd = self.vision(pixels_bhwc, deterministic=deterministic)
        if self.config.image_projection:
            pooled_bd = self.image_projection(pooled_bd.astype(self.dtype))
        return pooled_bd.astype(jnp.float32)

    def logit_params(self):
        """``(log_scale, bias)`` float32 scalars (bias 0 for families without one)."""
        return self.logit()

    def __call__(self, tokens, pixels_bhwc, *, deterministic: bool = True):
        return (self.encode_text(tokens, deterministic=deterministic),
                self.encode_image(pixels_bhwc, deterministic=deterministic), self.logit_params())


def example_inputs(config: DualConfig) -> dict:
    """One text and one blank image of the config's shapes (``module.init(key, **example_inputs)``)."""
    h, w = config.vision.image_size
    return {"tokens": {"input_ids": jnp.ones((1, 4), jnp.int32), "attention_mask": jnp.ones((1, 4), jnp.int32)},
            "pixels_bhwc": jnp.zeros((1, h, w, config.vision.num_channels), jnp.float32)}


def encoder_layer_rules(hf_prefix: str, flax_root: tuple[str, ...], hidden: int, width: int, heads: int,
                        num_layers: int) -> list[TensorRule]:
    """Rows for ``{hf_prefix}encoder.layers.{i}.*`` (CLIP / SigLIP naming: ``self_attn.{q,k,v,out}_proj``,
    ``layer_norm1/2``, ``mlp.fc1/fc2``) onto the scanned ``layers`` of ``flax_root``."""
    d, f, h = hidden, width, heads
    root = (*flax_root, "layers")
    rules = []
    for i in range(num_layers):
        hf = f"{hf_prefix}encoder.layers.{i}."
        for proj, short in (("q", "q"), ("k", "k"), ("v", "v")):
            rules += [
                TensorRule(f"{hf}self_attn.{proj}_proj.weight", (*root, "attention", short, "kernel"), "heads_in",
                           (d, d), i, h),
                TensorRule(f"{hf}self_attn.{proj}_proj.bias", (*root, "attention", short, "bias"), "heads_bias",
                           (d,), i, h),
            ]
        rules += [
            TensorRule(f"{hf}self_attn.out_proj.weight", (*root, "attention", "o", "kernel"), "heads_out", (d, d), i, h),
            TensorRule(f"{hf}self_attn.out_proj.bias", (*root, "attention", "o", "bias"), "copy", (d,), i),
            TensorRule(f"{hf}layer_norm1.weight", (*root, "attention_norm", "scale"), "copy", (d,), i),
            TensorRule(f"{hf}layer_norm1.bias", (*root, "attention_norm", "bias"), "copy", (d,), i),
            TensorRule(f"{hf}mlp.fc1.weight", (*root, "mlp", "mlp_in", "kernel"), "transpose", (f, d), i),
            TensorRule(f"{hf}mlp.fc1.bias", (*root, "mlp", "mlp_in", "bias"), "copy", (f,), i),
            TensorRule(f"{hf}mlp.fc2.weight", (*root, "mlp", "mlp_out", "kernel"), "transpose", (d, f), i),
            TensorRule(f"{hf}mlp.fc2.bias", (*root, "mlp", "mlp_out", "bias"), "copy", (d,), i),
            TensorRule(f"{hf}layer_norm2.weight", (*root, "mlp_norm", "scale"), "copy", (d,), i),
            TensorRule(f"{hf}layer_norm2.bias", (*root, "mlp_norm", "bias"), "copy", (d,), i),
        ]
    return rules


def norm_rules(hf_name: str, flax_path: tuple[str, ...], width: int) -> list[TensorRule]:
    """A LayerNorm's weight and bias."""
    return [TensorRule(f"{hf_name}.weight", (*flax_path, "scale"), "copy", (width,)),
            TensorRule(f"{hf_name}.bias", (*flax_path, "bias"), "copy", (width,))]


def text_tower_rules(config: DualConfig) -> list[TensorRule]:
    """``text_model.*``: embeddings, layers and the final LayerNorm."""
    t = config.text
    return [
        TensorRule("text_model.embeddings.token_embedding.weight", ("text", "token_embedding", "embedding"), "copy",
                   (t.vocab_size, t.hidden_size)),
        TensorRule("text_model.embeddings.position_embedding.weight", ("text", "position_embedding"), "copy",
                   (t.max_position_embeddings, t.hidden_size)),
        *encoder_layer_rules("text_model.", ("text",), t.hidden_size, t.intermediate_size, t.num_heads, t.num_layers),
        *norm_rules("text_model.final_layer_norm", ("text", "final_norm"), t.hidden_size),
    ]


def vision_layer_rules(config: DualConfig) -> list[TensorRule]:
    """``vision_model.encoder.*`` and ``vision_model.post_layernorm``."""
    v = config.vision
    return [*encoder_layer_rules("vision_model.", ("vision",), v.hidden_size, v.intermediate_size, v.num_heads,
                                 v.num_layers),
            *norm_rules("vision_model.post_layernorm", ("vision", "post_norm"), v.hidden_size)]


HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                  "gelu_new": "gelu_tanh"}
ACTIVATION_NAMES = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}


def activation_from_hf(name: str, where: str) -> str:
    """transformers' ``hidden_act`` -> the name `embedjax.models.layers` uses."""
    if name not in HF_ACTIVATIONS:
        raise ValueError(f"{where} has hidden_act={name!r}; implemented: {sorted(HF_ACTIVATIONS)}")
    return HF_ACTIVATIONS[name]


def tower_fields_to_hf(spec) -> dict:
    """The config.json keys both tower kinds share."""
    return {"hidden_size": spec.hidden_size, "num_hidden_layers": spec.num_layers,
            "num_attention_heads": spec.num_heads, "intermediate_size": spec.intermediate_size,
            "hidden_act": ACTIVATION_NAMES[spec.activation], "layer_norm_eps": spec.layer_norm_eps,
            "attention_dropout": 0.0}

"""ViT (Dosovitskiy et al. 2021) as transformers' ``ViTModel`` holds it: an image-only family.

Patch convolution with bias, a class token, learned positions over a possibly non-square patch
grid (``image_size`` as [H, W]), pre-LN blocks with exact GELU, the final ``layernorm`` over all
tokens, and (``add_pooling_layer``, present in the checkpoint) the pooler ``tanh(dense(CLS))``.
``encode_image`` returns the pooler output when the model has a pooler, else the normed class
token; ``__call__`` returns ``(last_hidden_state_bnd, pooled_bd or None)`` as transformers does.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from embedjax.convert.tables import TensorRule
from embedjax.models import layers
from embedjax.models.registry import Family, TokenizerNeeds
from embedjax.models.towers import dual
from embedjax.models.towers.vision import VisionSpec, VisionTower

Dtype = Any


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    vision: VisionSpec
    pooler: bool = True
    model_type: str = "vit"
    attention_impl: str = "auto"

    def __post_init__(self):
        if isinstance(self.vision, dict):
            object.__setattr__(self, "vision", VisionSpec(**self.vision))
        if self.model_type != "vit":
            raise ValueError(f"ViTConfig has model_type={self.model_type!r}; it reads 'vit' configs")
        v = self.vision
        if v.pooling != "cls" or not v.class_token or not v.patch_bias or v.pre_norm:
            raise ValueError("a transformers ViT has a class token, a patch bias, no pre-norm and CLS pooling")

    # The fields every family config has (embedjax.models.registry); ViT reads no text.
    vocab_size = 0
    max_position_embeddings = 0
    max_supported_length = 0

    @property
    def hidden_size(self) -> int:
        return self.vision.hidden_size

    @property
    def num_layers(self) -> int:
        return self.vision.num_layers

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **options) -> "ViTConfig":
        if not hf.get("qkv_bias", True):
            raise ValueError("config.json has qkv_bias=false; embedjax's ViT has q/k/v biases")
        if hf.get("pooler_act", "tanh") != "tanh" or hf.get("pooler_output_size", hf.get("hidden_size")) != \
                hf.get("hidden_size"):
            raise ValueError("config.json's pooler is not tanh(dense(hidden -> hidden)); only that is implemented")
        size = hf.get("image_size", 224)
        vision = VisionSpec(
            hidden_size=hf.get("hidden_size", 768), num_layers=hf.get("num_hidden_layers", 12),
            num_heads=hf.get("num_attention_heads", 12), intermediate_size=hf.get("intermediate_size", 3072),
            image_size=tuple(size) if isinstance(size, (list, tuple)) else size, patch_size=hf.get("patch_size", 16),
            num_channels=hf.get("num_channels", 3),
            activation=dual.activation_from_hf(hf.get("hidden_act", "gelu"), "config.json"),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12), class_token=True, patch_bias=True, pre_norm=False,
            pooling="cls", initializer_range=hf.get("initializer_range", 0.02))
        return FAMILY.configure(cls(vision=vision, pooler=hf.get("embedjax_pooler", True)), **options)

    def to_hf(self) -> dict[str, Any]:
        v = self.vision
        return {"architectures": ["ViTModel"], "model_type": "vit", **dual.tower_fields_to_hf(v),
                "image_size": list(v.image_size), "patch_size": v.patch_size, "num_channels": v.num_channels,
                "qkv_bias": True, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
                "initializer_range": v.initializer_range, "pooler_act": "tanh", "pooler_output_size": v.hidden_size,
                "embedjax_pooler": self.pooler}


class ViTModel(nn.Module):
    config: ViTConfig
    dtype: Dtype = jnp.float32
    remat: str = "none"
    scan_unroll: int = 1

    def setup(self):
        cfg = self.config
        self.vision = VisionTower(cfg.vision, self.dtype, self.remat, self.scan_unroll)
        if cfg.pooler:
            init = nn.initializers.normal(cfg.vision.initializer_range)
            self.pooler = nn.Dense(cfg.vision.hidden_size, dtype=self.dtype,
                                   kernel_init=layers.logical(init, ("embed", None)),
                                   bias_init=layers.logical(nn.initializers.zeros, (None,)))

    def __call__(self, pixels_bhwc, *, deterministic: bool = True):
        tokens_bnd, cls_bd = self.vision(pixels_bhwc, deterministic=deterministic)
        pooled = jnp.tanh(self.pooler(cls_bd.astype(self.dtype))).astype(jnp.float32) if self.config.pooler else None
        return tokens_bnd, pooled

    def encode_image(self, pixels_bhwc, *, deterministic: bool = True):
        """Preprocessed pixels [B, H, W, C] -> float32 [B, D]: the pooler output, else the class token."""
        tokens_bnd, pooled_bd = self(pixels_bhwc, deterministic=deterministic)
        return tokens_bnd[:, 0] if pooled_bd is None else pooled_bd


def example_inputs(config: ViTConfig) -> dict:
    h, w = config.vision.image_size
    return {"pixels_bhwc": jnp.zeros((1, h, w, config.vision.num_channels), jnp.float32)}


def hf_table(config: ViTConfig) -> list[TensorRule]:
    """transformers ``ViTModel`` names (as ``save_pretrained`` writes them) <-> embedjax paths."""
    v = config.vision
    d, f, h = v.hidden_size, v.intermediate_size, v.num_heads
    root = ("vision", "layers")
    rules = [
        TensorRule("embeddings.cls_token", ("vision", "class_embedding"), "squeeze", (1, 1, d)),
        TensorRule("embeddings.position_embeddings", ("vision", "position_embedding"), "squeeze",
                   (1, v.num_positions, d)),
        TensorRule("embeddings.patch_embeddings.projection.weight", ("vision", "patch_embedding", "kernel"), "conv",
                   (d, v.num_channels, v.patch_size, v.patch_size)),
        TensorRule("embeddings.patch_embeddings.projection.bias", ("vision", "patch_embedding", "bias"), "copy", (d,)),
    ]
    for i in range(v.num_layers):
        hf = f"encoder.layer.{i}."
        for proj, short in (("query", "q"), ("key", "k"), ("value", "v")):
            rules += [
                TensorRule(f"{hf}attention.attention.{proj}.weight", (*root, "attention", short, "kernel"), "heads_in",
                           (d, d), i, h),
                TensorRule(f"{hf}attention.attention.{proj}.bias", (*root, "attention", short, "bias"), "heads_bias",
                           (d,), i, h),
            ]
        rules += [
            TensorRule(f"{hf}attention.output.dense.weight", (*root, "attention", "o", "kernel"), "heads_out", (d, d),
                       i, h),
            TensorRule(f"{hf}attention.output.dense.bias", (*root, "attention", "o", "bias"), "copy", (d,), i),
            TensorRule(f"{hf}layernorm_before.weight", (*root, "attention_norm", "scale"), "copy", (d,), i),
            TensorRule(f"{hf}layernorm_before.bias", (*root, "attention_norm", "bias"), "copy", (d,), i),
            TensorRule(f"{hf}intermediate.dense.weight", (*root, "mlp", "mlp_in", "kernel"), "transpose", (f, d), i),
            TensorRule(f"{hf}intermediate.dense.bias", (*root, "mlp", "mlp_in", "bias"), "copy", (f,), i),
            TensorRule(f"{hf}output.dense.weight", (*root, "mlp", "mlp_out", "kernel"), "transpose", (d, f), i),
            TensorRule(f"{hf}output.dense.bias", (*root, "mlp", "mlp_out", "bias"), "copy", (d,), i),
            TensorRule(f"{hf}layernorm_after.weight", (*root, "mlp_norm", "scale"), "copy", (d,), i),
            TensorRule(f"{hf}layernorm_after.bias", (*root, "mlp_norm", "bias"), "copy", (d,), i),
        ]
    rules += dual.norm_rules("layernorm", ("vision", "post_norm"), d)
    if config.pooler:
        rules += [TensorRule("pooler.dense.weight", ("pooler", "kernel"), "transpose", (d, d)),
                  TensorRule("pooler.dense.bias", ("pooler", "bias"), "copy", (d,))]
    return rules


FAMILY = Family(
    name="vit",
    hf_model_types=("vit",),
    config_cls=ViTConfig,
    module_cls=ViTModel,
    hf_table=hf_table,
    tokenizer=TokenizerNeeds(),
    hf_ignored=(r"embeddings\.position_ids", r"classifier\."),  # ViTForImageClassification's head
    hf_stripped_prefixes=("vit.",),
    modalities=("image",),
    features=True,
    example_inputs=example_inputs,
)

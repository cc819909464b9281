"""SigLIP (Zhai et al. 2023) as transformers' ``SiglipModel`` holds it, on the dual-encoder seam.

Text: bidirectional pre-LN transformer, tanh-GELU, texts padded to max length and attending to
the padding, pooled at the last position, then a linear ``head`` (with bias). Image: ViT without
a class token (patch convolution with bias), ``post_layernorm`` over all tokens, then the
attention-pooling (MAP) head; its output is the feature. ``logit_scale`` (log of the scale) and
``logit_bias`` are learned scalars (stored as [1] tensors).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from embedjax.convert.tables import TensorRule
from embedjax.models.registry import Family, TokenizerNeeds
from embedjax.models.towers import dual
from embedjax.models.towers.text import TextSpec
from embedjax.models.towers.vision import VisionSpec


@dataclasses.dataclass(frozen=True)
class SiglipConfig(dual.DualConfig):
    model_type: str = "siglip"
    text_projection_bias: bool = True
    image_projection: bool = False
    logit_bias: bool = True
    # The paper's initialisation (scale 10, bias -10); transformers initialises both at 0.
    logit_scale_init: float = math.log(10.0)
    logit_bias_init: float = -10.0

    def __post_init__(self):
        super().__post_init__()
        if self.model_type != "siglip":
            raise ValueError(f"SiglipConfig has model_type={self.model_type!r}; it reads 'siglip' configs")
        if self.text.pooling != "last" or self.text.mask != "bidirectional":
            raise ValueError("a SigLIP text tower is bidirectional and pooled at the last position")
        if self.vision.pooling != "map" or self.image_projection or not self.logit_bias:
            raise ValueError("a SigLIP image tower pools with its MAP head, unprojected; SigLIP has a logit bias")

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **options) -> "SiglipConfig":
        t, v = dict(hf.get("text_config") or {}), dict(hf.get("vision_config") or {})
        if not v.get("vision_use_head", True):
            raise ValueError("config.json has vision_config.vision_use_head=false; SigLIP image features come from "
                             "the attention-pooling head, which this checkpoint lacks")
        hidden = t.get("hidden_size", 768)
        text = TextSpec(
            vocab_size=t.get("vocab_size", 32000), hidden_size=hidden,
            num_layers=t.get("num_hidden_layers", 12), num_heads=t.get("num_attention_heads", 12),
            intermediate_size=t.get("intermediate_size", 3072),
            max_position_embeddings=t.get("max_position_embeddings", 64),
            activation=dual.activation_from_hf(t.get("hidden_act", "gelu_pytorch_tanh"), "config.json text_config"),
            layer_norm_eps=t.get("layer_norm_eps", 1e-6), mask="bidirectional", pooling="last",
            eos_token_id=t.get("eos_token_id"), attend_padding=True)
        vision = VisionSpec(
            hidden_size=v.get("hidden_size", 768), num_layers=v.get("num_hidden_layers", 12),
            num_heads=v.get("num_attention_heads", 12), intermediate_size=v.get("intermediate_size", 3072),
            image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 16),
            num_channels=v.get("num_channels", 3),
            activation=dual.activation_from_hf(v.get("hidden_act", "gelu_pytorch_tanh"), "config.json vision_config"),
            layer_norm_eps=v.get("layer_norm_eps", 1e-6), class_token=False, patch_bias=True, pre_norm=False,
            pooling="map")
        config = cls(text=text, vision=vision, projection_dim=t.get("projection_size", hidden))
        return FAMILY.configure(config, **options)

    def to_hf(self) -> dict[str, Any]:
        t, v = self.text, self.vision
        if v.image_size[0] != v.image_size[1]:
            raise ValueError(f"transformers' SigLIP takes square images only; this config has {v.image_size}")
        return {
            "architectures": ["SiglipModel"], "model_type": "siglip",
            "text_config": {**dual.tower_fields_to_hf(t), "model_type": "siglip_text_model",
                            "vocab_size": t.vocab_size, "max_position_embeddings": t.max_position_embeddings,
                            "eos_token_id": t.eos_token_id, "projection_size": self.projection_dim},
            "vision_config": {**dual.tower_fields_to_hf(v), "model_type": "siglip_vision_model",
                              "image_size": v.image_size[0], "patch_size": v.patch_size,
                              "num_channels": v.num_channels, "vision_use_head": True},
        }


def hf_table(config: SiglipConfig) -> list[TensorRule]:
    """transformers ``SiglipModel`` names <-> embedjax paths."""
    t, v, p = config.text, config.vision, config.projection_dim
    d, f = v.hidden_size, v.intermediate_size
    head = ("vision", "head")
    return [
        *dual.text_tower_rules(config),
        TensorRule("text_model.head.weight", ("text_projection", "kernel"), "transpose", (p, t.hidden_size)),
        TensorRule("text_model.head.bias", ("text_projection", "bias"), "copy", (p,)),
        TensorRule("vision_model.embeddings.patch_embedding.weight", ("vision", "patch_embedding", "kernel"), "conv",
                   (d, v.num_channels, v.patch_size, v.patch_size)),
        TensorRule("vision_model.embeddings.patch_embedding.bias", ("vision", "patch_embedding", "bias"), "copy", (d,)),
        TensorRule("vision_model.embeddings.position_embedding.weight", ("vision", "position_embedding"), "copy",
                   (v.num_positions, d)),
        *dual.vision_layer_rules(config),
        TensorRule("vision_model.head.probe", (*head, "probe"), "squeeze", (1, 1, d)),
        TensorRule("vision_model.head.attention.in_proj_weight", (*head, "in_proj_kernel"), "transpose", (3 * d, d)),
        TensorRule("vision_model.head.attention.in_proj_bias", (*head, "in_proj_bias"), "copy", (3 * d,)),
        TensorRule("vision_model.head.attention.out_proj.weight", (*head, "out_proj", "kernel"), "transpose", (d, d)),
        TensorRule("vision_model.head.attention.out_proj.bias", (*head, "out_proj", "bias"), "copy", (d,)),
        *dual.norm_rules("vision_model.head.layernorm", (*head, "norm"), d),
        TensorRule("vision_model.head.mlp.fc1.weight", (*head, "mlp", "mlp_in", "kernel"), "transpose", (f, d)),
        TensorRule("vision_model.head.mlp.fc1.bias", (*head, "mlp", "mlp_in", "bias"), "copy", (f,)),
        TensorRule("vision_model.head.mlp.fc2.weight", (*head, "mlp", "mlp_out", "kernel"), "transpose", (d, f)),
        TensorRule("vision_model.head.mlp.fc2.bias", (*head, "mlp", "mlp_out", "bias"), "copy", (d,)),
        TensorRule("logit_scale", ("logit", "log_scale"), "squeeze", (1,)),
        TensorRule("logit_bias", ("logit", "bias"), "squeeze", (1,)),
    ]


FAMILY = Family(
    name="siglip",
    hf_model_types=("siglip",),
    config_cls=SiglipConfig,
    module_cls=dual.DualEncoder,
    hf_table=hf_table,
    tokenizer=TokenizerNeeds(padding_side="right", pad_to_max_length=True),
    hf_ignored=(r".*position_ids",),
    modalities=("text", "image"),
    features=True,
    example_inputs=dual.example_inputs,
)

"""CLIP (Radford et al. 2021) as transformers' ``CLIPModel`` holds it, on the dual-encoder seam.

Text: causal pre-LN transformer, quick_gelu, pooled at the EOS token (`towers.text`), projected
without bias. Image: ViT with a class token, a patch convolution without bias, a LayerNorm before
the first block (``pre_layrnorm``), the class token pooled through ``post_layernorm``, projected
without bias. ``logit_scale`` is the log of the similarity scale (the loss clamps the scale).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from embedjax.convert.tables import TensorRule
from embedjax.models.registry import Family, TokenizerNeeds
from embedjax.models.towers import dual
from embedjax.models.towers.text import TextSpec
from embedjax.models.towers.vision import VisionSpec


@dataclasses.dataclass(frozen=True)
class CLIPConfig(dual.DualConfig):
    model_type: str = "clip"
    logit_scale_init: float = 2.6592  # transformers' logit_scale_init_value (log(1 / 0.07))

    def __post_init__(self):
        super().__post_init__()
        if self.model_type != "clip":
            raise ValueError(f"CLIPConfig has model_type={self.model_type!r}; it reads 'clip' configs")
        if self.text.pooling != "eos" or self.text.mask != "causal":
            raise ValueError("a CLIP text tower is causal and pooled at the EOS token")
        if self.vision.pooling != "cls" or self.logit_bias or not self.image_projection:
            raise ValueError("a CLIP image tower pools its class token and is projected; CLIP has no logit bias")

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **options) -> "CLIPConfig":
        t, v = dict(hf.get("text_config") or {}), dict(hf.get("vision_config") or {})
        text = TextSpec(
            vocab_size=t.get("vocab_size", 49408), hidden_size=t.get("hidden_size", 512),
            num_layers=t.get("num_hidden_layers", 12), num_heads=t.get("num_attention_heads", 8),
            intermediate_size=t.get("intermediate_size", 2048),
            max_position_embeddings=t.get("max_position_embeddings", 77),
            activation=dual.activation_from_hf(t.get("hidden_act", "quick_gelu"), "config.json text_config"),
            layer_norm_eps=t.get("layer_norm_eps", 1e-5), mask="causal", pooling="eos",
            eos_token_id=t.get("eos_token_id", 2), initializer_range=t.get("initializer_range", 0.02))
        vision = VisionSpec(
            hidden_size=v.get("hidden_size", 768), num_layers=v.get("num_hidden_layers", 12),
            num_heads=v.get("num_attention_heads", 12), intermediate_size=v.get("intermediate_size", 3072),
            image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 32),
            num_channels=v.get("num_channels", 3),
            activation=dual.activation_from_hf(v.get("hidden_act", "quick_gelu"), "config.json vision_config"),
            layer_norm_eps=v.get("layer_norm_eps", 1e-5), class_token=True, patch_bias=False, pre_norm=True,
            pooling="cls", initializer_range=v.get("initializer_range", 0.02))
        config = cls(text=text, vision=vision, projection_dim=hf.get("projection_dim", 512),
                     logit_scale_init=hf.get("logit_scale_init_value", 2.6592))
        return FAMILY.configure(config, **options)

    def to_hf(self) -> dict[str, Any]:
        t, v = self.text, self.vision
        if v.image_size[0] != v.image_size[1]:
            raise ValueError(f"transformers' CLIP takes square images only; this config has {v.image_size}")
        return {
            "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init,
            "text_config": {**dual.tower_fields_to_hf(t), "model_type": "clip_text_model",
                            "vocab_size": t.vocab_size, "max_position_embeddings": t.max_position_embeddings,
                            "eos_token_id": t.eos_token_id, "initializer_range": t.initializer_range,
                            "projection_dim": self.projection_dim},
            "vision_config": {**dual.tower_fields_to_hf(v), "model_type": "clip_vision_model",
                              "image_size": v.image_size[0], "patch_size": v.patch_size,
                              "num_channels": v.num_channels, "initializer_range": v.initializer_range,
                              "projection_dim": self.projection_dim},
        }


def hf_table(config: CLIPConfig) -> list[TensorRule]:
    """transformers ``CLIPModel`` names <-> embedjax paths."""
    t, v, p = config.text, config.vision, config.projection_dim
    d = v.hidden_size
    return [
        *dual.text_tower_rules(config),
        TensorRule("vision_model.embeddings.class_embedding", ("vision", "class_embedding"), "copy", (d,)),
        TensorRule("vision_model.embeddings.patch_embedding.weight", ("vision", "patch_embedding", "kernel"), "conv",
                   (d, v.num_channels, v.patch_size, v.patch_size)),
        TensorRule("vision_model.embeddings.position_embedding.weight", ("vision", "position_embedding"), "copy",
                   (v.num_positions, d)),
        *dual.norm_rules("vision_model.pre_layrnorm", ("vision", "pre_norm"), d),
        *dual.vision_layer_rules(config),
        TensorRule("text_projection.weight", ("text_projection", "kernel"), "transpose", (p, t.hidden_size)),
        TensorRule("visual_projection.weight", ("image_projection", "kernel"), "transpose", (p, d)),
        TensorRule("logit_scale", ("logit", "log_scale"), "copy", ()),
    ]


FAMILY = Family(
    name="clip",
    hf_model_types=("clip",),
    config_cls=CLIPConfig,
    module_cls=dual.DualEncoder,
    hf_table=hf_table,
    tokenizer=TokenizerNeeds(padding_side="right"),
    hf_ignored=(r".*position_ids",),
    modalities=("text", "image"),
    features=True,
    example_inputs=dual.example_inputs,
)

"""Decoder-LLM encoders (Llama, Mistral, Qwen2, Qwen3) on the shared layers.

One architecture with four families' switches: token embedding -> N pre-RMSNorm blocks
(GQA self-attention with RoPE -> SwiGLU MLP) -> final RMSNorm. The differences are data:

- Qwen2: biases on q, k and v (not on o).
- Qwen3: per-head RMSNorm of q and k before RoPE; ``head_dim`` read from the config (128 when
  absent, as transformers defaults it), never hidden_size / num_heads.
- Llama: optional ``attention_bias`` (q, k, v and o) and ``mlp_bias``; ``rope_type: llama3`` scaling.
- Mistral: a sliding attention window under causal attention; bidirectional attention past the
  window is refused (the model never saw it).

Attention is causal by default, as the models were trained; ``attention="bidirectional"``
(``Encoder.from_pretrained(..., attention=...)``) switches it, and a config's ``is_causal: false``
is honoured. Positions count real tokens, so left and right padding give the same states.
Both transformers 4 (``rope_theta``, ``rope_scaling``) and 5 (``rope_parameters``) config keys
are read.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from embedjax.convert.tables import TensorRule
from embedjax.models import layers
from embedjax.models.registry import Family, TokenizerNeeds
from embedjax.models.rope import (NEEDS_ORIGINAL_LENGTH, normalize_scaling, positions_from_mask,
                                 rotary_tables, supported_length)

Dtype = Any
DEFAULT_THETA = 10000.0  # transformers' default when a config names no rope_theta
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def _freeze(mapping: Mapping[str, Any] | None):
    """A dict as a sorted tuple of items (config dataclasses must stay hashable)."""
    return None if not mapping else tuple(sorted(mapping.items()))


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 576
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    intermediate_size: int = 1536
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-5
    rope_theta: float = DEFAULT_THETA
    rope_scaling: tuple | None = None  # normalized scaling dict as sorted items; see `embedjax.models.rope`
    attention: str = "causal"  # "causal" | "bidirectional"
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    tie_word_embeddings: bool = True
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # How attention is computed (embedjax.models.layers.ATTENTION_IMPLS); a run-time choice, not
    # written to config.json.
    attention_impl: str = "auto"

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"DecoderConfig model_type={self.model_type!r}; supported: {MODEL_TYPES}")
        if self.attention not in layers.MASK_KINDS:
            raise ValueError(f"attention={self.attention!r}: use one of {layers.MASK_KINDS}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        layers.check_attention_impl(self.attention_impl)
        if isinstance(self.rope_scaling, Mapping):  # accept a plain dict (configs, from_pretrained options)
            scaling = dict(self.rope_scaling)
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind in NEEDS_ORIGINAL_LENGTH:  # the context the model was trained on, unless the dict says
                scaling.setdefault("original_max_position_embeddings", self.max_position_embeddings)
            object.__setattr__(self, "rope_scaling", _freeze(normalize_scaling(scaling)))
        elif self.rope_scaling is not None:
            normalize_scaling(dict(self.rope_scaling))
        scaling = self.scaling
        if scaling and scaling["type"] == "self_extend" and self.sliding_window is not None and \
                self.attention == "causal":
            raise ValueError("rope_scaling self_extend with a sliding attention window is not implemented; "
                             "use another scaling type or a model without a sliding window")

    @property
    def scaling(self) -> dict | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    @property
    def max_supported_length(self) -> int:
        """The trained context (max_position_embeddings), stretched as the RoPE scaling allows
        (`embedjax.models.rope.supported_length`); llama3-scaled configs already state their
        extended length in max_position_embeddings."""
        return supported_length(self.scaling, self.max_position_embeddings)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **options) -> "DecoderConfig":
        """Read a transformers ``config.json`` dict of a Llama / Mistral / Qwen2 / Qwen3 model."""
        model_type = hf.get("model_type")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config.json has hidden_act={act!r}; the decoder families use 'silu' (SwiGLU)")
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or (128 if model_type == "qwen3" else hf["hidden_size"] // heads)
        rope = dict(hf.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", None) or hf.get("rope_theta") or DEFAULT_THETA
        scaling = rope or hf.get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type")) in NEEDS_ORIGINAL_LENGTH:
            scaling = dict(scaling)
            scaling.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
        scaling = normalize_scaling(scaling, where="config.json rope parameters")
        window = hf.get("sliding_window")
        if model_type in ("qwen2", "qwen3"):
            if hf.get("use_sliding_window"):
                raise ValueError(f"config.json enables use_sliding_window for {model_type}: its per-layer windows "
                                 "(max_window_layers) are not implemented; set use_sliding_window to false")
            window = None
        eos = hf.get("eos_token_id")
        config = cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 8192),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=_freeze(scaling),
            attention="bidirectional" if hf.get("is_causal") is False else "causal",
            qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
            out_bias=model_type != "qwen2" and bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=window,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_dropout=float(hf.get("attention_dropout", 0.0)),
            initializer_range=hf.get("initializer_range", 0.02),
            pad_token_id=hf.get("pad_token_id"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
        )
        return get_family(model_type).configure(config, **options)

    def to_hf(self) -> dict[str, Any]:
        """The transformers ``config.json`` dict (transformers 4 rope keys, which 5 reads too)."""
        architecture = {"llama": "LlamaModel", "mistral": "MistralModel", "qwen2": "Qwen2Model",
                        "qwen3": "Qwen3Model"}[self.model_type]
        out: dict[str, Any] = {
            "architectures": [architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_dropout": self.attention_dropout,
            "initializer_range": self.initializer_range,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "is_causal": self.attention == "causal",
        }
        if self.scaling:
            scaling = dict(self.scaling)
            out["rope_scaling"] = {"rope_type": scaling.pop("type"), **scaling}
        if self.model_type in ("llama", "qwen3"):
            out["attention_bias"] = self.out_bias
        if self.model_type == "llama":
            out["mlp_bias"] = self.mlp_bias
        if self.model_type == "mistral":
            out["sliding_window"] = self.sliding_window
        return out

    def block_spec(self) -> layers.BlockSpec:
        return layers.BlockSpec(
            hidden_size=self.hidden_size,
            attention=layers.AttentionSpec(
                self.num_heads, self.num_kv_heads, self.head_dim, qkv_bias=self.qkv_bias, out_bias=self.out_bias,
                qk_norm=self.qk_norm, qk_norm_eps=self.rms_norm_eps, mask=self.attention,
                sliding_window=self.sliding_window if self.attention == "causal" else None,
                dropout=self.attention_dropout, impl=self.attention_impl,
                self_extend_window=self.scaling["window"] if self.scaling and self.scaling["type"] == "self_extend"
                else None),
            mlp=layers.MLPSpec(self.intermediate_size, "gated", "silu", bias=self.mlp_bias),
            norm=layers.NormSpec("rmsnorm", self.rms_norm_eps, bias=False),
            norm_placement="pre",
            hidden_dropout=0.0,
            init_std=self.initializer_range,
        )


class DecoderModel(nn.Module):
    """``apply({"params": p}, tokens, deterministic=True, output_hidden_states=False)`` ->
    ``(last_hidden_bld, {"hidden_states": (embeddings, layer 1, ..., normed layer N) or None})``,
    the last hidden state after the final RMSNorm, as transformers' ``last_hidden_state``.

    ``tokens``: ``input_ids`` and ``attention_mask`` [B, L]; optionally ``position_ids`` (else the
    real tokens are counted from 0) and, for packed texts (`embedjax.data.packing`), ``segment_ids``."""

    config: DecoderConfig
    dtype: Dtype = jnp.float32
    remat: str = "none"
    scan_unroll: int = 1

    @nn.compact
    def __call__(self, tokens, *, deterministic: bool = True, output_hidden_states: bool = False):
        cfg = self.config
        ids_bl, mask_bl = layers.check_token_batch(tokens)
        if cfg.attention == "bidirectional" and cfg.sliding_window is not None and ids_bl.shape[1] > cfg.sliding_window:
            raise ValueError(f"sequence length {ids_bl.shape[1]} exceeds the sliding window {cfg.sliding_window} "
                             "under bidirectional attention, which the model never saw; lower max_length to "
                             f"{cfg.sliding_window} or use attention='causal'")
        init = nn.initializers.normal(cfg.initializer_range)
        embedded_bld = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype,
                                embedding_init=layers.logical(init, ("vocab", "embed")), name="embed_tokens")(ids_bl)
        # Packed texts carry their own positions (each text counts from 0).
        positions_bl = tokens.get("position_ids")
        rope = rotary_tables(positions_from_mask(mask_bl) if positions_bl is None else positions_bl,
                             cfg.head_dim, cfg.rope_theta, cfg.scaling)
        x_bld, per_layer = layers.layer_stack(
            cfg.block_spec(), cfg.num_layers, dtype=self.dtype, remat=self.remat, unroll=self.scan_unroll,
            deterministic=deterministic, collect=output_hidden_states)(
                embedded_bld.astype(jnp.float32), layers.attention_key_mask(tokens, mask_bl), rope)
        x_bld = layers.Norm(layers.NormSpec("rmsnorm", cfg.rms_norm_eps, bias=False), self.dtype, name="norm")(x_bld)
        hidden = layers.hidden_states_tuple(embedded_bld, per_layer, x_bld) if output_hidden_states else None
        return x_bld, {"hidden_states": hidden}


def hf_table(config: DecoderConfig) -> list[TensorRule]:
    """transformers ``LlamaModel`` / ``MistralModel`` / ``Qwen2Model`` / ``Qwen3Model`` names."""
    d, f, k = config.hidden_size, config.intermediate_size, config.head_dim
    h, g = config.num_heads, config.num_kv_heads
    rules = [
        TensorRule("embed_tokens.weight", ("embed_tokens", "embedding"), "copy", (config.vocab_size, d)),
        TensorRule("norm.weight", ("norm", "scale"), "copy", (d,)),
    ]
    for i in range(config.num_layers):
        p = f"layers.{i}."
        for proj, heads in (("q", h), ("k", g), ("v", g)):
            rules.append(TensorRule(f"{p}self_attn.{proj}_proj.weight", ("layers", "attention", proj, "kernel"),
                                    "heads_in", (heads * k, d), i, heads))
            if config.qkv_bias:
                rules.append(TensorRule(f"{p}self_attn.{proj}_proj.bias", ("layers", "attention", proj, "bias"),
                                        "heads_bias", (heads * k,), i, heads))
        rules.append(TensorRule(f"{p}self_attn.o_proj.weight", ("layers", "attention", "o", "kernel"), "heads_out",
                                (d, h * k), i, h))
        if config.out_bias:
            rules.append(TensorRule(f"{p}self_attn.o_proj.bias", ("layers", "attention", "o", "bias"), "copy", (d,), i))
        if config.qk_norm:
            rules += [TensorRule(f"{p}self_attn.{n}_norm.weight", ("layers", "attention", f"{n}_norm", "scale"), "copy",
                                 (k,), i) for n in ("q", "k")]
        for proj, shape in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f))):
            rules.append(TensorRule(f"{p}mlp.{proj}_proj.weight", ("layers", "mlp", proj, "kernel"), "transpose",
                                    shape, i))
            if config.mlp_bias:
                rules.append(TensorRule(f"{p}mlp.{proj}_proj.bias", ("layers", "mlp", proj, "bias"), "copy",
                                        shape[:1], i))
        rules += [
            TensorRule(f"{p}input_layernorm.weight", ("layers", "attention_norm", "scale"), "copy", (d,), i),
            TensorRule(f"{p}post_attention_layernorm.weight", ("layers", "mlp_norm", "scale"), "copy", (d,), i),
        ]
    return rules


def _family(name: str) -> Family:
    return Family(
        name=name,
        hf_model_types=(name,),
        config_cls=DecoderConfig,
        module_cls=DecoderModel,
        hf_table=hf_table,
        # Left padding keeps every text's last token in the last column (what last-token pooling
        # reads); the embedding does not depend on it. EOS closes every text, as the embedders
        # built on these models expect (Qwen3-Embedding appends <|endoftext|>).
        tokenizer=TokenizerNeeds(padding_side="left", append_eos=True, token_type_ids=False),
        # The LM head (untied checkpoints) and old checkpoints' rotary buffers are not used.
        hf_ignored=(r"lm_head\.", r"(layers\.\d+\.self_attn\.)?rotary_emb\."),
        hf_stripped_prefixes=("model.",),
        tied_lm_head=("embed_tokens", "embedding"),
        packs_sequences=True,
    )


LLAMA, MISTRAL, QWEN2, QWEN3 = (_family(name) for name in MODEL_TYPES)


def get_family(model_type: str) -> Family:
    from embedjax.models.registry import get_family as lookup

    return lookup(model_type)

"""BERT-family bidirectional encoder (BERT, MiniLM, all-MiniLM-L6-v2) on the shared layers.

Embeddings (word + absolute position + token type) -> LayerNorm -> N post-LayerNorm blocks
(self-attention -> add & norm -> exact-GELU MLP -> add & norm), scanned over layers. Positions
count real tokens (0, 1, ...), which equals transformers' ``arange`` for BERT's right padding and
keeps the embedding the same under left padding.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from embedjax.convert.tables import TensorRule
from embedjax.models import layers
from embedjax.models.registry import Family, TokenizerNeeds
from embedjax.models.rope import positions_from_mask

Dtype = Any


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Architecture hyper-parameters (the fields of a transformers ``BertConfig`` that matter)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    pad_token_id: int = 0
    initializer_range: float = 0.02
    attention: str = "bidirectional"
    model_type: str = "bert"

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                "pick a head count that divides the hidden size"
            )
        if self.attention != "bidirectional":
            raise ValueError(f"attention={self.attention!r}: BERT-family encoders are bidirectional only "
                             "(causal attention is a decoder-family option)")
        if self.model_type != "bert":
            raise ValueError(f"BertConfig has model_type={self.model_type!r}; it reads 'bert' configs")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_supported_length(self) -> int:
        """The longest input the absolute position table covers."""
        return self.max_position_embeddings

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **options) -> "BertConfig":
        """Read a transformers ``config.json`` dict (BERT keys); ``options`` replace fields."""
        act = hf.get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"config.json has hidden_act={act!r}; only exact 'gelu' is implemented for BERT")
        pos = hf.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise ValueError(f"config.json has position_embedding_type={pos!r}; only 'absolute' is implemented")
        config = cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 512),
            type_vocab_size=hf.get("type_vocab_size", 2),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
            attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
            pad_token_id=hf.get("pad_token_id", 0) or 0,
            initializer_range=hf.get("initializer_range", 0.02),
            model_type=hf.get("model_type", "bert"),
        )
        return FAMILY.configure(config, **options)

    def to_hf(self) -> dict[str, Any]:
        """The transformers ``config.json`` dict for this architecture."""
        return {
            "architectures": ["BertModel"],
            "model_type": "bert",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "hidden_act": "gelu",
            "hidden_dropout_prob": self.hidden_dropout,
            "attention_probs_dropout_prob": self.attention_dropout,
            "max_position_embeddings": self.max_position_embeddings,
            "type_vocab_size": self.type_vocab_size,
            "initializer_range": self.initializer_range,
            "layer_norm_eps": self.layer_norm_eps,
            "pad_token_id": self.pad_token_id,
            "position_embedding_type": "absolute",
        }

    def block_spec(self) -> layers.BlockSpec:
        return layers.BlockSpec(
            hidden_size=self.hidden_size,
            attention=layers.AttentionSpec(self.num_heads, self.num_heads, self.head_dim,
                                           mask="bidirectional", dropout=self.attention_dropout),
            mlp=layers.MLPSpec(self.intermediate_size, "plain", "gelu"),
            norm=layers.NormSpec("layernorm", self.layer_norm_eps),
            norm_placement="post",
            hidden_dropout=self.hidden_dropout,
            init_std=self.initializer_range,
        )


class BertModel(nn.Module):
    """``apply({"params": p}, tokens, deterministic=True, output_hidden_states=False)`` ->
    ``(last_hidden_bld, {"hidden_states": (embeddings, layer 1, ..., layer N) or None})``.

    ``tokens``: ``input_ids``, ``attention_mask`` and optionally ``token_type_ids``, each [B, L].
    Dropout is active when ``deterministic=False`` (rng collection ``"dropout"``).
    """

    config: BertConfig
    dtype: Dtype = jnp.float32
    remat: str = "none"
    scan_unroll: int = 1

    @nn.compact
    def __call__(self, tokens, *, deterministic: bool = True, output_hidden_states: bool = False):
        cfg = self.config
        ids_bl, mask_bl = layers.check_token_batch(tokens)
        if ids_bl.shape[1] > cfg.max_position_embeddings:
            raise ValueError(f"sequence length {ids_bl.shape[1]} exceeds max_position_embeddings="
                             f"{cfg.max_position_embeddings}; lower max_length")
        token_type_bl = tokens.get("token_type_ids")
        if token_type_bl is None:
            token_type_bl = jnp.zeros_like(ids_bl)
        init = nn.initializers.normal(cfg.initializer_range)

        def table(name, rows, axis):
            return nn.Embed(rows, cfg.hidden_size, embedding_init=layers.logical(init, (axis, "embed")), name=name)

        x_bld = (table("word_embeddings", cfg.vocab_size, "vocab")(ids_bl)
                 + table("position_embeddings", cfg.max_position_embeddings, "position")(positions_from_mask(mask_bl))
                 + table("token_type_embeddings", cfg.type_vocab_size, "token_type")(token_type_bl))
        x_bld = layers.Norm(layers.NormSpec("layernorm", cfg.layer_norm_eps), self.dtype, name="embeddings_norm")(x_bld)
        embedded_bld = nn.Dropout(cfg.hidden_dropout)(x_bld, deterministic=deterministic)
        x_bld, per_layer = layers.layer_stack(
            cfg.block_spec(), cfg.num_layers, dtype=self.dtype, remat=self.remat, unroll=self.scan_unroll,
            deterministic=deterministic, collect=output_hidden_states)(embedded_bld, mask_bl, None)
        hidden = layers.hidden_states_tuple(embedded_bld, per_layer, x_bld) if output_hidden_states else None
        return x_bld, {"hidden_states": hidden}


def hf_table(config: BertConfig) -> list[TensorRule]:
    """transformers ``BertModel`` names <-> embedjax paths, with the shapes ``config`` implies."""
    d, f, h = config.hidden_size, config.intermediate_size, config.num_heads
    rules = [
        TensorRule("embeddings.word_embeddings.weight", ("word_embeddings", "embedding"), "copy",
                   (config.vocab_size, d)),
        TensorRule("embeddings.position_embeddings.weight", ("position_embeddings", "embedding"), "copy",
                   (config.max_position_embeddings, d)),
        TensorRule("embeddings.token_type_embeddings.weight", ("token_type_embeddings", "embedding"), "copy",
                   (config.type_vocab_size, d)),
        TensorRule("embeddings.LayerNorm.weight", ("embeddings_norm", "scale"), "copy", (d,)),
        TensorRule("embeddings.LayerNorm.bias", ("embeddings_norm", "bias"), "copy", (d,)),
    ]
    for i in range(config.num_layers):
        hf = f"encoder.layer.{i}."
        for proj, short in (("query", "q"), ("key", "k"), ("value", "v")):
            rules += [
                TensorRule(f"{hf}attention.self.{proj}.weight", ("layers", "attention", short, "kernel"),
                           "heads_in", (d, d), i, h),
                TensorRule(f"{hf}attention.self.{proj}.bias", ("layers", "attention", short, "bias"),
                           "heads_bias", (d,), i, h),
            ]
        rules += [
            TensorRule(f"{hf}attention.output.dense.weight", ("layers", "attention", "o", "kernel"),
                       "heads_out", (d, d), i, h),
            TensorRule(f"{hf}attention.output.dense.bias", ("layers", "attention", "o", "bias"), "copy", (d,), i),
            TensorRule(f"{hf}attention.output.LayerNorm.weight", ("layers", "attention_norm", "scale"), "copy",
                       (d,), i),
            TensorRule(f"{hf}attention.output.LayerNorm.bias", ("layers", "attention_norm", "bias"), "copy", (d,), i),
            TensorRule(f"{hf}intermediate.dense.weight", ("layers", "mlp", "mlp_in", "kernel"), "transpose",
                       (f, d), i),
            TensorRule(f"{hf}intermediate.dense.bias", ("layers", "mlp", "mlp_in", "bias"), "copy", (f,), i),
            TensorRule(f"{hf}output.dense.weight", ("layers", "mlp", "mlp_out", "kernel"), "transpose", (d, f), i),
            TensorRule(f"{hf}output.dense.bias", ("layers", "mlp", "mlp_out", "bias"), "copy", (d,), i),
            TensorRule(f"{hf}output.LayerNorm.weight", ("layers", "mlp_norm", "scale"), "copy", (d,), i),
            TensorRule(f"{hf}output.LayerNorm.bias", ("layers", "mlp_norm", "bias"), "copy", (d,), i),
        ]
    return rules


FAMILY = Family(
    name="bert",
    hf_model_types=("bert",),
    config_cls=BertConfig,
    module_cls=BertModel,
    hf_table=hf_table,
    tokenizer=TokenizerNeeds(padding_side="right", append_eos=False, token_type_ids=True),
    # The position-id buffer and the next-sentence pooler head are not used by sentence embeddings.
    hf_ignored=(r"embeddings\.position_ids", r"pooler\."),
    hf_stripped_prefixes=("bert.", "model."),
)

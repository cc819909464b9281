"""BERT-family bidirectional encoder in Flax Linen.

Post-LayerNorm transformer blocks as in BERT/MiniLM: embeddings (word + position
+ token type) -> LayerNorm -> N x [self-attention -> add & norm -> GELU MLP ->
add & norm]. Every parameter carries logical axis names so that sharding rules
(``embedjax.sharding``) can place it on a mesh. Compute may run in bfloat16;
softmax and LayerNorm always run in float32 because their reductions lose too
much precision in bfloat16 to keep parity with float32 models.

Shape suffixes: b batch, l sequence length, d hidden size, h heads, k head dim,
f MLP width.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

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

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                "pick a head count that divides the hidden size"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any]) -> "BertConfig":
        """Read a transformers ``config.json`` dict (BERT-style keys)."""
        model_type = hf.get("model_type", "bert")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"config.json has model_type={model_type!r}; embedjax's BERT encoder supports "
                f"{sorted(SUPPORTED_MODEL_TYPES)}"
            )
        act = hf.get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"config.json has hidden_act={act!r}; only exact 'gelu' is implemented")
        pos = hf.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise ValueError(f"config.json has position_embedding_type={pos!r}; only 'absolute' is implemented")
        return cls(
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
        )

    def to_hf_dict(self) -> dict[str, Any]:
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


SUPPORTED_MODEL_TYPES = frozenset({"bert"})


def _logical(init, names: tuple[str | None, ...]):
    return nn.with_logical_partitioning(init, names)


class _LayerNorm32(nn.Module):
    """LayerNorm computed in float32, result cast back to the compute dtype."""

    epsilon: float
    dtype: Dtype

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm(
            epsilon=self.epsilon,
            dtype=jnp.float32,
            scale_init=_logical(nn.initializers.ones, ("embed",)),
            bias_init=_logical(nn.initializers.zeros, ("embed",)),
            name="norm",
        )(x.astype(jnp.float32))
        return y.astype(self.dtype)


class BertEmbeddings(nn.Module):
    config: BertConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids_bl, token_type_ids_bl, deterministic: bool):
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)
        seq_len = input_ids_bl.shape[1]
        if seq_len > cfg.max_position_embeddings:
            raise ValueError(
                f"sequence length {seq_len} exceeds max_position_embeddings={cfg.max_position_embeddings}; "
                "lower max_length"
            )
        word = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=_logical(init, ("vocab", "embed")),
                        name="word_embeddings")
        position = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size,
                            embedding_init=_logical(init, ("position", "embed")), name="position_embeddings")
        token_type = nn.Embed(cfg.type_vocab_size, cfg.hidden_size,
                              embedding_init=_logical(init, ("token_type", "embed")), name="token_type_embeddings")
        positions_l = jnp.arange(seq_len)
        x_bld = word(input_ids_bl) + position(positions_l)[None] + token_type(token_type_ids_bl)
        x_bld = _LayerNorm32(cfg.layer_norm_eps, self.dtype, name="layer_norm")(x_bld)
        return nn.Dropout(cfg.hidden_dropout)(x_bld, deterministic=deterministic)


class BertSelfAttention(nn.Module):
    config: BertConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_bld, bias_b11l, deterministic: bool):
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)

        def project(name):
            return nn.DenseGeneral(
                (cfg.num_heads, cfg.head_dim),
                dtype=self.dtype,
                kernel_init=_logical(init, ("embed", "heads", "kv")),
                bias_init=_logical(nn.initializers.zeros, ("heads", "kv")),
                name=name,
            )(x_bld)

        q_blhk, k_blhk, v_blhk = project("query"), project("key"), project("value")
        # Scores and softmax in float32: bf16 logits lose the small differences attention depends on.
        scores_bhqk = jnp.einsum("bqhk,bvhk->bhqv", q_blhk, k_blhk, preferred_element_type=jnp.float32)
        scores_bhqk = scores_bhqk / jnp.sqrt(jnp.float32(cfg.head_dim)) + bias_b11l
        probs_bhqk = jax.nn.softmax(scores_bhqk, axis=-1)
        probs_bhqk = nn.Dropout(cfg.attention_dropout)(probs_bhqk, deterministic=deterministic)
        ctx_blhk = jnp.einsum("bhqv,bvhk->bqhk", probs_bhqk.astype(self.dtype), v_blhk)
        return nn.DenseGeneral(
            cfg.hidden_size,
            axis=(-2, -1),
            dtype=self.dtype,
            kernel_init=_logical(init, ("heads", "kv", "embed")),
            bias_init=_logical(nn.initializers.zeros, ("embed",)),
            name="out",
        )(ctx_blhk)


class BertLayer(nn.Module):
    """One post-LayerNorm transformer block."""

    config: BertConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_bld, bias_b11l, deterministic: bool):
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)
        attn = BertSelfAttention(cfg, self.dtype, name="attention")(x_bld, bias_b11l, deterministic)
        attn = nn.Dropout(cfg.hidden_dropout)(attn, deterministic=deterministic)
        x_bld = _LayerNorm32(cfg.layer_norm_eps, self.dtype, name="attention_norm")(x_bld + attn)
        h_blf = nn.Dense(cfg.intermediate_size, dtype=self.dtype, kernel_init=_logical(init, ("embed", "mlp")),
                         bias_init=_logical(nn.initializers.zeros, ("mlp",)), name="mlp_in")(x_bld)
        h_blf = jax.nn.gelu(h_blf, approximate=False)  # BERT's "gelu" is the exact erf form
        h_bld = nn.Dense(cfg.hidden_size, dtype=self.dtype, kernel_init=_logical(init, ("mlp", "embed")),
                         bias_init=_logical(nn.initializers.zeros, ("embed",)), name="mlp_out")(h_blf)
        h_bld = nn.Dropout(cfg.hidden_dropout)(h_bld, deterministic=deterministic)
        return _LayerNorm32(cfg.layer_norm_eps, self.dtype, name="output_norm")(x_bld + h_bld)


def attention_bias(attention_mask_bl) -> jax.Array:
    """Additive float32 bias [B, 1, 1, L]: 0 for real tokens, the float32 minimum for padding.

    The minimum (not -inf) keeps a fully padded row finite, as transformers does.
    """
    keep = attention_mask_bl.astype(bool)[:, None, None, :]
    return jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


class BertModel(nn.Module):
    """BERT encoder: returns the last hidden state and, on request, every layer's output.

    ``apply({"params": p}, input_ids_bl, attention_mask_bl, token_type_ids_bl=None,
    deterministic=True, output_hidden_states=False)`` returns ``(last_hidden_bld, hidden_states)``
    where ``hidden_states`` is a tuple of ``num_layers + 1`` arrays [B, L, D] (the embedding output
    first) or None. Dropout is active when ``deterministic=False`` (rng collection ``"dropout"``).
    ``remat=True`` recomputes each block in the backward pass to save activation memory.
    """

    config: BertConfig
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids_bl, attention_mask_bl, token_type_ids_bl=None, deterministic: bool = True,
                 output_hidden_states: bool = False):
        if input_ids_bl.ndim != 2 or attention_mask_bl.shape != input_ids_bl.shape:
            raise ValueError(
                f"input_ids {input_ids_bl.shape} and attention_mask {attention_mask_bl.shape} must both be [B, L]"
            )
        if token_type_ids_bl is None:
            token_type_ids_bl = jnp.zeros_like(input_ids_bl)
        x_bld = BertEmbeddings(self.config, self.dtype, name="embeddings")(
            input_ids_bl, token_type_ids_bl, deterministic)
        bias_b11l = attention_bias(attention_mask_bl)
        layer_cls = nn.remat(BertLayer, static_argnums=(3,)) if self.remat else BertLayer
        hidden = [x_bld]
        for i in range(self.config.num_layers):
            x_bld = layer_cls(self.config, self.dtype, name=f"layer_{i}")(x_bld, bias_b11l, deterministic)
            hidden.append(x_bld)
        return x_bld, (tuple(hidden) if output_hidden_states else None)


def parse_dtype(dtype: str | Dtype) -> Dtype:
    """``"float32"``/``"bfloat16"`` (or a jnp dtype) -> jnp dtype; anything else is an error."""
    names = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16}
    if isinstance(dtype, str):
        if dtype not in names:
            raise ValueError(f"dtype={dtype!r} is not supported; use 'float32' or 'bfloat16'")
        return names[dtype]
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"dtype={dtype!r} is not supported; use float32 or bfloat16")
    return dtype

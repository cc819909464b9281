"""The text tower of CLIP and SigLIP on the shared layers.

token + learned absolute position embeddings -> N pre-LN blocks (causal for CLIP, bidirectional for
SigLIP) -> the final LayerNorm -> one pooled vector per text:

- ``"eos"`` (CLIP): the state at the end-of-text token. transformers' rule: when the config's
  ``eos_token_id`` is 2 (checkpoints older than transformers PR #24773) the position of the largest
  id (the EOS had the largest id of the original vocabulary), else the first position holding
  ``eos_token_id`` (the pad token may be the same token, so the first one is the real end).
- ``"last"`` (SigLIP): the state at the last position. SigLIP was trained on texts padded to a
  fixed length and attending to the padding, so ``attend_padding=True`` ignores the attention mask
  (as transformers does when the processor gives none) and the tokenizer pads to max length.

A text without an EOS token under ``"eos"`` pools position 0; the embedjax tokenizer always ends a
text with the tokenizer's EOS (it keeps the special suffix when truncating).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from embedjax.models import layers

Dtype = Any
POOLINGS = ("eos", "last")
LEGACY_EOS_ID = 2  # transformers' marker of a CLIP config whose EOS is found by argmax of the ids


@dataclasses.dataclass(frozen=True)
class TextSpec:
    """Architecture of one text tower."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    mask: str = "causal"  # "causal" | "bidirectional"
    pooling: str = "eos"
    eos_token_id: int | None = None
    attend_padding: bool = False
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"text hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"text pooling={self.pooling!r}: use one of {POOLINGS}")
        if self.pooling == "eos" and self.eos_token_id is None:
            raise ValueError("text pooling 'eos' needs eos_token_id (config.json text_config.eos_token_id)")

    def block_spec(self) -> layers.BlockSpec:
        return layers.BlockSpec(
            hidden_size=self.hidden_size,
            attention=layers.AttentionSpec(self.num_heads, self.num_heads, self.hidden_size // self.num_heads,
                                           mask=self.mask),
            mlp=layers.MLPSpec(self.intermediate_size, "plain", self.activation),
            norm=layers.NormSpec("layernorm", self.layer_norm_eps),
            norm_placement="pre",
            init_std=self.initializer_range,
        )


def pool_index(ids_bl, spec: TextSpec):
    """[B] int32 position each text is pooled at."""
    if spec.pooling == "last":
        return jnp.full(ids_bl.shape[:1], ids_bl.shape[1] - 1, jnp.int32)
    if spec.eos_token_id == LEGACY_EOS_ID:
        return jnp.argmax(ids_bl, axis=-1).astype(jnp.int32)
    return jnp.argmax(ids_bl == spec.eos_token_id, axis=-1).astype(jnp.int32)


class TextTower(nn.Module):
    """``tokens -> (tokens_bld after the final LayerNorm, pooled_bd)``; float32 outputs.

    ``tokens``: ``input_ids`` and ``attention_mask`` [B, L] (positions count from 0 at the first
    column: these towers read right-padded batches)."""

    spec: TextSpec
    dtype: Dtype = jnp.float32
    remat: str = "none"
    scan_unroll: int = 1

    @nn.compact
    def __call__(self, tokens, *, deterministic: bool = True):
        s = self.spec
        ids_bl, mask_bl = layers.check_token_batch(tokens)
        if ids_bl.shape[1] > s.max_position_embeddings:
            raise ValueError(f"text length {ids_bl.shape[1]} exceeds the {s.max_position_embeddings} positions of "
                             "this text tower; lower max_length")
        init = nn.initializers.normal(s.initializer_range)
        x_bld = nn.Embed(s.vocab_size, s.hidden_size, embedding_init=layers.logical(init, ("vocab", "embed")),
                         name="token_embedding")(ids_bl)
        positions_ld = self.param("position_embedding", layers.logical(init, ("position", "embed")),
                                  (s.max_position_embeddings, s.hidden_size), jnp.float32)
        x_bld = x_bld.astype(jnp.float32) + positions_ld[None, : ids_bl.shape[1]]
        if s.attend_padding:
            mask_bl = jnp.ones_like(mask_bl)
        x_bld, _ = layers.layer_stack(s.block_spec(), s.num_layers, dtype=self.dtype, remat=self.remat,
                                      unroll=self.scan_unroll, deterministic=deterministic)(x_bld, mask_bl, None)
        x_bld = layers.Norm(layers.NormSpec("layernorm", s.layer_norm_eps), self.dtype,
                            name="final_norm")(x_bld).astype(jnp.float32)
        index_b = pool_index(ids_bl, s)
        pooled_bd = jnp.take_along_axis(x_bld, index_b[:, None, None], axis=1)[:, 0]
        return x_bld, pooled_bd

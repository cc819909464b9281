"""Transformer layers shared by every model family: norms, attention, MLPs, the block and the
scanned layer stack.

A family describes its block with a `BlockSpec` (data, no code) and gets the rest from here:

- `Norm`: LayerNorm or RMSNorm, computed in float32 and cast back (their reductions lose too
  much precision in bfloat16 to keep parity with float32 models).
- `Attention`: ``num_heads`` query heads over ``num_kv_heads`` key/value heads (GQA: query head
  ``h`` reads KV head ``h // (num_heads / num_kv_heads)``), optional per-head q/k RMSNorm (Qwen3),
  optional RoPE (SelfExtend's grouped positions included), and a mask kind: padding-only
  bidirectional, or causal, optionally within a sliding window. Scores and softmax are float32.
  How it is computed is data (``AttentionSpec.impl``, `embedjax.models.attention`):
  `jax.nn.dot_product_attention` (cuDNN flash attention on GPUs), a chunked online-softmax
  kernel whose memory grows linearly in the length (attention dropout included), or the explicit
  dense path, which applies attention dropout for the other choices (training).
- `MLP`: GELU (exact, tanh or quick) or gated (SwiGLU: ``down(act(gate(x)) * up(x))``).
- `Block`: attention + MLP with residuals, norms before (pre-LN: Llama, ViT) or after (post-LN: BERT).
  Residual sums run in float32; pre-LN blocks carry the residual stream in float32 between layers
  (matmul inputs stay in the compute dtype), which keeps bfloat16 encoders close to float32 ones.
- `layer_stack`: ``nn.scan`` over identical blocks (parameters stacked on a leading ``layers``
  axis), so compile time does not grow with depth, with optional ``nn.remat`` policies.

Every parameter carries logical axis names (``embed``, ``heads``, ``kv_heads``, ``kv``, ``mlp``,
``layers``) for the sharding rules. Shape suffixes: b batch, l length, d hidden, h query heads,
g KV heads, k head dim, f MLP width.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from embedjax.models import attention as kernels
from embedjax.models.rope import RotaryTables, apply_rope

Dtype = Any

MASK_KINDS = ("bidirectional", "causal")
REMAT_POLICIES = {
    "none": None,
    "full": "nothing_saveable",  # recompute the whole block in the backward pass
    "dots": "dots_saveable",  # keep matmul outputs, recompute the element-wise rest
    "dots_no_batch": "dots_with_no_batch_dims_saveable",
}


def gelu_erf(x):
    """Exact GELU, ``x * Phi(x)``, spelled ``x / 2 * (1 + erf(x / sqrt(2)))``: PyTorch's formula
    (BERT's ``"gelu"``). `jax.nn.gelu` spells it with erfc, which XLA:CPU evaluates as two rational
    fits, an exponential and two divisions per element; erf is one fit. In a oneDNN program the MLP's
    activation of [640, 1536] takes 0.61 ms against 1.20 (`benchmarks/gelu_forms.py`, 2-core EPYC).
    The price is the far negative tail, where 1 + erf cancels: against float64 the erf form is off
    by at most 1.3e-6 in absolute terms on N(0, 4) inputs, the erfc form by 6e-7."""
    return x * 0.5 * (1.0 + jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


ACTIVATIONS = {
    "gelu": gelu_erf,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": jax.nn.silu,
}


def logical(init, names: tuple[str | None, ...]):
    """An initializer whose parameter carries logical axis names."""
    return nn.with_logical_partitioning(init, names)


def check_attention_impl(impl: str) -> str:
    return kernels.check_impl(impl)


def check_remat(policy: str) -> str:
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat={policy!r} is not a remat policy; choose one of {sorted(REMAT_POLICIES)}")
    return policy


@dataclasses.dataclass(frozen=True)
class NormSpec:
    kind: str = "layernorm"  # "layernorm" | "rmsnorm"
    eps: float = 1e-12
    bias: bool = True  # LayerNorm's bias (RMSNorm has none)

    def __post_init__(self):
        if self.kind not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm kind {self.kind!r}: use 'layernorm' or 'rmsnorm'")


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool = True
    out_bias: bool = True
    qk_norm: bool = False  # RMSNorm over head_dim of q and k after projection, before RoPE (Qwen3)
    qk_norm_eps: float = 1e-6
    mask: str = "bidirectional"  # "bidirectional" (padding only) | "causal"
    sliding_window: int | None = None  # causal only: query i sees keys i - window < j <= i
    dropout: float = 0.0
    impl: str = "auto"  # embedjax.models.attention.ATTENTION_IMPLS
    chunk_size: int = kernels.DEFAULT_CHUNK  # keys per block of the chunked kernel
    # SelfExtend: pairs closer than this many positions use normal RoPE, farther ones grouped
    # positions (the rotary tables then carry the grouped rotations); None: plain attention.
    self_extend_window: int | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.mask not in MASK_KINDS:
            raise ValueError(f"attention mask kind {self.mask!r}: use one of {MASK_KINDS}")
        if self.sliding_window is not None and self.mask != "causal":
            raise ValueError("a sliding window is defined for causal attention only")
        kernels.check_impl(self.impl)
        if self.self_extend_window is not None and self.sliding_window is not None:
            raise ValueError("SelfExtend with a sliding attention window is not implemented")


@dataclasses.dataclass(frozen=True)
class MLPSpec:
    width: int
    kind: str = "plain"  # "plain": out(act(in(x))); "gated": down(act(gate(x)) * up(x))
    activation: str = "gelu"
    bias: bool = True

    def __post_init__(self):
        if self.kind not in ("plain", "gated"):
            raise ValueError(f"MLP kind {self.kind!r}: use 'plain' or 'gated'")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r}: use one of {sorted(ACTIVATIONS)}")


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    hidden_size: int
    attention: AttentionSpec
    mlp: MLPSpec
    norm: NormSpec
    norm_placement: str = "post"  # "post" (BERT) | "pre" (Llama, ViT)
    hidden_dropout: float = 0.0
    init_std: float = 0.02

    def __post_init__(self):
        if self.norm_placement not in ("pre", "post"):
            raise ValueError(f"norm_placement {self.norm_placement!r}: use 'pre' or 'post'")


class Norm(nn.Module):
    """LayerNorm / RMSNorm over the last axis, in float32, cast back to ``dtype``."""

    spec: NormSpec
    dtype: Dtype = jnp.float32
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        width = x.shape[-1]
        scale = self.param("scale", logical(nn.initializers.ones, (self.axis_name,)), (width,), jnp.float32)
        if self.spec.kind == "rmsnorm":
            y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.spec.eps)
            return (y * scale).astype(self.dtype)
        centered = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        # Two-pass variance (as torch computes it), not E[x^2] - E[x]^2, which cancels badly.
        y = centered * jax.lax.rsqrt(jnp.mean(jnp.square(centered), axis=-1, keepdims=True) + self.spec.eps)
        y = y * scale
        if self.spec.bias:
            y = y + self.param("bias", logical(nn.initializers.zeros, (self.axis_name,)), (width,), jnp.float32)
        return y.astype(self.dtype)


def attend(q_blhk, k_blgk, v_blgk, key_mask_bl, *, causal: bool, window: int | None = None,
           dropout_rate: float = 0.0, dropout_rng=None, impl: str = "auto", chunk_size: int = kernels.DEFAULT_CHUNK,
           self_extend=None):
    """Scaled dot-product attention with GQA -> [B, L, H, K] in q's dtype.

    ``impl`` picks the kernel (`embedjax.models.attention.resolve_impl`); with attention dropout
    active (``dropout_rng`` given and a positive rate) the chunked kernel applies it block by block
    when it is the one chosen (``auto`` chooses it on a GPU), the flash kernel inside its tiles, and
    the explicit path runs for every other choice (neither `jax.nn.dot_product_attention` nor the
    blocked kernel drops).
    ``self_extend``: ``(q_before_blhk, q_after_blhk, k_grouped_blgk, positions_bl, window)``
    for SelfExtend (q and k above are then the normally rotated ones). Masked scores take a large
    finite negative, so a fully masked row (a padding query under causal masking) stays finite.
    ``key_mask_bl``: the key-padding mask [B, L], or a `kernels.Segments` of packed texts' segment
    ids (attention within each segment).
    """
    packed = isinstance(key_mask_bl, kernels.Segments)
    if packed:
        key_mask_bl = key_mask_bl.ids
    masking = kernels.Masking(causal=causal, window=window,
                              self_extend_window=None if self_extend is None else self_extend[4], segments=packed)
    if self_extend is None:
        qs, ks, positions = (q_blhk,), (k_blgk,), None
    else:
        q_before, q_after, k_grouped, positions, _ = self_extend
        qs, ks = (q_blhk, q_before, q_after), (k_blgk, k_grouped)
    if positions is None:
        positions = jnp.zeros(key_mask_bl.shape, jnp.int32)
    dropping = dropout_rng is not None and dropout_rate > 0.0
    chosen = kernels.resolve_impl(impl, length=q_blhk.shape[1], dtype=q_blhk.dtype,
                                  self_extend=self_extend is not None, chunk_size=chunk_size, dropout=dropping)
    if chosen == "flash":  # drops inside the kernel when dropout is active
        return kernels.flash_attention(qs, ks, v_blgk, key_mask_bl, positions, masking,
                                       dropout_rate=dropout_rate if dropping else 0.0, dropout_rng=dropout_rng)
    if dropping:
        if chosen == "chunked":  # dropout block by block: still no [L, L] scores or mask
            return kernels.chunked_attention(qs, ks, v_blgk, key_mask_bl, positions, masking, chunk_size=chunk_size,
                                             dropout_rate=dropout_rate, dropout_rng=dropout_rng)
        return kernels.explicit_attention(qs, ks, v_blgk, key_mask_bl, positions, masking,
                                          dropout_rate=dropout_rate, dropout_rng=dropout_rng)
    if chosen == "xla":
        return kernels.xla_attention(q_blhk, k_blgk, v_blgk, key_mask_bl, masking)
    if chosen == "chunked":
        return kernels.chunked_attention(qs, ks, v_blgk, key_mask_bl, positions, masking, chunk_size=chunk_size)
    if chosen == "blocked":
        return kernels.blocked_attention(qs, ks, v_blgk, key_mask_bl, positions, masking)
    return kernels.explicit_attention(qs, ks, v_blgk, key_mask_bl, positions, masking)


class Attention(nn.Module):
    """Multi-head self-attention: params ``q``, ``k``, ``v``, ``o`` (and ``q_norm``/``k_norm``)."""

    spec: AttentionSpec
    hidden_size: int
    dtype: Dtype = jnp.float32
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x_bld, key_mask_bl, rope, deterministic: bool):
        s = self.spec
        init = nn.initializers.normal(self.init_std)

        def project(name, heads, head_axis):
            return nn.DenseGeneral(
                (heads, s.head_dim), dtype=self.dtype, use_bias=s.qkv_bias,
                kernel_init=logical(init, ("embed", head_axis, "kv")),
                bias_init=logical(nn.initializers.zeros, (head_axis, "kv")), name=name)(x_bld)

        q = project("q", s.num_heads, "heads")
        k = project("k", s.num_kv_heads, "kv_heads")
        v = project("v", s.num_kv_heads, "kv_heads")
        if s.qk_norm:
            norm = NormSpec("rmsnorm", s.qk_norm_eps, bias=False)
            q = Norm(norm, self.dtype, axis_name="kv", name="q_norm")(q)
            k = Norm(norm, self.dtype, axis_name="kv", name="k_norm")(k)
        self_extend = None
        if rope is not None:
            rope = RotaryTables(*rope)
            raw_q, raw_k = q, k
            q, k = apply_rope(raw_q, rope.cos, rope.sin), apply_rope(raw_k, rope.cos, rope.sin)
            if rope.self_extend:
                if s.self_extend_window is None:
                    raise ValueError("the rotary tables carry SelfExtend rotations but the attention spec has no "
                                     "self_extend_window")
                self_extend = (apply_rope(raw_q, *rope.query_before), apply_rope(raw_q, *rope.query_after),
                               apply_rope(raw_k, *rope.key_grouped), rope.positions, s.self_extend_window)
        use_dropout = s.dropout > 0.0 and not deterministic
        ctx = attend(q, k, v, key_mask_bl, causal=s.mask == "causal", window=s.sliding_window,
                     dropout_rate=s.dropout, dropout_rng=self.make_rng("dropout") if use_dropout else None,
                     impl=s.impl, chunk_size=s.chunk_size, self_extend=self_extend)
        return nn.DenseGeneral(
            self.hidden_size, axis=(-2, -1), dtype=self.dtype, use_bias=s.out_bias,
            kernel_init=logical(init, ("heads", "kv", "embed")),
            bias_init=logical(nn.initializers.zeros, ("embed",)), name="o")(ctx)


class MLP(nn.Module):
    """Plain (``mlp_in`` -> act -> ``mlp_out``) or gated (``gate``, ``up`` -> ``down``) feed-forward."""

    spec: MLPSpec
    hidden_size: int
    dtype: Dtype = jnp.float32
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x_bld):
        s = self.spec
        init = nn.initializers.normal(self.init_std)

        def dense(name, width, axes):
            return nn.Dense(width, dtype=self.dtype, use_bias=s.bias, kernel_init=logical(init, axes),
                            bias_init=logical(nn.initializers.zeros, axes[-1:]), name=name)

        act = ACTIVATIONS[s.activation]
        if s.kind == "gated":
            h_blf = act(dense("gate", s.width, ("embed", "mlp"))(x_bld)) * dense("up", s.width, ("embed", "mlp"))(x_bld)
            return dense("down", self.hidden_size, ("mlp", "embed"))(h_blf)
        h_blf = act(dense("mlp_in", s.width, ("embed", "mlp"))(x_bld))
        return dense("mlp_out", self.hidden_size, ("mlp", "embed"))(h_blf)


class Block(nn.Module):
    """One transformer block; ``(x, key_mask, rope) -> (x, x or None)`` so that it scans.

    Post-LN (BERT): ``x = norm1(x + attn(x)); x = norm2(x + mlp(x))``.
    Pre-LN (Llama): ``x = x + attn(norm1(x)); x = x + mlp(norm2(x))``.
    """

    spec: BlockSpec
    dtype: Dtype = jnp.float32
    deterministic: bool = True
    collect: bool = False  # also return the block's output as the scan's per-layer output

    @nn.compact
    def __call__(self, x_bld, key_mask_bl, rope):
        s = self.spec
        attention = Attention(s.attention, s.hidden_size, self.dtype, s.init_std, name="attention")
        mlp = MLP(s.mlp, s.hidden_size, self.dtype, s.init_std, name="mlp")
        norm1 = Norm(s.norm, self.dtype, name="attention_norm")
        norm2 = Norm(s.norm, self.dtype, name="mlp_norm")
        dropout = nn.Dropout(s.hidden_dropout)

        def add(x, branch):
            # Residual sums in float32 whatever the compute dtype: in bfloat16 the stream's large
            # entries swallow the branches' small updates layer after layer.
            return x.astype(jnp.float32) + dropout(branch, deterministic=self.deterministic).astype(jnp.float32)

        if s.norm_placement == "post":
            x_bld = norm1(add(x_bld, attention(x_bld, key_mask_bl, rope, self.deterministic)))
            x_bld = norm2(add(x_bld, mlp(x_bld)))
        else:  # the carried stream stays float32 (the caller passes it in float32)
            x_bld = add(x_bld, attention(norm1(x_bld), key_mask_bl, rope, self.deterministic))
            x_bld = add(x_bld, mlp(norm2(x_bld)))
        return x_bld, (x_bld if self.collect else None)


def layer_stack(spec: BlockSpec, num_layers: int, *, dtype: Dtype = jnp.float32, remat: str = "none",
                unroll: int = 1, deterministic: bool = True, collect: bool = False, name: str = "layers"):
    """``num_layers`` blocks as one ``nn.scan`` module (params stacked on a leading ``layers`` axis).

    Call it inside a compact ``__call__``: ``x_bld, per_layer = layer_stack(...)(x_bld, key_mask_bl,
    rope)``, where ``per_layer`` is [num_layers, B, L, D] when ``collect`` else None. ``unroll`` > 1
    unrolls that many layers per loop iteration (``num_layers``: a fully unrolled program, for
    comparing compile and run time); ``remat`` names a policy of ``REMAT_POLICIES``.
    """
    block = Block
    policy = REMAT_POLICIES[check_remat(remat)]
    if policy is not None:
        block = nn.remat(Block, policy=getattr(jax.checkpoint_policies, policy), prevent_cse=False)
    scanned = nn.scan(
        block,
        # "lora": per-layer LoRA adapters (embedjax.models.lora), stacked like the parameters.
        variable_axes={"params": 0, "lora": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast),
        length=num_layers,
        unroll=max(1, min(unroll, num_layers)),
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return scanned(spec, dtype, deterministic, collect, name=name)


def check_token_batch(tokens: Mapping[str, Any]):
    """``(input_ids_bl, attention_mask_bl)`` of a token batch, or a clear error."""
    if "input_ids" not in tokens or "attention_mask" not in tokens:
        raise ValueError(f"a token batch needs input_ids and attention_mask, got keys {sorted(tokens)}")
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    if ids.ndim != 2 or mask.shape != ids.shape:
        raise ValueError(f"input_ids {ids.shape} and attention_mask {mask.shape} must both be [B, L]")
    return ids, mask


def attention_key_mask(tokens: Mapping[str, Any], mask_bl):
    """What the blocks' attention reads as its key mask: ``mask_bl``, or for a packed batch
    (``segment_ids`` [B, L], `embedjax.data.packing`) its `kernels.Segments`."""
    segments_bl = tokens.get("segment_ids")
    if segments_bl is None:
        return mask_bl
    if segments_bl.shape != mask_bl.shape:
        raise ValueError(f"segment_ids {segments_bl.shape} and attention_mask {mask_bl.shape} must both be [B, L]")
    return kernels.Segments(segments_bl)


def hidden_states_tuple(embedded_bld, per_layer_nbld, last_bld) -> tuple:
    """(embeddings, layer 1, ..., layer n) with the last entry replaced by ``last_bld`` (the final
    output after any closing norm), as transformers reports ``hidden_states``."""
    layers = [per_layer_nbld[i] for i in range(per_layer_nbld.shape[0])]
    return (embedded_bld, *layers[:-1], last_bld)

"""The Vision Transformer image tower (ViT, CLIP's and SigLIP's vision towers) on the shared layers.

pixels [B, H, W, C] (channels last, already normalised) -> non-overlapping p x p patches, each
projected to d (a convolution with stride p) -> an optional class token in front -> learned
absolute positions -> an optional LayerNorm (CLIP's ``pre_layrnorm``) -> N pre-LN blocks over all
tokens (no padding: every image has the same patch grid) -> the final LayerNorm -> pooling:
``"cls"`` (the class token) or ``"map"`` (multihead attention pooling: one learned probe attends
over the tokens, then a residual MLP; SigLIP, big_vision's ``MAPHead``).

The patch grid may be non-square (``image_size=(H, W)``); patches are flattened row by row, as
torch's ``Conv2d(...).flatten(2)`` orders them.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from embedjax.models import layers

Dtype = Any
POOLINGS = ("cls", "map")


@dataclasses.dataclass(frozen=True)
class VisionSpec:
    """Architecture of one image tower."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    image_size: tuple[int, int]  # (height, width) in pixels
    patch_size: int
    num_channels: int = 3
    activation: str = "gelu"
    layer_norm_eps: float = 1e-12
    class_token: bool = True
    patch_bias: bool = True
    pre_norm: bool = False  # a LayerNorm on the embedded tokens before the first block (CLIP)
    pooling: str = "cls"
    initializer_range: float = 0.02

    def __post_init__(self):
        size = self.image_size
        if isinstance(size, int):
            object.__setattr__(self, "image_size", (size, size))
        elif len(size) != 2:
            raise ValueError(f"image_size={size!r}: give one int or (height, width)")
        else:
            object.__setattr__(self, "image_size", (int(size[0]), int(size[1])))
        h, w = self.image_size
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not a whole number of {self.patch_size}-pixel patches; "
                             "pick an image size divisible by the patch size")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"vision pooling={self.pooling!r}: use one of {POOLINGS}")
        if self.pooling == "cls" and not self.class_token:
            raise ValueError("vision pooling 'cls' needs class_token=True (or use pooling='map')")

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @property
    def num_positions(self) -> int:
        gh, gw = self.grid
        return gh * gw + int(self.class_token)

    def block_spec(self) -> layers.BlockSpec:
        return layers.BlockSpec(
            hidden_size=self.hidden_size,
            attention=layers.AttentionSpec(self.num_heads, self.num_heads, self.hidden_size // self.num_heads),
            mlp=layers.MLPSpec(self.intermediate_size, "plain", self.activation),
            norm=layers.NormSpec("layernorm", self.layer_norm_eps),
            norm_placement="pre",
            init_std=self.initializer_range,
        )


def check_pixels(pixels_bhwc, spec: VisionSpec):
    """The pixel batch as the tower expects it, or a clear error naming the expected shape."""
    expected = (*spec.image_size, spec.num_channels)
    if pixels_bhwc.ndim != 4 or tuple(pixels_bhwc.shape[1:]) != expected:
        raise ValueError(f"pixel values have shape {tuple(pixels_bhwc.shape)}; this image tower takes "
                         f"[batch, {expected[0]}, {expected[1]}, {expected[2]}] (channels last, preprocessed)")
    return pixels_bhwc


class MAPHead(nn.Module):
    """Multihead attention pooling: ``x_bnd -> [B, D]``. A learned probe is the single query over all
    tokens (packed q/k/v projection ``in_proj`` as torch's ``nn.MultiheadAttention`` holds it), then
    ``y + MLP(LayerNorm(y))``."""

    spec: VisionSpec
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_bnd):
        s = self.spec
        d, h = s.hidden_size, s.num_heads
        k = d // h
        init = nn.initializers.normal(s.initializer_range)
        probe = self.param("probe", layers.logical(init, ("embed",)), (d,), jnp.float32)
        # torch packs q, k, v as rows of one [3d, d] weight; held here as [d, 3d] (x @ kernel).
        kernel = self.param("in_proj_kernel", layers.logical(init, ("embed", None)), (d, 3 * d), jnp.float32)
        bias = self.param("in_proj_bias", layers.logical(nn.initializers.zeros, (None,)), (3 * d,), jnp.float32)
        kernel, bias = kernel.astype(self.dtype), bias.astype(self.dtype)
        q_hk = (probe.astype(self.dtype) @ kernel[:, :d] + bias[:d]).reshape(h, k)
        kv_bn2d = x_bnd @ kernel[:, d:] + bias[d:]
        keys_bnhk = kv_bn2d[..., :d].reshape(*x_bnd.shape[:2], h, k)
        values_bnhk = kv_bn2d[..., d:].reshape(*x_bnd.shape[:2], h, k)
        scores_bhn = jnp.einsum("hk,bnhk->bhn", q_hk.astype(jnp.float32), keys_bnhk.astype(jnp.float32)) * k ** -0.5
        weights_bhn = jax.nn.softmax(scores_bhn, axis=-1)
        ctx_bhk = jnp.einsum("bhn,bnhk->bhk", weights_bhn, values_bnhk.astype(jnp.float32))
        y_bd = nn.Dense(d, dtype=self.dtype, kernel_init=layers.logical(init, ("mlp", "embed")),
                        bias_init=layers.logical(nn.initializers.zeros, ("embed",)),
                        name="out_proj")(ctx_bhk.reshape(-1, d).astype(self.dtype))
        normed = layers.Norm(layers.NormSpec("layernorm", s.layer_norm_eps), self.dtype, name="norm")(y_bd)
        mlp = layers.MLP(layers.MLPSpec(s.intermediate_size, "plain", s.activation), d, self.dtype,
                         s.initializer_range, name="mlp")
        return y_bd.astype(jnp.float32) + mlp(normed).astype(jnp.float32)


class VisionTower(nn.Module):
    """``pixels_bhwc -> (tokens_bnd after the final LayerNorm, pooled_bd)``; float32 outputs."""

    spec: VisionSpec
    dtype: Dtype = jnp.float32
    remat: str = "none"
    scan_unroll: int = 1

    @nn.compact
    def __call__(self, pixels_bhwc, *, deterministic: bool = True):
        s = self.spec
        check_pixels(pixels_bhwc, s)
        init = nn.initializers.normal(s.initializer_range)
        p = s.patch_size
        patches = nn.Conv(s.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=s.patch_bias,
                          dtype=self.dtype, kernel_init=layers.logical(init, (None, None, None, "embed")),
                          bias_init=layers.logical(nn.initializers.zeros, ("embed",)),
                          name="patch_embedding")(pixels_bhwc.astype(self.dtype))
        b = pixels_bhwc.shape[0]
        x_bnd = patches.reshape(b, -1, s.hidden_size).astype(jnp.float32)
        if s.class_token:
            cls_d = self.param("class_embedding", layers.logical(init, ("embed",)), (s.hidden_size,), jnp.float32)
            x_bnd = jnp.concatenate([jnp.broadcast_to(cls_d, (b, 1, s.hidden_size)), x_bnd], axis=1)
        positions_nd = self.param("position_embedding", layers.logical(init, ("position", "embed")),
                                  (s.num_positions, s.hidden_size), jnp.float32)
        x_bnd = x_bnd + positions_nd[None]
        norm = layers.NormSpec("layernorm", s.layer_norm_eps)
        if s.pre_norm:
            x_bnd = layers.Norm(norm, self.dtype, name="pre_norm")(x_bnd).astype(jnp.float32)
        mask_bn = jnp.ones(x_bnd.shape[:2], jnp.int32)
        x_bnd, _ = layers.layer_stack(s.block_spec(), s.num_layers, dtype=self.dtype, remat=self.remat,
                                      unroll=self.scan_unroll, deterministic=deterministic)(x_bnd, mask_bn, None)
        x_bnd = layers.Norm(norm, self.dtype, name="post_norm")(x_bnd).astype(jnp.float32)
        if s.pooling == "cls":
            pooled_bd = x_bnd[:, 0]
        else:
            pooled_bd = MAPHead(s, self.dtype, name="head")(x_bnd.astype(self.dtype))
        return x_bnd, pooled_bd.astype(jnp.float32)


class ProjectedImageTower(nn.Module):
    """``pixels_bhwc -> [B, projection_dim]``: a `VisionTower` pooled and mapped linearly (no bias, as
    CLIP's ``visual_projection``) into another model's embedding space. It is the image side of LiT
    against a text encoder of any family (a locked BERT, say): the text tower needs no dual-encoder
    config of its own. Params: ``{"vision": ..., "image_projection": {"kernel"}}`` (the names of a
    dual encoder's image half). Output float32, unnormalised."""

    spec: VisionSpec
    projection_dim: int
    dtype: Dtype = jnp.float32
    remat: str = "none"
    scan_unroll: int = 1

    @nn.compact
    def __call__(self, pixels_bhwc, *, deterministic: bool = True):
        _, pooled_bd = VisionTower(self.spec, self.dtype, self.remat, self.scan_unroll, name="vision")(
            pixels_bhwc, deterministic=deterministic)
        init = nn.initializers.normal(self.spec.initializer_range)
        projected_bp = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype,
                                kernel_init=layers.logical(init, ("embed", None)),
                                name="image_projection")(pooled_bd.astype(self.dtype))
        return projected_bp.astype(jnp.float32)

"""NV-Embed's latent-attention pooler (Lee et al. 2024, "NV-Embed") as a trainable head.

Every token state ``x`` cross-attends to a trainable dictionary of latents, then a GEGLU MLP,
both with residuals (pre-LayerNorm), and the result is pooled (the masked mean, as NV-Embed)::

    k, v = split(LN_c(latents) W_kv)                       # [n, heads, head_dim] each
    x = x + W_out(softmax(LN_q(x) W_q k^T / sqrt(head_dim)) v)
    x = x + W_2(a * gelu(g)),  [a, g] = split(LN_f(x) W_1)   # GEGLU, width mlp_ratio * d
    embedding = mean over the pool mask of x

The keys and values depend on the parameters alone, not on the batch: `batch_independent`
computes them once, and a training step hands them to every call (`shared=`) instead of
recomputing them for each text column and GradCache sub-batch. Shape suffixes: b batch,
l length, d hidden, n latents, h heads, k head dim, f MLP width.
"""
from __future__ import annotations

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp

from embedjax.models.layers import gelu_erf, logical
from embedjax.models.poolers import get_pooler

# torch.nn.LayerNorm's default epsilon (NV-Embed's pooler uses the default).
LN_EPS = 1e-5


def _layer_norm(name: str):
    return nn.LayerNorm(epsilon=LN_EPS, dtype=jnp.float32, name=name,
                        scale_init=logical(nn.initializers.ones, (None,)),
                        bias_init=logical(nn.initializers.zeros, (None,)))


def _dense(features: int, name: str, use_bias: bool):
    return nn.Dense(features, use_bias=use_bias, dtype=jnp.float32, name=name,
                    kernel_init=logical(nn.initializers.lecun_normal(), (None, None)),
                    bias_init=logical(nn.initializers.zeros, (None,)))


class LatentKV(nn.Module):
    """Keys and values of the latents: ``(k_nhk, v_nhk)`` from the parameters alone."""

    n_latents: int
    heads: int
    head_dim: int

    @nn.compact
    def __call__(self, width: int):
        latents_nd = self.param("latents", logical(nn.initializers.normal(1.0), (None, None)),
                                (self.n_latents, width), jnp.float32)
        kv_n2i = _dense(2 * self.heads * self.head_dim, "to_kv", False)(_layer_norm("latent_norm")(latents_nd))
        k_ni, v_ni = jnp.split(kv_n2i, 2, axis=-1)
        shape = (self.n_latents, self.heads, self.head_dim)
        return k_ni.reshape(shape), v_ni.reshape(shape)


class LatentAttentionHead(nn.Module):
    """``n_latents`` trainable latents of the model width, ``heads`` cross-attention heads of
    ``head_dim`` (0: width / heads), a GEGLU MLP of ``mlp_ratio`` x width, then ``pooling`` over the
    pool mask (NV-Embed: mean). The output keeps the backbone's width."""

    n_latents: int = 512
    heads: int = 8
    head_dim: int = 0
    mlp_ratio: int = 4
    pooling: str = "mean"
    needs_hidden_states = False

    def _head_dim(self, width: int) -> int:
        if self.head_dim:
            return self.head_dim
        if width % self.heads:
            raise ValueError(f"latent attention: width {width} is not divisible by heads={self.heads}; set head_dim")
        return width // self.heads

    def _kv_module(self, width: int) -> LatentKV:
        return LatentKV(self.n_latents, self.heads, self._head_dim(width), name="latent_kv")

    def batch_independent(self, head_params):
        """``(k_nhk, v_nhk)``: the latents' keys and values, a pure function of the head's params."""
        width = head_params["latent_kv"]["latents"].shape[-1]
        kv = LatentKV(self.n_latents, self.heads, self._head_dim(width), parent=None)
        return kv.apply({"params": head_params["latent_kv"]}, width)

    @nn.compact
    def __call__(self, hidden_bld, mask_bl, hidden_states=None, *, deterministic: bool = True, shared=None):
        if self.n_latents < 1 or self.heads < 1 or self.mlp_ratio < 1:
            raise ValueError(f"latent attention needs n_latents, heads and mlp_ratio >= 1, got {self.n_latents}, "
                             f"{self.heads}, {self.mlp_ratio}")
        x_bld = hidden_bld.astype(jnp.float32)
        width = x_bld.shape[-1]
        head_dim = self._head_dim(width)
        k_nhk, v_nhk = shared if shared is not None else self._kv_module(width)(width)
        q_bli = _dense(self.heads * head_dim, "to_q", False)(_layer_norm("query_norm")(x_bld))
        q_blhk = q_bli.reshape(*q_bli.shape[:-1], self.heads, head_dim)
        scores_bhln = jnp.einsum("blhk,nhk->bhln", q_blhk, k_nhk) * jnp.float32(head_dim ** -0.5)
        ctx_blhk = jnp.einsum("bhln,nhk->blhk", jax.nn.softmax(scores_bhln, axis=-1), v_nhk)
        x_bld = x_bld + _dense(width, "to_out", True)(ctx_blhk.reshape(*ctx_blhk.shape[:2], -1))
        a_blf, g_blf = jnp.split(_dense(2 * self.mlp_ratio * width, "ff_in", True)(_layer_norm("ff_norm")(x_bld)),
                                 2, axis=-1)
        x_bld = x_bld + _dense(width, "ff_out", True)(a_blf * gelu_erf(g_blf))
        return get_pooler(self.pooling)(x_bld, mask_bl).astype(jnp.float32)

    # ---- saved folders: an embedjax module (sentence-transformers has no latent-attention module) ----
    st_type = "embedjax.heads.LatentAttention"

    def write_st(self, params, folder: pathlib.Path, index: int) -> dict:
        from embedjax.models.heads import write_module_folder

        return write_module_folder(self, params, folder, index, "LatentAttention")

    @classmethod
    def read_st(cls, path: pathlib.Path, pooling: str):
        from embedjax.models.heads import read_module_folder

        return read_module_folder(cls, path, pooling)

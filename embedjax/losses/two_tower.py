"""Image-text contrastive losses with a learned logit scale (and bias), dense or on the exact ring.

Both take unnormalised features (as the towers return them), L2-normalise them, and score
``logit_ij = scale * <t_i, v_j> (+ bias)`` between text i and image j (the pair on the diagonal):

- `clip_loss`: symmetric InfoNCE (text->image and image->text cross-entropies, averaged), as
  CLIP trains and transformers' ``CLIPModel(return_loss=True)`` computes it.
- `siglip_loss`: the pairwise sigmoid loss summed over all pairs and divided by B (big_vision;
  transformers' ``SiglipModel(return_loss=True)``).

``log_scale`` is the trainable log of the scale; ``scale = exp(min(log_scale, log(max_scale)))``,
so the clamp stops its gradient above ``max_scale`` (CLIP clamps at 100; SigLIP's trained scales
reach ~112, so its default is higher). ``bias`` is a trainable scalar. With ``mesh`` the loss
runs on the ring (`embedjax.losses.ring`): same value and gradients, inputs sharded over
``axis``, no [B, B] array on any device; ``impl`` picks the ring's tiles ("xla" or the fused
"pallas" kernels).
"""
from __future__ import annotations

import math

import jax.numpy as jnp

from embedjax.losses import contrastive, ring
from embedjax.models.poolers import l2_normalize

CLIP_MAX_SCALE = 100.0
SIGLIP_MAX_SCALE = 1000.0


def logit_scale(log_scale, max_scale: float):
    """``exp(log_scale)`` clamped at ``max_scale`` (zero gradient above it)."""
    if not max_scale > 0:
        raise ValueError(f"max_scale={max_scale} must be > 0")
    return jnp.exp(jnp.minimum(jnp.asarray(log_scale, jnp.float32), math.log(max_scale)))


def _check_pair(text_bd, image_bd):
    if text_bd.ndim != 2 or image_bd.shape != text_bd.shape:
        raise ValueError(f"text features {tuple(text_bd.shape)} and image features {tuple(image_bd.shape)} must "
                         "both be [B, D], row i of each a pair")


def clip_loss(text_bd, image_bd, log_scale, *, max_scale: float = CLIP_MAX_SCALE, mesh=None, axis: str = "data",
              tile: int | None = None, impl: str = "xla"):
    """Symmetric InfoNCE of paired features -> float32 scalar (see the module docstring)."""
    _check_pair(text_bd, image_bd)
    t_bd, v_bd = l2_normalize(text_bd.astype(jnp.float32)), l2_normalize(image_bd.astype(jnp.float32))
    temperature = 1.0 / logit_scale(log_scale, max_scale)
    if mesh is None:
        return contrastive.infonce(t_bd, v_bd, temperature=temperature, bidirectional=True)
    return ring.ring_infonce(t_bd, v_bd, mesh=mesh, axis=axis, temperature=temperature, bidirectional=True, tile=tile,
                             impl=impl)


def siglip_loss(text_bd, image_bd, log_scale, bias, *, max_scale: float = SIGLIP_MAX_SCALE, mesh=None,
                axis: str = "data", tile: int | None = None, impl: str = "xla"):
    """Pairwise sigmoid loss of paired features -> float32 scalar (see the module docstring)."""
    _check_pair(text_bd, image_bd)
    t_bd, v_bd = l2_normalize(text_bd.astype(jnp.float32)), l2_normalize(image_bd.astype(jnp.float32))
    temperature = 1.0 / logit_scale(log_scale, max_scale)
    bias = jnp.asarray(bias, jnp.float32)
    if mesh is None:
        return contrastive.siglip(t_bd, v_bd, temperature=temperature, bias=bias)
    return ring.ring_siglip(t_bd, v_bd, mesh=mesh, axis=axis, temperature=temperature, bias=bias, tile=tile, impl=impl)


LOSSES = {"clip": clip_loss, "siglip": siglip_loss}

"""Residual (recurrent) binarisation: several bit-planes with per-plane weights.

Plane 0 is the sign of x; plane p is the sign of what planes 0..p-1 left
unexplained, ``r_p = x - sum_{j<p} w_j b_j`` with ``b_j`` in {-1, +1}^D. The
per-plane weight ``w_p`` is the least-squares scale of a sign vector against the
residual, ``mean |r_p|``, averaged over calibration embeddings (one scalar per
plane, shared by all vectors, so code-vs-code scores stay a weighted sum of
Hamming terms). This is the untrained form of Tencent's BEBR recurrent
binarisation; ``residual_head.ResidualBinarizer`` is the trained one.

Codes: uint32 [N, P, W], plane p packed with ``binary.pack_bits`` (bit set <=> +1).
Decoding: ``x ~= sum_p w_p (2 bits_p - 1)``.
"""
from __future__ import annotations

import jax.numpy as jnp

from embedjax.quant.binary import bits_to_signs, pack_bits


def _check(x, name):
    x = jnp.asarray(x)
    if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a 2-D float array [N, D]; got {x.dtype} {x.shape}")
    return x.astype(jnp.float32)


def fit_residual_weights(calibration_nd, planes: int):
    """Per-plane weights float32 [P] fitted greedily on calibration embeddings."""
    x = _check(calibration_nd, "calibration_nd")
    if planes < 1:
        raise ValueError(f"planes must be >= 1; got {planes}")
    if x.shape[0] == 0:
        raise ValueError("calibration_nd is empty")
    residual = x
    weights = []
    for _ in range(planes):
        signs = jnp.where(residual > 0, 1.0, -1.0)
        w = jnp.mean(jnp.abs(residual))
        weights.append(w)
        residual = residual - w * signs
    return jnp.stack(weights).astype(jnp.float32)


def residual_binarize(x_nd, weights_p):
    """Codes uint32 [N, P, W] for embeddings [N, D] given per-plane weights [P]."""
    x = _check(x_nd, "x_nd")
    weights_p = jnp.asarray(weights_p, jnp.float32)
    residual = x
    planes = []
    for p in range(weights_p.shape[0]):
        planes.append(pack_bits(residual))
        residual = residual - weights_p[p] * jnp.where(residual > 0, 1.0, -1.0)
    return jnp.stack(planes, axis=1)


def residual_decode(codes_npw, weights_p, dim: int):
    """Codes [N, P, W] -> reconstruction float32 [N, dim]."""
    codes_npw = jnp.asarray(codes_npw)
    weights_p = jnp.asarray(weights_p, jnp.float32)
    if codes_npw.ndim != 3 or codes_npw.shape[1] != weights_p.shape[0]:
        raise ValueError(f"codes_npw must be [N, P, W] with P = len(weights_p) = {weights_p.shape[0]}; got {codes_npw.shape}")
    out = jnp.zeros((codes_npw.shape[0], dim), jnp.float32)
    for p in range(weights_p.shape[0]):
        out = out + weights_p[p] * bits_to_signs(codes_npw[:, p], dim)
    return out

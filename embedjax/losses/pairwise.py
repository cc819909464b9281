"""Losses on graded or triplet-structured pairs: CoSENT, AnglE, triplet.

Shapes: a_bd, b_bd are the two sides of B pairs; scores_b their gold similarity
(any monotone scale: only the order matters for CoSENT/AnglE).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from embedjax.losses import validation as val


def _pair_inputs(a_bd, b_bd, scores_b):
    a_bd = val.check_embeddings("a_bd", a_bd)
    b_bd = val.check_embeddings("b_bd", b_bd, batch=a_bd.shape[0], dim=a_bd.shape[1])
    if scores_b.shape != (a_bd.shape[0],):
        raise ValueError(f"scores_b must have shape ({a_bd.shape[0]},), got {tuple(scores_b.shape)}")
    return a_bd.astype(jnp.float32), b_bd.astype(jnp.float32), jnp.asarray(scores_b, jnp.float32)


def ranked_pairs_loss(sims_b, scores_b, scale: float):
    """log(1 + sum over (i, j) with score_i > score_j of exp(scale * (sim_j - sim_i))).

    The shared ranking objective of CoSENT and AnglE: every pair that the gold
    scores order must be ordered the same way by the predicted similarities.
    """
    diff = scale * (sims_b[None, :] - sims_b[:, None])          # [i, j] = scale * (sim_j - sim_i)
    ordered = scores_b[:, None] > scores_b[None, :]
    terms = jnp.where(ordered, diff, -jnp.inf).reshape(-1)
    # log(1 + sum exp(x)) = logsumexp([0, x...]); with no ordered pair this is log(1) = 0.
    return jax.nn.logsumexp(jnp.concatenate([jnp.zeros((1,)), terms]))


def cosent(a_bd, b_bd, scores_b, *, scale: float = 20.0):
    """CoSENT (Su 2022): ranking loss on the cosine similarities of graded pairs. Scalar."""
    a, b, scores = _pair_inputs(a_bd, b_bd, scores_b)
    cos = jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)).clip(1e-12)
    return ranked_pairs_loss(cos, scores, scale)


def angle_similarity(a_bd, b_bd):
    """AnglE's similarity (Li & Li 2023): read each embedding as D/2 complex numbers
    (first half real, second half imaginary parts), divide a by b elementwise, scale the
    quotient by |b| / |a| (whole-vector norms) and return |sum of real + imaginary parts|,
    which is small when the angle difference in complex space is small. [B]"""
    if a_bd.shape[-1] % 2:
        raise ValueError(f"AnglE needs an even embedding dim (real and imaginary halves), got {a_bd.shape[-1]}")
    re_a, im_a = jnp.split(a_bd, 2, axis=-1)
    re_b, im_b = jnp.split(b_bd, 2, axis=-1)
    denom = jnp.sum(re_b ** 2 + im_b ** 2, -1, keepdims=True)
    re = (re_a * re_b + im_a * im_b) / denom
    im = (im_a * re_b - re_a * im_b) / denom
    norm_ratio = jnp.sqrt(jnp.sum(re_a ** 2 + im_a ** 2, -1, keepdims=True)) / jnp.sqrt(denom)
    return jnp.abs(jnp.sum((re + im) / norm_ratio, -1))


def angle(a_bd, b_bd, scores_b, *, scale: float = 20.0):
    """AnglE loss (Li & Li 2023, angle part): CoSENT's ranking objective on `angle_similarity`. Scalar."""
    a, b, scores = _pair_inputs(a_bd, b_bd, scores_b)
    return ranked_pairs_loss(angle_similarity(a, b), scores, scale)


def triplet(anchor_bd, positive_bd, negative_bd, *, margin: float = 5.0, distance: str = "euclidean"):
    """Triplet margin loss (Schroff et al. 2015): mean of max(0, dist(a, p) - dist(a, n) + margin). Scalar."""
    a = val.check_embeddings("anchor_bd", anchor_bd).astype(jnp.float32)
    p = val.check_embeddings("positive_bd", positive_bd, batch=a.shape[0], dim=a.shape[1]).astype(jnp.float32)
    n = val.check_embeddings("negative_bd", negative_bd, batch=a.shape[0], dim=a.shape[1]).astype(jnp.float32)
    if distance == "euclidean":
        dist = lambda x, y: jnp.sqrt(jnp.maximum(jnp.sum((x - y) ** 2, -1), 1e-24))  # noqa: E731
    elif distance == "cosine":
        dist = lambda x, y: 1 - jnp.sum(x * y, -1) / (jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(y, axis=-1)).clip(1e-12)  # noqa: E731
    else:
        raise ValueError(f"distance must be 'euclidean' or 'cosine', got {distance!r}")
    return jnp.mean(jax.nn.relu(dist(a, p) - dist(a, n) + margin))

"""Losses on graded or triplet-structured pairs: CoSENT, AnglE, triplet, and CoSENT on
the binary in-batch relevance of retrieval pairs.

Shapes: a_bd, b_bd are the two sides of B pairs; scores_b their gold similarity
(any monotone scale: only the order matters for CoSENT/AnglE).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from embedjax.losses import validation as val
from embedjax.losses.contrastive import _prefix, _sims, prepare_pairs


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


def masked_logsumexp(x, mask):
    """log sum over ``mask`` of exp(x), over all entries; -inf for an empty mask, with a zero
    (not NaN) gradient."""
    nonempty = jnp.any(mask)
    # An empty mask would make logsumexp's gradient 0 * inf = NaN: score everything, then discard.
    lse = jax.nn.logsumexp(jnp.where(mask | ~nonempty, x, -jnp.inf))
    return jnp.where(nonempty, lse, -jnp.inf)


def binary_cosent(sims_bn, positive_bn, negative_bn, scale: float):
    """CoSENT with 0/1 labels: log(1 + sum over positive p, negative n of exp(scale * (s_n - s_p))).

    The double sum factorises, sum_pn exp(scale s_n) exp(-scale s_p) = (sum_n ...)(sum_p ...),
    so the loss is softplus(LSE_n(scale s_n) + LSE_p(-scale s_p)): O(B N), not O((B N)^2).
    Entries in neither mask are ignored; no positive or no negative gives 0.
    """
    total = masked_logsumexp(scale * sims_bn, negative_bn) + masked_logsumexp(-scale * sims_bn, positive_bn)
    return jax.nn.softplus(total)


def cosent_in_batch(q_bd, d_bd, *, scale: float = 20.0, hard_negatives_bkd=None, group_ids_b=None,
                    doc_ids_b=None, hard_negative_ids_bk=None, matryoshka_dims=None, matryoshka_weights=None):
    """CoSENT (Su 2022) on retrieval pairs with binary in-batch relevance. float32 scalar.

    Every (query i, candidate j) cosine of the batch is one graded pair, candidates being
    the B documents (+ the B*K hard negatives [B, K, D]): label 1 when j is a positive of
    i (same group id; default: j == i), 0 otherwise; the loss is CoSENT's
    log(1 + sum over label-1 pairs p and label-0 pairs n of exp(scale * (cos_n - cos_p)))
    over the whole batch, computed as `binary_cosent`. Non-positive candidates carrying
    the document id of i's own positive are false negatives and dropped (the metadata of
    `embedjax.losses.contrastive`). Matryoshka prefixes give sum_m w_m * loss(prefix m).
    """
    b = prepare_pairs(q_bd, d_bd, hard_negatives_bkd, group_ids_b, doc_ids_b, hard_negative_ids_bk,
                      matryoshka_dims=matryoshka_dims, matryoshka_weights=matryoshka_weights)
    same_group = b.group_b[:, None] == b.group_b[None, :]
    positive = [same_group]
    negative = [~same_group & (b.doc_b[:, None] != b.doc_b[None, :])]
    if b.h_bkd is not None:
        hnid = b.hnid_bk.reshape(1, -1)
        positive.append(jnp.zeros((b.q_bd.shape[0], hnid.shape[1]), bool))
        negative.append(hnid != b.doc_b[:, None])
    positive, negative = jnp.concatenate(positive, 1), jnp.concatenate(negative, 1)
    total = jnp.float32(0.0)
    for dim, weight in zip(b.dims, b.weights):
        q = _prefix(b.q_bd, dim, "cos")
        keys = [_prefix(b.d_bd, dim, "cos")]
        if b.h_bkd is not None:
            keys.append(_prefix(b.h_bkd, dim, "cos").reshape(-1, dim))
        sims = _sims(q, jnp.concatenate(keys, 0))
        total = total + weight * binary_cosent(sims, positive, negative, scale)
    return total


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

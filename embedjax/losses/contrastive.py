"""Dense reference contrastive losses: InfoNCE (with its whole option family) and SigLIP.

These build the full [B, N] score matrices and are the slow twins of the
memory-tiled ring losses in `embedjax.losses.ring` (same signature, same value
and gradients). Shapes use suffixes: b = batch, d = embedding dim, k = hard
negatives per query, g = guide embedding dim.

Positives and masks come from per-example metadata:

* ``group_ids_b`` (default ``arange(B)``): document j is a positive of query i when
  their group ids are equal, so repeated queries give several positives per query.
* ``doc_ids_b`` (default: the group ids) and ``hard_negative_ids_bk``: a candidate
  that is not a positive but carries the same document id as the query's own
  positive is a false negative and is dropped.
* ``margin``: a negative whose similarity exceeds the query's similarity to its
  own positive minus ``margin`` is dropped (false-negative filtering, as in
  NV-Retriever's positive-aware mining).
* ``guide_*`` embeddings (GISTEmbed, Solatorio 2024): a negative whose *guide*
  similarity exceeds the guide similarity of the pair minus ``guide_margin`` is dropped.

A row whose negatives are all masked has loss exactly 0 (and zero gradient): the
denominator then holds only the positives. Every row keeps its own positive, so no
row is ever empty and the loss is never NaN.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from embedjax.losses import validation as val
from embedjax.multivector.maxsim import maxsim, maxsim_paired

NO_ID = jnp.iinfo(jnp.int32).min  # id of "no document"; never equals a real id


def learnable_temperature(log_temperature, min_temperature: float = 0.01, max_temperature: float = 1.0):
    """Temperature from a trainable log-parameter, clamped to [min, max] (CLIP-style).

    ``log_temperature`` is a float scalar parameter; the clamp keeps the
    softmax from collapsing (too small) or flattening (too large); outside the
    clamp range its gradient is zero.
    """
    if not 0 < min_temperature < max_temperature:
        raise ValueError(f"need 0 < min_temperature < max_temperature, got {min_temperature}, {max_temperature}")
    return jnp.exp(jnp.clip(log_temperature, jnp.log(min_temperature), jnp.log(max_temperature)))


def inverse_norm(x_nd):
    """1 / ||x|| per row in float32 (rows of zeros give a large finite value, not inf)."""
    x = x_nd.astype(jnp.float32)
    return lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1), 1e-24))


class PairBatch(NamedTuple):
    """Validated inputs of an InfoNCE/SigLIP call (global arrays)."""

    q_bd: jax.Array
    d_bd: jax.Array
    h_bkd: jax.Array | None
    group_b: jax.Array
    doc_b: jax.Array
    hnid_bk: jax.Array | None
    guide_q_bg: jax.Array | None
    guide_d_bg: jax.Array | None
    guide_h_bkg: jax.Array | None
    dims: tuple[int, ...]
    weights: tuple[float, ...]
    # MaxSim only: token masks (q/d [B, L], hard negatives [B, K, L]); None for single vectors.
    q_mask: jax.Array | None = None
    d_mask: jax.Array | None = None
    h_mask: jax.Array | None = None


def prepare_pairs(q_bd, d_bd, hard_negatives_bkd=None, group_ids_b=None, doc_ids_b=None,
                  hard_negative_ids_bk=None, guide_q_bg=None, guide_d_bg=None,
                  guide_hard_negatives_bkg=None, matryoshka_dims=None, matryoshka_weights=None,
                  similarity: str = "dot", q_mask_bl=None, d_mask_bl=None, hard_negatives_mask_bkl=None) -> PairBatch:
    """Validate shapes/dtypes and fill metadata defaults (shared by dense and ring losses).

    With ``similarity="maxsim"`` the embeddings are token vectors: q [B, Lq, D], d [B, Ld, D],
    hard negatives [B, K, Lh, D], each with an optional bool token mask (None: all real)."""
    multi = similarity == "maxsim"
    if not multi and any(m is not None for m in (q_mask_bl, d_mask_bl, hard_negatives_mask_bkl)):
        raise ValueError("token masks (q_mask_bl, d_mask_bl, hard_negatives_mask_bkl) need similarity='maxsim'")
    q_bd = val.check_embeddings("q_bd", q_bd, ndim=3 if multi else 2)
    batch, dim = q_bd.shape[0], q_bd.shape[-1]
    d_bd = val.check_embeddings("d_bd", d_bd, batch=batch, dim=dim, ndim=3 if multi else 2)
    h_bkd = None
    if hard_negatives_bkd is not None:
        h_bkd = val.check_embeddings("hard_negatives_bkd", hard_negatives_bkd, batch=batch, dim=dim,
                                     ndim=4 if multi else 3)
        if h_bkd.shape[1] == 0:
            raise ValueError("hard_negatives_bkd has k=0 hard negatives per query; pass None instead")
    elif hard_negatives_mask_bkl is not None:
        raise ValueError("hard_negatives_mask_bkl given without hard_negatives_bkd")
    masks = (None, None, None)
    if multi:
        masks = (val.check_token_mask("q_mask_bl", q_mask_bl, "q_bd", q_bd, every_row_needs_a_token=True),
                 val.check_token_mask("d_mask_bl", d_mask_bl, "d_bd", d_bd, every_row_needs_a_token=True),
                 None if h_bkd is None else val.check_token_mask(
                     "hard_negatives_mask_bkl", hard_negatives_mask_bkl, "hard_negatives_bkd", h_bkd,
                     every_row_needs_a_token=True))
    group_b = val.check_ids("group_ids_b", group_ids_b, (batch,))
    group_b = jnp.arange(batch, dtype=jnp.int32) if group_b is None else group_b
    doc_b = val.check_ids("doc_ids_b", doc_ids_b, (batch,))
    doc_b = group_b if doc_b is None else doc_b
    hnid_bk = None
    if h_bkd is not None:
        hnid_bk = val.check_ids("hard_negative_ids_bk", hard_negative_ids_bk, h_bkd.shape[:2])
        hnid_bk = jnp.full(h_bkd.shape[:2], NO_ID, jnp.int32) if hnid_bk is None else hnid_bk
    elif hard_negative_ids_bk is not None:
        raise ValueError("hard_negative_ids_bk given without hard_negatives_bkd")
    guides = (guide_q_bg, guide_d_bg, guide_hard_negatives_bkg)
    if any(g is not None for g in guides):
        if guide_q_bg is None or guide_d_bg is None:
            raise ValueError("GISTEmbed guide filtering needs both guide_q_bg and guide_d_bg")
        guide_q_bg = val.check_embeddings("guide_q_bg", guide_q_bg, batch=batch)
        guide_d_bg = val.check_embeddings("guide_d_bg", guide_d_bg, batch=batch, dim=guide_q_bg.shape[1])
        if (h_bkd is None) != (guide_hard_negatives_bkg is None):
            raise ValueError("pass guide_hard_negatives_bkg exactly when hard_negatives_bkd is given")
        if guide_hard_negatives_bkg is not None:
            guide_hard_negatives_bkg = val.check_embeddings(
                "guide_hard_negatives_bkg", guide_hard_negatives_bkg, batch=batch, dim=guide_q_bg.shape[1], ndim=3)
            if guide_hard_negatives_bkg.shape[1] != h_bkd.shape[1]:
                raise ValueError("guide_hard_negatives_bkg must have as many negatives per query as hard_negatives_bkd")
    dims, weights = val.matryoshka_spec(matryoshka_dims, matryoshka_weights, dim)
    return PairBatch(q_bd, d_bd, h_bkd, group_b, doc_b, hnid_bk, guide_q_bg, guide_d_bg,
                     guide_hard_negatives_bkg, dims, weights, *masks)


def _prefix(x, dim: int, similarity: str):
    x = x[..., :dim].astype(jnp.float32)
    if similarity == "cos":
        x = x * inverse_norm(x)[..., None]
    return x


class Tokens(NamedTuple):
    """A side of a MaxSim loss: token vectors [N, L, D] and their bool mask [N, L]."""

    x: jax.Array
    mask: jax.Array


def _side(x, mask, dim: int, similarity: str):
    """One side of the loss at prefix ``dim``: an [N, D] array, or `Tokens` for MaxSim."""
    x = _prefix(x, dim, similarity)
    return Tokens(x, mask) if similarity == "maxsim" else x


def _flatten_negatives(h):
    """[B, K, ...] hard negatives -> [B*K, ...] candidates (tokens and masks alike)."""
    if isinstance(h, Tokens):
        return Tokens(h.x.reshape((-1,) + h.x.shape[2:]), h.mask.reshape((-1,) + h.mask.shape[2:]))
    return h.reshape(-1, h.shape[-1])


def _sims(a_nd, b_md):
    """All-pairs similarities [N, M]: dot products, or MaxSim for `Tokens`."""
    if isinstance(a_nd, Tokens):
        return maxsim(a_nd.x, a_nd.mask, b_md.x, b_md.mask)
    return jnp.matmul(a_nd, b_md.T, precision=lax.Precision.HIGHEST)


def _pair_sims(a_nd, b_nd):
    """Row-wise similarities [N] of a row with its partner."""
    if isinstance(a_nd, Tokens):
        return maxsim_paired(a_nd.x, a_nd.mask, b_nd.x, b_nd.mask)
    return jnp.sum(a_nd * b_nd, axis=1)


def _row_lse(logits, mask):
    return jax.nn.logsumexp(jnp.where(mask, logits, -jnp.inf), axis=1)


def focal_weighted(ce_b, focal_gamma: float):
    """Focal-style reweighting ``(1 - p)^gamma * ce`` with ``p = exp(-ce)`` the positive's
    probability (Lin et al. 2017, applied to InfoNCE rows); gamma=0 is plain InfoNCE.
    Rows with ce == 0 (no valid negatives) get weight 0 and a finite zero gradient."""
    if focal_gamma == 0:
        return ce_b
    one_minus_p = -jnp.expm1(-ce_b)
    safe = jnp.where(one_minus_p > 0, one_minus_p, 1.0)
    return jnp.where(one_minus_p > 0, safe ** focal_gamma, 0.0) * ce_b


def _keep(sims, diag, margin, guide_sims, guide_diag, guide_margin):
    """Negatives kept by the margin and the guide filter (diag = the row's pair similarity)."""
    keep = jnp.ones(sims.shape, bool)
    if margin is not None:
        keep &= sims <= diag[:, None] - margin
    if guide_sims is not None:
        keep &= guide_sims <= guide_diag[:, None] - guide_margin
    return keep


def infonce(q_bd, d_bd, *, temperature, hard_negatives_bkd=None, group_ids_b=None, doc_ids_b=None,
            hard_negative_ids_bk=None, bidirectional: bool = False, same_side: bool = False,
            margin: float | None = None, guide_q_bg=None, guide_d_bg=None, guide_hard_negatives_bkg=None,
            guide_margin: float = 0.0, focal_gamma: float = 0.0, similarity: str = "dot",
            matryoshka_dims=None, matryoshka_weights=None, q_mask_bl=None, d_mask_bl=None,
            hard_negatives_mask_bkl=None):
    """InfoNCE / multiple-negatives ranking loss (van den Oord et al. 2018; Henderson et al. 2017),
    dense reference. Returns a float32 scalar.

    Args:
      q_bd, d_bd: [B, D] query and document embeddings; row i of each is a pair.
      temperature: scalar > 0 (logits = similarity / temperature). A traced value is
        clamped to ``validation.MIN_TEMPERATURE``; use `learnable_temperature` to train it.
      hard_negatives_bkd: [B, K, D] mined negatives; all B*K join every query's candidates.
      group_ids_b, doc_ids_b, hard_negative_ids_bk: metadata for positives and
        false-negative masking (see the module docstring).
      bidirectional: also the d->q direction (each document against all queries),
        averaged with q->d (CLIP-style symmetric loss).
      same_side: add q->q (and, if bidirectional, d->d) negatives to each row's
        denominator (GTE's improved contrastive loss, Li et al. 2023).
      margin, guide_*, guide_margin: false-negative filters (module docstring).
      focal_gamma: focal reweighting of hard rows (`focal_weighted`).
      similarity: "dot" (embeddings as given), "cos" (each prefix L2-normalised) or "maxsim"
        (late interaction: q_bd [B, Lq, D], d_bd [B, Ld, D], hard negatives [B, K, Lh, D] are
        token vectors; see `embedjax.multivector.maxsim`: masked document tokens score -inf).
      matryoshka_dims, matryoshka_weights: prefix sizes and weights; the loss is
        sum_m w_m * InfoNCE(first dims_m coordinates) (Kusupati et al. 2022).
      q_mask_bl, d_mask_bl, hard_negatives_mask_bkl: bool token masks for "maxsim" (None: all
        tokens real); a row with no unmasked token is an error.
    """
    batch = prepare_pairs(q_bd, d_bd, hard_negatives_bkd, group_ids_b, doc_ids_b, hard_negative_ids_bk,
                          guide_q_bg, guide_d_bg, guide_hard_negatives_bkg, matryoshka_dims, matryoshka_weights,
                          similarity, q_mask_bl, d_mask_bl, hard_negatives_mask_bkl)
    temperature = val.check_positive_scalar("temperature", temperature)
    val.check_similarity(similarity)
    if focal_gamma < 0:
        raise ValueError(f"focal_gamma must be >= 0, got {focal_gamma}")
    total = jnp.float32(0.0)
    for dim, weight in zip(batch.dims, batch.weights):
        total = total + weight * _infonce_one_prefix(batch, dim, temperature, bidirectional, same_side, margin,
                                                     guide_margin, focal_gamma, similarity)
    return total


def _infonce_one_prefix(b: PairBatch, dim, temperature, bidirectional, same_side, margin, guide_margin,
                        focal_gamma, similarity):
    n = b.q_bd.shape[0]
    q, d = _side(b.q_bd, b.q_mask, dim, similarity), _side(b.d_bd, b.d_mask, dim, similarity)
    same_group = b.group_b[:, None] == b.group_b[None, :]
    same_doc = b.doc_b[:, None] == b.doc_b[None, :]
    diag = _pair_sims(q, d)
    guided = b.guide_q_bg is not None
    gq = b.guide_q_bg.astype(jnp.float32) if guided else None
    gd = b.guide_d_bg.astype(jnp.float32) if guided else None
    gdiag = jnp.sum(gq * gd, axis=1) if guided else None
    none = jnp.zeros((n, n), bool)

    def keep(sims, guide_sims):
        return _keep(sims, diag, margin, guide_sims, gdiag, guide_margin)

    # q -> candidates: documents, hard negatives, (other queries).
    s_qd = _sims(q, d)
    g_qd = _sims(gq, gd) if guided else None
    sims, pos, valid = [s_qd], [same_group], [same_group | (~same_group & ~same_doc & keep(s_qd, g_qd))]
    if b.h_bkd is not None:
        s_qh = _sims(q, _flatten_negatives(_side(b.h_bkd, b.h_mask, dim, similarity)))
        g_qh = _sims(gq, b.guide_h_bkg.astype(jnp.float32).reshape(-1, gq.shape[1])) if guided else None
        sims.append(s_qh)
        pos.append(jnp.zeros(s_qh.shape, bool))
        valid.append((b.hnid_bk.reshape(1, -1) != b.doc_b[:, None]) & keep(s_qh, g_qh))
    if same_side:
        s_qq = _sims(q, q)
        sims.append(s_qq)
        pos.append(none)
        valid.append(~same_group & keep(s_qq, _sims(gq, gq) if guided else None))
    logits = jnp.concatenate(sims, 1) / temperature
    ce_q = _row_lse(logits, jnp.concatenate(valid, 1)) - _row_lse(logits, jnp.concatenate(pos, 1))
    loss = jnp.mean(focal_weighted(ce_q, focal_gamma))
    if not bidirectional:
        return loss
    # d -> candidates: queries, (other documents). Group/doc relations are symmetric.
    s_dq = s_qd.T
    sims, pos = [s_dq], [same_group]
    valid = [same_group | (~same_group & ~same_doc & keep(s_dq, g_qd.T if guided else None))]
    if same_side:
        s_dd = _sims(d, d)
        sims.append(s_dd)
        pos.append(none)
        valid.append(~same_group & ~same_doc & keep(s_dd, _sims(gd, gd) if guided else None))
    logits = jnp.concatenate(sims, 1) / temperature
    ce_d = _row_lse(logits, jnp.concatenate(valid, 1)) - _row_lse(logits, jnp.concatenate(pos, 1))
    return 0.5 * (loss + jnp.mean(focal_weighted(ce_d, focal_gamma)))


def siglip(q_bd, d_bd, *, temperature, bias, hard_negatives_bkd=None, group_ids_b=None, doc_ids_b=None,
           hard_negative_ids_bk=None, similarity: str = "dot", matryoshka_dims=None, matryoshka_weights=None):
    """Sigmoid pairwise loss (SigLIP, Zhai et al. 2023), dense reference. Returns a float32 scalar.

    logit_ij = sim(q_i, c_j) / temperature + bias over candidates c = documents (+ hard
    negatives); label +1 for positives (same group id), -1 otherwise; loss =
    sum_ij softplus(-label_ij * logit_ij) / B. False negatives (same document id,
    not a positive; hard negatives whose id is the query's document) are left out.
    ``bias`` is a float scalar (learnable; SigLIP initialises it at -10).
    """
    val.check_similarity(similarity, ("dot", "cos"))
    b = prepare_pairs(q_bd, d_bd, hard_negatives_bkd, group_ids_b, doc_ids_b, hard_negative_ids_bk,
                      matryoshka_dims=matryoshka_dims, matryoshka_weights=matryoshka_weights)
    temperature = val.check_positive_scalar("temperature", temperature)
    if jnp.ndim(bias) != 0:
        raise ValueError(f"bias must be a scalar, got shape {jnp.shape(bias)}")
    n = b.q_bd.shape[0]
    same_group = b.group_b[:, None] == b.group_b[None, :]
    same_doc = b.doc_b[:, None] == b.doc_b[None, :]
    total = jnp.float32(0.0)
    for dim, weight in zip(b.dims, b.weights):
        q, d = _prefix(b.q_bd, dim, similarity), _prefix(b.d_bd, dim, similarity)
        sims, labels, valid = [_sims(q, d)], [jnp.where(same_group, 1.0, -1.0)], [same_group | ~same_doc]
        if b.h_bkd is not None:
            s_qh = _sims(q, _prefix(b.h_bkd, dim, similarity).reshape(-1, dim))
            sims.append(s_qh)
            labels.append(-jnp.ones(s_qh.shape))
            valid.append(b.hnid_bk.reshape(1, -1) != b.doc_b[:, None])
        logits = jnp.concatenate(sims, 1) / temperature + bias
        pair_loss = jax.nn.softplus(-jnp.concatenate(labels, 1) * logits)
        total = total + weight * jnp.sum(jnp.where(jnp.concatenate(valid, 1), pair_loss, 0.0)) / n
    return total

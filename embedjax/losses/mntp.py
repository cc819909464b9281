"""Masked next-token prediction (MNTP, LLM2Vec: BehnamGhader et al. 2024) as pure functions.

A decoder made bidirectional learns to use its right context by predicting masked tokens, the
way it was pre-trained to predict: a masked token at position ``i`` is predicted from the
logits at position ``i - 1`` (the LM head reads the state of the previous position), so the
head's learned next-token mapping is reused.

- `mntp_mask` picks positions with probability ``probability`` among the eligible ones (a real
  token, not a special token, whose previous position is a real token: left or right padding
  alike) and, BERT-style, replaces 80% of them with the mask token, 10% with a random token and
  leaves 10% unchanged.
- `mntp_nll` is the summed cross-entropy of the picked tokens and their count per row, with the
  logits ``h_{i-1} @ E^T`` of the tied LM head ``E [vocab, d]``, computed in row chunks under
  ``jax.checkpoint`` so the ``[rows, L, vocab]`` logits never exist at once. The loss is
  ``sum(nll) / sum(count)`` over the batch (`mntp_loss`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def mntp_mask(rng, ids_bl, mask_bl, *, probability: float, mask_id: int, vocab_size: int, special_ids=()):
    """-> ``(inputs_bl int32, targets_bl int32, weights_bl float32)``: the corrupted input ids, the
    original ids, and 1.0 at every picked position (0.0 elsewhere)."""
    if not 0.0 < probability < 1.0:
        raise ValueError(f"MNTP mask probability {probability} must be in (0, 1) (LLM2Vec: 0.2 or 0.8)")
    ids_bl = ids_bl.astype(jnp.int32)
    real_bl = mask_bl.astype(bool)
    previous_real_bl = jnp.pad(real_bl[:, :-1], ((0, 0), (1, 0)))
    eligible_bl = real_bl & previous_real_bl
    for special in special_ids:
        eligible_bl &= ids_bl != special
    pick_rng, kind_rng, token_rng = jax.random.split(rng, 3)
    picked_bl = eligible_bl & jax.random.bernoulli(pick_rng, probability, ids_bl.shape)
    kind_bl = jax.random.uniform(kind_rng, ids_bl.shape)
    random_bl = jax.random.randint(token_rng, ids_bl.shape, 0, vocab_size, jnp.int32)
    replaced_bl = jnp.where(kind_bl < 0.8, jnp.int32(mask_id), jnp.where(kind_bl < 0.9, random_bl, ids_bl))
    inputs_bl = jnp.where(picked_bl, replaced_bl, ids_bl)
    return inputs_bl, ids_bl, picked_bl.astype(jnp.float32)


def _chunk_rows(rows: int, length: int, vocab: int, budget: int = 1 << 24) -> int:
    """The largest divisor of ``rows`` whose logits (chunk x length x vocab floats) fit ``budget``."""
    target = max(1, budget // max(1, length * vocab))
    return max(d for d in range(1, rows + 1) if rows % d == 0 and d <= target)


def mntp_nll(hidden_bld, embedding_vd, targets_bl, weights_bl, *, chunk_rows: int | None = None):
    """-> ``(nll_b, count_b)`` float32: per row, the summed negative log-likelihood of the picked
    tokens (position ``i`` scored by the logits at ``i - 1``) and how many there are."""
    rows, length, _ = hidden_bld.shape
    prev_bld = hidden_bld[:, :-1].astype(jnp.float32)
    targets_bl = targets_bl[:, 1:]
    weights_bl = weights_bl[:, 1:].astype(jnp.float32)
    table_vd = embedding_vd.astype(jnp.float32)
    chunk = chunk_rows or _chunk_rows(rows, length, table_vd.shape[0])
    if rows % chunk:
        raise ValueError(f"chunk_rows={chunk} does not divide the {rows} rows")

    @jax.checkpoint
    def one_chunk(args):
        h_cld, t_cl, w_cl = args
        logits_clv = jnp.einsum("cld,vd->clv", h_cld, table_vd)
        picked_cl = jnp.take_along_axis(logits_clv, t_cl[..., None], axis=-1)[..., 0]
        nll_cl = jax.nn.logsumexp(logits_clv, axis=-1) - picked_cl
        return jnp.sum(nll_cl * w_cl, axis=1)

    def split(x):
        return x.reshape(rows // chunk, chunk, *x.shape[1:])

    nll_b = jax.lax.map(one_chunk, (split(prev_bld), split(targets_bl), split(weights_bl))).reshape(rows)
    return nll_b, jnp.sum(weights_bl, axis=1)


def mntp_loss(nll_b, count_b):
    """Mean negative log-likelihood over every picked token of the batch (0 when none was picked)."""
    return jnp.sum(nll_b) / jnp.maximum(jnp.sum(count_b), 1.0)

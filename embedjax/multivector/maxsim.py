"""MaxSim (Chamfer) late-interaction scores, the plain-jnp definition every fast path is tested
against.

score(q, d) = sum over the query's real tokens i of max over the document's real tokens j of
<q_i, d_j>. Masked document tokens score -inf, so they are never the max (PyLate scores them 0,
which differs whenever all of a query token's similarities are negative); masked query tokens
add nothing. A document with no real token scores -inf.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def maxsim(q_nld, q_mask_nl, d_mld, d_mask_ml):
    """All-pairs MaxSim float32 [N, M] of N queries [N, Lq, D] against M documents [M, Ld, D]."""
    sims_nmij = jnp.einsum("nid,mjd->nmij", q_nld.astype(jnp.float32), d_mld.astype(jnp.float32),
                           precision=lax.Precision.HIGHEST)
    return reduce_token_sims(sims_nmij, q_mask_nl[:, None, :], d_mask_ml[None, :, :])


def maxsim_paired(q_nld, q_mask_nl, d_nld, d_mask_nl):
    """Row-wise MaxSim float32 [N]: query n against document n."""
    sims_nij = jnp.einsum("nid,njd->nij", q_nld.astype(jnp.float32), d_nld.astype(jnp.float32),
                          precision=lax.Precision.HIGHEST)
    return reduce_token_sims(sims_nij, q_mask_nl, d_mask_nl)


def reduce_token_sims(sims_ij, q_mask_i, d_mask_j):
    """Max over document tokens (masked ones -inf), then sum over real query tokens.

    ``sims_ij`` [..., Lq, Ld]; masks broadcast to [..., Lq] and [..., Ld]."""
    best_i = jnp.max(jnp.where(d_mask_j[..., None, :], sims_ij, -jnp.inf), axis=-1)
    return jnp.sum(jnp.where(q_mask_i, best_i, 0.0), axis=-1)

"""A small DLRM-style CTR model (Naumov et al. 2019) on top of any embedding table.

    logits_b = DLRM(top_mlp=(64, 32)).apply({"params": p}, emb_bfd, dense_bn)

Inputs: field embeddings ``emb_bfd`` [B, F, d] (from `embedjax.tables`) and, for datasets with
numeric features, ``dense_bn`` [B, D], mapped by the bottom MLP to one more d-dimensional vector.
The n vectors interact through their n(n-1)/2 pairwise dot products; the top MLP reads the
flattened vectors beside those dots and outputs one logit per example (train with binary
cross-entropy on ``sigmoid(logit)``).
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np


def pairwise_dots(vectors_bnd):
    """[B, n, d] -> [B, n(n-1)/2]: <v_i, v_j> for i < j, row-major over (i, j)."""
    n = vectors_bnd.shape[1]
    gram = jnp.einsum("bid,bjd->bij", vectors_bnd, vectors_bnd)
    i, j = np.triu_indices(n, k=1)
    return gram[:, i, j]


class DLRM(nn.Module):
    top_mlp: Sequence[int] = (64, 32)
    bottom_mlp: Sequence[int] = (32,)

    @nn.compact
    def __call__(self, emb_bfd, dense_bn=None):
        vectors = emb_bfd
        if dense_bn is not None and dense_bn.shape[-1] > 0:
            x = dense_bn
            for i, width in enumerate(self.bottom_mlp):
                x = nn.relu(nn.Dense(width, name=f"bottom_{i}")(x))
            x = nn.Dense(emb_bfd.shape[-1], name="bottom_out")(x)
            vectors = jnp.concatenate([x[:, None, :], emb_bfd], axis=1)
        b = vectors.shape[0]
        x = jnp.concatenate([vectors.reshape(b, -1), pairwise_dots(vectors)], axis=-1)
        for i, width in enumerate(self.top_mlp):
            x = nn.relu(nn.Dense(width, name=f"top_{i}")(x))
        return nn.Dense(1, name="top_out")(x)[:, 0]

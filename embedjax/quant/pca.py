"""PCA to fewer dimensions, fitted on sample embeddings."""
from __future__ import annotations

import jax.numpy as jnp


def fit_pca(calibration_nd, dims: int):
    """``(mean_d, components_dk)`` of the top-``dims`` principal directions (float32)."""
    x = jnp.asarray(calibration_nd, jnp.float32)
    if x.ndim != 2:
        raise ValueError(f"calibration_nd must be 2-D [N, D]; got shape {x.shape}")
    n, d = x.shape
    if not 1 <= dims <= d:
        raise ValueError(f"dims must be in [1, {d}]; got {dims}")
    if n < 2:
        raise ValueError("fit_pca needs at least 2 calibration embeddings")
    mean = x.mean(axis=0)
    # Right singular vectors of the centred data are the principal directions,
    # sorted by decreasing singular value.
    _, _, vt = jnp.linalg.svd(x - mean, full_matrices=False)
    return mean, vt[:dims].T


def apply_pca(x_nd, mean_d, components_dk, *, center: bool = True):
    """Project [N, D] -> [N, k]. ``center=False`` keeps inner products free of a per-vector shift."""
    x = jnp.asarray(x_nd, jnp.float32)
    if x.shape[-1] != components_dk.shape[0]:
        raise ValueError(f"x_nd has {x.shape[-1]} dims but the PCA was fitted on {components_dk.shape[0]}")
    return ((x - mean_d) if center else x) @ components_dk

"""Input checks shared by the dense and ring losses.

Each check raises ValueError/TypeError naming the offending input and the fix.
Checks only look at shapes and at concrete values; traced values (inside jit)
are handled by the documented clamps in the losses themselves.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# A traced temperature cannot be checked at trace time; it is clamped to this
# floor so the loss stays finite (see `infonce`). Learnable temperatures should
# come from `learnable_temperature`, which already clamps.
MIN_TEMPERATURE = 1e-4


def check_embeddings(name: str, x, *, batch: int | None = None, dim: int | None = None, ndim: int = 2):
    """Check a float array of rank ``ndim`` with optional batch/dim sizes; return it as jnp array."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if len(x.shape) != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating array (float32 or bfloat16), got dtype {x.dtype}")
    if batch is not None and x.shape[0] != batch:
        raise ValueError(f"{name} has batch size {x.shape[0]} but the queries have {batch}; pass one row per query")
    if dim is not None and x.shape[-1] != dim:
        raise ValueError(f"{name} has embedding dim {x.shape[-1]} but the queries have {dim}; embed both with the same model head")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty; a contrastive loss needs at least one pair")
    return x


def check_ids(name: str, ids, shape: Sequence[int]):
    """Check an integer id array of exactly ``shape``."""
    if ids is None:
        return None
    if tuple(ids.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(ids.shape)}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"{name} must hold integer ids, got dtype {ids.dtype}")
    return jnp.asarray(ids, jnp.int32)


def _concrete(x):
    """The value of ``x`` as NumPy if it is known at trace time, else None."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def check_positive_int(name: str, value, meaning: str = "") -> int:
    """``value`` if it is an int >= 1 (a bool is not); else a ValueError naming ``name`` and, when
    given, what the count means."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int{f' ({meaning})' if meaning else ''}, got {value!r}")
    return value


def check_positive_scalar(name: str, value, *, floor: float = MIN_TEMPERATURE):
    """Validate a positive scalar (temperature); clamp traced values to ``floor``."""
    if value is None:
        raise ValueError(f"{name} is required (a positive scalar)")
    if np.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar, got shape {np.shape(value)}")
    concrete = _concrete(value)
    if concrete is not None and not (np.isfinite(concrete) and concrete > 0):
        raise ValueError(f"{name} must be a finite value > 0, got {concrete}; use learnable_temperature() for a trainable one")
    return jnp.maximum(jnp.asarray(value, jnp.float32), floor)


def matryoshka_spec(dims, weights, full_dim: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Validate Matryoshka prefix dims/weights; ``dims=None`` means the full embedding only."""
    if dims is None:
        if weights is not None:
            raise ValueError("matryoshka_weights given without matryoshka_dims; pass both or neither")
        return (full_dim,), (1.0,)
    dims = tuple(int(d) for d in dims)
    if not dims:
        raise ValueError("matryoshka_dims is empty; pass at least one prefix size, e.g. (64, 128, 768), or None")
    if any(d < 1 or d > full_dim for d in dims):
        raise ValueError(f"matryoshka_dims {dims} must lie in [1, {full_dim}] (the embedding dim)")
    if list(dims) != sorted(set(dims)):
        raise ValueError(f"matryoshka_dims {dims} must be strictly increasing")
    weights = (1.0,) * len(dims) if weights is None else tuple(float(w) for w in weights)
    if len(weights) != len(dims):
        raise ValueError(f"matryoshka_weights has {len(weights)} entries but matryoshka_dims has {len(dims)}")
    return dims, weights


SIMILARITIES = ("dot", "cos", "maxsim")


def check_similarity(similarity: str, allowed: tuple[str, ...] = SIMILARITIES) -> str:
    if similarity not in allowed:
        raise ValueError(f"similarity must be one of {allowed}, got {similarity!r}")
    return similarity


def check_token_mask(name: str, mask, tokens_name: str, tokens, *, every_row_needs_a_token: bool):
    """A bool mask [..., L] matching ``tokens`` [..., L, D] (None: every token is real).

    Rows with no real token are an error when ``every_row_needs_a_token`` (checked when the
    mask is concrete; inside jit the caller's data must guarantee it)."""
    if mask is None:
        return jnp.ones(tokens.shape[:-1], bool)
    if tuple(mask.shape) != tuple(tokens.shape[:-1]):
        raise ValueError(f"{name} must have shape {tuple(tokens.shape[:-1])} to match {tokens_name} "
                         f"{tuple(tokens.shape)} (one entry per token); got {tuple(mask.shape)}")
    mask = jnp.asarray(mask).astype(bool)
    concrete = _concrete(mask)
    if every_row_needs_a_token and concrete is not None:
        empty = np.argwhere(~concrete.any(axis=-1))
        if len(empty):
            raise ValueError(f"{name} has rows with no unmasked token (first: index {tuple(empty[0])}); MaxSim of "
                             "an empty token set is undefined: drop those rows or keep at least one token")
    return mask

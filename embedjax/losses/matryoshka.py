"""Matryoshka (Kusupati et al. 2022) and 2D Matryoshka (Li et al. 2024) / Starbucks
(Zhuang et al. 2024) wrappers that turn any embedding loss into a sum over embedding
prefixes (and layers), and builders of the two (layer, dim) lists: the full product
(`two_d_matryoshka_pairs`) and the diagonal (`starbucks_pairs`).

For InfoNCE and SigLIP prefer the fused ``matryoshka_dims`` option of
`infonce`/`ring_infonce`, which scores every prefix in one pass over the keys.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import jax.numpy as jnp

from embedjax.losses import validation as val
from embedjax.losses.contrastive import inverse_norm

# Keyword arguments of the embedjax losses that hold embeddings (truncated with the rest).
EMBEDDING_KWARGS = ("hard_negatives_bkd",)


def _truncate(x, dim, normalize):
    x = x[..., :dim]
    return x * inverse_norm(x)[..., None].astype(x.dtype) if normalize else x


def matryoshka_loss(loss_fn: Callable, dims: Sequence[int], weights: Sequence[float] | None = None, *,
               normalize: bool = False, embedding_kwargs: Sequence[str] = EMBEDDING_KWARGS) -> Callable:
    """Wrap ``loss_fn(*embeddings, **kwargs)`` into sum_m weights[m] * loss_fn(prefixes of size dims[m]).

    Every positional argument is an embedding array [..., D]; keyword arguments named in
    ``embedding_kwargs`` are truncated too, the others pass through. ``normalize``
    L2-normalises each prefix (use it when the loss expects unit vectors).
    """
    if dims is None or len(dims) == 0:
        raise ValueError("matryoshka needs a non-empty list of prefix dims, e.g. (64, 128, 256, 768)")

    def wrapped(*embeddings, **kwargs):
        full = embeddings[0].shape[-1]
        spec_dims, spec_weights = val.matryoshka_spec(dims, weights, full)
        total = jnp.float32(0.0)
        for dim, weight in zip(spec_dims, spec_weights):
            total = total + weight * _loss_at_dim(loss_fn, embeddings, kwargs, dim, normalize, embedding_kwargs)
        return total

    return wrapped


def _loss_at_dim(loss_fn: Callable, embeddings, kwargs: dict, dim: int, normalize: bool, embedding_kwargs):
    """``loss_fn`` on the first ``dim`` features of the embeddings and of the embedding-valued kwargs."""
    args = [_truncate(x, dim, normalize) for x in embeddings]
    kw = {k: (_truncate(v, dim, normalize) if k in embedding_kwargs and v is not None else v)
          for k, v in kwargs.items()}
    return loss_fn(*args, **kw)


def starbucks_loss(loss_fn: Callable, layer_dims: Sequence[tuple[int, int]], weights: Sequence[float] | None = None, *,
              normalize: bool = False, embedding_kwargs: Sequence[str] = EMBEDDING_KWARGS) -> Callable:
    """2D Matryoshka / Starbucks: sum over a fixed list of (layer, dim) pairs, every step.

    Returns ``fn(layer_embeddings, **kwargs)`` where ``layer_embeddings[layer]`` is the
    tuple of pooled embeddings (e.g. (q_bd, d_bd)) computed from that encoder layer;
    each pair contributes weight * loss_fn(*prefixes of size dim of that layer's embeddings).
    Starbucks (Zhuang et al. 2024) uses pairs like ((2, 32), (4, 64), (6, 128), ...).
    """
    pairs = tuple((int(layer), int(dim)) for layer, dim in layer_dims)
    if not pairs:
        raise ValueError("starbucks_loss needs a non-empty list of (layer, dim) pairs")
    weights = (1.0,) * len(pairs) if weights is None else tuple(float(w) for w in weights)
    if len(weights) != len(pairs):
        raise ValueError(f"starbucks_loss got {len(weights)} weights for {len(pairs)} (layer, dim) pairs")

    def wrapped(layer_embeddings, **kwargs):
        total = jnp.float32(0.0)
        for (layer, dim), weight in zip(pairs, weights):
            if not -len(layer_embeddings) <= layer < len(layer_embeddings):
                raise ValueError(f"starbucks pair ({layer}, {dim}): layer out of range for "
                                 f"{len(layer_embeddings)} layers of embeddings")
            embeddings = layer_embeddings[layer]
            if not 1 <= dim <= embeddings[0].shape[-1]:
                raise ValueError(f"starbucks pair ({layer}, {dim}): dim must be in [1, {embeddings[0].shape[-1]}]")
            total = total + weight * _loss_at_dim(loss_fn, embeddings, kwargs, dim, normalize, embedding_kwargs)
        return total

    return wrapped


def two_d_matryoshka_pairs(layers: Sequence[int], dims: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """2D Matryoshka (Li et al. 2024): every layer with every prefix size, the full product
    ``layers x dims`` in increasing (layer, dim) order, e.g. ((3, 64), (3, 384), (6, 64), (6, 384))."""
    layers, dims = _sorted_unique("layers", layers), _sorted_unique("dims", dims)
    return tuple((layer, dim) for layer in layers for dim in dims)


def starbucks_pairs(layers: Sequence[int], dims: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Starbucks (Zhuang et al. 2024): the diagonal of the layer x dim grid, layer i with
    dim i (small models are shallow *and* narrow), e.g. ((2, 32), (4, 64), (6, 128))."""
    layers, dims = _sorted_unique("layers", layers), _sorted_unique("dims", dims)
    if len(layers) != len(dims):
        raise ValueError(f"starbucks_pairs pairs the i-th layer with the i-th dim: got {len(layers)} layers "
                         f"{layers} and {len(dims)} dims {dims}; pass lists of equal length")
    return tuple(zip(layers, dims))


def _sorted_unique(name: str, values: Sequence[int]) -> tuple[int, ...]:
    values = tuple(int(v) for v in values)
    if not values or any(v < 1 for v in values) or list(values) != sorted(set(values)):
        raise ValueError(f"{name} must be a non-empty, strictly increasing list of positive ints, got {values}")
    return values

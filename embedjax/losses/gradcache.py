"""GradCache (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under
Memory Limited Setup"): the exact gradient of a loss over the *global* batch of
embeddings, with encoder activations held for one sub-batch at a time.

1. Embed every sub-batch without gradients (activations freed after each).
2. Differentiate the loss w.r.t. the global embeddings only (cheap: [B, D]).
3. Re-run each sub-batch under ``jax.vjp`` seeded with its slice of those embedding
   gradients and sum the parameter gradients.

Dropout: sub-batch i uses the key ``fold_in(rng, i)`` in both passes, so the second
pass recomputes exactly the embeddings the loss saw.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from embedjax.losses import validation as val


def _split(batch, sub_batch_size: int):
    sizes = {x.shape[0] for x in jax.tree.leaves(batch)}
    if len(sizes) != 1:
        raise ValueError(f"every array in the batch must have the same leading (batch) size, got sizes {sorted(sizes)}")
    (size,) = sizes
    val.check_positive_int("sub_batch_size", sub_batch_size)
    if size % sub_batch_size:
        raise ValueError(f"batch size {size} is not divisible by sub_batch_size {sub_batch_size}; "
                         "pick a sub-batch size that divides the batch")
    count = size // sub_batch_size
    return count, jax.tree.map(lambda x: x.reshape(count, sub_batch_size, *x.shape[1:]), batch)


def _merge(stacked):
    return jax.tree.map(lambda x: x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]), stacked)


def _sub_key(rng, index):
    return None if rng is None else jax.random.fold_in(rng, index)


def gradcache_value_and_grad(embed_fn: Callable, loss_fn: Callable, params, batch, *, sub_batch_size: int,
                             rng=None):
    """Loss and parameter gradients of ``loss_fn(embed_fn(params, batch))`` via GradCache.

    Args:
      embed_fn: ``embed_fn(params, sub_batch, rng) -> embeddings`` (a pytree of arrays
        with the sub-batch as leading axis, e.g. ``{"q": q_sd, "d": d_sd}``); ``rng`` is
        None when no ``rng`` is given (deterministic), else the sub-batch's dropout key.
      loss_fn: ``loss_fn(embeddings) -> scalar`` over the concatenated global embeddings.
      params: the parameter pytree.
      batch: pytree of arrays with the global batch B as leading axis.
      sub_batch_size: rows embedded at a time; must divide B. Memory for encoder
        activations scales with it; the result does not depend on it.
      rng: optional PRNG key for dropout (sub-batch i uses ``fold_in(rng, i)``).

    Returns ``(loss, grads)`` with grads shaped like params (float32 accumulation).
    """
    embeddings = embed_without_grad(embed_fn, params, batch, sub_batch_size=sub_batch_size, rng=rng)
    loss, emb_grads = jax.value_and_grad(loss_fn)(embeddings)
    grads = pull_back(embed_fn, params, batch, emb_grads, sub_batch_size=sub_batch_size, rng=rng)
    return loss, grads


def embed_without_grad(embed_fn: Callable, params, batch, *, sub_batch_size: int, rng=None):
    """GradCache's first pass: ``embed_fn`` over ``batch`` one sub-batch at a time, no gradients
    kept; the embeddings come back concatenated (leading axis B)."""
    count, chunks = _split(batch, sub_batch_size)
    frozen = lax.stop_gradient(params)
    return _merge(lax.map(lambda xs: embed_fn(frozen, xs[1], _sub_key(rng, xs[0])), (jnp.arange(count), chunks)))


def pull_back(embed_fn: Callable, params, batch, cotangents, *, sub_batch_size: int, rng=None):
    """GradCache's second pass: the parameter gradients of ``<cotangents, embed_fn(params, batch)>``,
    re-running one sub-batch at a time under ``jax.vjp`` (same dropout keys as the first pass);
    float32 accumulation, returned in the params' dtypes."""
    count, chunks = _split(batch, sub_batch_size)
    _, cotangent_chunks = _split(cotangents, sub_batch_size)

    def accumulate(total, xs):
        index, chunk, cotangent = xs
        _, pullback = jax.vjp(lambda p: embed_fn(p, chunk, _sub_key(rng, index)), params)
        (grads,) = pullback(cotangent)
        return jax.tree.map(lambda t, g: t + g.astype(jnp.float32), total, grads), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    grads, _ = lax.scan(accumulate, zeros, (jnp.arange(count), chunks, cotangent_chunks))
    return jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)


def reference_value_and_grad(embed_fn: Callable, loss_fn: Callable, params, batch, *, sub_batch_size: int,
                             rng=None):
    """The plain step GradCache must equal: ordinary autodiff through all sub-batches at
    once (same per-sub-batch dropout keys), holding every activation. For tests/benchmarks."""
    count, chunks = _split(batch, sub_batch_size)

    def total(p):
        parts = [embed_fn(p, jax.tree.map(lambda x: x[i], chunks), _sub_key(rng, i)) for i in range(count)]
        return loss_fn(jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts))

    return jax.value_and_grad(total)(params)

"""The training objective and the jitted, sharded, donating train step.

``make_objective`` turns config values into an `Objective`: a function that embeds
each text column of a batch with dropout on, and the configured loss (CoSENT for graded pairs; InfoNCE — dense, or the
memory-tiled ring version over the ``data`` mesh axis — for retrieval pairs).
``make_train_step`` wraps one optimizer update (plain autodiff, or GradCache when
``gradcache_sub_batch`` > 0) in `jax.jit` with explicit input and output shardings
and the old state's buffers donated to the new one.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from embedjax.train.state import TrainState

LOSSES_FOR_KIND = {"sts": ("cosent",), "retrieval": ("infonce",)}



def global_l2_norm(tree) -> jax.Array:
    """L2 norm of all leaves together, in float32 (optax renamed its own across versions we support)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in jax.tree.leaves(tree)))

def _flatten_negatives(tokens_bkl: dict) -> dict:
    return {name: array.reshape(-1, array.shape[-1]) for name, array in tokens_bkl.items()}


class Objective(NamedTuple):
    """A loss split at the embeddings (what GradCache needs).

    ``embed_columns(params, batch, rng) -> {name: float32 [b, ...]}`` embeds every text
    column of a (sub-)batch; ``loss_from_embeddings(embeddings, batch) -> scalar`` scores
    the global batch's embeddings with the batch's labels/ids.
    """

    embed_columns: Callable
    loss_from_embeddings: Callable


def make_objective(
    embed: Callable,
    *,
    kind: str,
    loss: str,
    cosent_scale: float = 20.0,
    temperature: float = 0.05,
    bidirectional: bool = False,
    mask_false_negatives: bool = True,
    matryoshka_dims=(),
    matryoshka_weights=(),
    ring: bool = False,
    mesh=None,
) -> Objective:
    """The configured loss for a batch layout of `embedjax.data.pipeline`.

    ``embed(params, tokens, rng) -> float32 [B, D]`` embeds one text column with dropout keyed by ``rng``.
    """
    if loss not in LOSSES_FOR_KIND.get(kind, ()):
        raise ValueError(
            f"train.loss={loss!r} does not fit {kind!r} data; use one of {LOSSES_FOR_KIND.get(kind, ())} "
            "(cosent for graded sts pairs, infonce for retrieval pairs)"
        )
    if kind == "sts":
        from embedjax.losses.pairwise import cosent

        def embed_sts(params, batch, rng):
            # One forward pass over both sides (the pipeline pads them to one length): one
            # larger matmul per layer instead of two, and half the program to compile.
            b = batch["score"].shape[0]
            both = jax.tree.map(lambda x, y: jnp.concatenate([x, y], axis=0), batch["a"], batch["b"])
            emb_2bd = embed(params, both, rng)
            return {"a": emb_2bd[:b], "b": emb_2bd[b:]}

        def sts_loss(emb, batch):
            return cosent(emb["a"], emb["b"], batch["score"], scale=cosent_scale)

        return Objective(embed_sts, sts_loss)

    options = dict(
        temperature=temperature,
        bidirectional=bidirectional,
        similarity="cos",  # equals "dot" for normalised embeddings, and normalises Matryoshka prefixes
        matryoshka_dims=tuple(matryoshka_dims) or None,
        matryoshka_weights=tuple(matryoshka_weights) or None,
    )
    if ring:
        if mesh is None:
            raise ValueError("the ring loss needs the mesh")
        from embedjax.losses.ring import ring_infonce

        def contrastive(q_bd, d_bd, **kw):
            return ring_infonce(q_bd, d_bd, mesh=mesh, axis="data", **kw)
    else:
        from embedjax.losses.contrastive import infonce as contrastive

    def embed_retrieval(params, batch, rng):
        rng_q, rng_d, rng_n = jax.random.split(rng, 3)
        out = {"query": embed(params, batch["query"], rng_q), "positive": embed(params, batch["positive"], rng_d)}
        if "negatives" in batch:
            b, k = batch["negative_ids"].shape
            out["negatives"] = embed(params, _flatten_negatives(batch["negatives"]), rng_n).reshape(b, k, -1)
        return out

    def retrieval_loss(emb, batch):
        extra = {}
        if "negatives" in emb:
            extra["hard_negatives_bkd"] = emb["negatives"]
            if mask_false_negatives:
                extra["hard_negative_ids_bk"] = batch["negative_ids"]
        if mask_false_negatives:
            extra["group_ids_b"] = batch["query_id"]
            extra["doc_ids_b"] = batch["positive_id"]
        return contrastive(emb["query"], emb["positive"], **options, **extra)

    return Objective(embed_retrieval, retrieval_loss)


def interleave_rows(batch, sub_batch_size: int):
    """Reorder rows so that GradCache sub-batch i holds rows i, i + c, i + 2c, ... (c = B / sub).

    The batch is sharded in contiguous row blocks per device, so strided sub-batches
    draw rows from every device and each sub-batch pass keeps all devices busy. The
    losses are sums over rows, so the reorder changes no value (up to float rounding).
    """
    size = jax.tree.leaves(batch)[0].shape[0]
    if size % sub_batch_size:
        raise ValueError(f"train.gradcache_sub_batch={sub_batch_size} does not divide the global batch {size}")
    order = jnp.arange(size).reshape(sub_batch_size, size // sub_batch_size).T.reshape(-1)
    return jax.tree.map(lambda x: x[order], batch)


def value_and_grad_fn(objective: Objective, gradcache_sub_batch: int = 0):
    """``(params, batch, rng) -> (loss, grads)``: plain autodiff, or GradCache over sub-batches."""
    if gradcache_sub_batch <= 0:
        def plain(params, batch, rng):
            return jax.value_and_grad(
                lambda p: objective.loss_from_embeddings(objective.embed_columns(p, batch, rng), batch))(params)

        return plain

    from embedjax.losses.gradcache import gradcache_value_and_grad

    def cached(params, batch, rng):
        batch = interleave_rows(batch, gradcache_sub_batch)
        return gradcache_value_and_grad(
            objective.embed_columns, lambda emb: objective.loss_from_embeddings(emb, batch), params, batch,
            sub_batch_size=gradcache_sub_batch, rng=rng)

    return cached


def batch_shardings(batch, mesh, batch_axes) -> dict:
    """A NamedSharding per batch leaf: leading (batch) dimension over ``batch_axes``, the rest replicated."""
    return jax.tree.map(
        lambda leaf: NamedSharding(mesh, PartitionSpec(batch_axes, *([None] * (leaf.ndim - 1)))), batch
    )


def make_train_step(objective: Objective, tx: optax.GradientTransformation, schedule, state_shardings,
                    batch_sharding_tree, mesh, *, gradcache_sub_batch: int = 0):
    """jit(step): ``(state, batch) -> (new_state, metrics)``; the old state's buffers are donated."""
    loss_and_grads = value_and_grad_fn(objective, gradcache_sub_batch)

    def step(state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        loss, grads = loss_and_grads(state.params, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            "grad_norm": global_l2_norm(grads),
            "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
        }
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_sharding_tree),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )

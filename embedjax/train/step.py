"""The training objective and the jitted, sharded, donating train step.

``make_objective`` turns config values into ``objective(params, batch, rng) ->
(loss, aux)``: it embeds each text column of the batch with dropout on and
applies the configured loss (CoSENT for graded pairs; InfoNCE — dense, or the
memory-tiled ring version over the ``data`` mesh axis — for retrieval pairs).
``make_train_step`` wraps one optimizer update in `jax.jit` with explicit input
and output shardings and the old state's buffers donated to the new one.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from embedjax.train.state import TrainState

LOSSES_FOR_KIND = {"sts": ("cosent",), "retrieval": ("infonce",)}


def _flatten_negatives(tokens_bkl: dict) -> dict:
    return {name: array.reshape(-1, array.shape[-1]) for name, array in tokens_bkl.items()}


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
):
    """``objective(params, batch, rng) -> (loss, aux)`` for a batch layout of `embedjax.data.pipeline`.

    ``embed(params, tokens, rng) -> float32 [B, D]`` embeds one text column with dropout keyed by ``rng``.
    """
    if loss not in LOSSES_FOR_KIND.get(kind, ()):
        raise ValueError(
            f"train.loss={loss!r} does not fit {kind!r} data; use one of {LOSSES_FOR_KIND.get(kind, ())} "
            "(cosent for graded sts pairs, infonce for retrieval pairs)"
        )
    if kind == "sts":
        from embedjax.losses.pairwise import cosent

        def sts_objective(params, batch, rng):
            # One forward pass over both sides (the pipeline pads them to one length): one
            # larger matmul per layer instead of two, and half the program to compile.
            b = batch["score"].shape[0]
            both = jax.tree.map(lambda x, y: jnp.concatenate([x, y], axis=0), batch["a"], batch["b"])
            emb_2bd = embed(params, both, rng)
            return cosent(emb_2bd[:b], emb_2bd[b:], batch["score"], scale=cosent_scale), {}

        return sts_objective

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

    def retrieval_objective(params, batch, rng):
        rng_q, rng_d, rng_n = jax.random.split(rng, 3)
        q_bd = embed(params, batch["query"], rng_q)
        d_bd = embed(params, batch["positive"], rng_d)
        extra = {}
        if "negatives" in batch:
            b, k = batch["negative_ids"].shape
            n_nd = embed(params, _flatten_negatives(batch["negatives"]), rng_n)
            extra["hard_negatives_bkd"] = n_nd.reshape(b, k, -1)
            if mask_false_negatives:
                extra["hard_negative_ids_bk"] = batch["negative_ids"]
        if mask_false_negatives:
            extra["group_ids_b"] = batch["query_id"]
            extra["doc_ids_b"] = batch["positive_id"]
        return contrastive(q_bd, d_bd, **options, **extra), {}

    return retrieval_objective


def batch_shardings(batch, mesh, batch_axes) -> dict:
    """A NamedSharding per batch leaf: leading (batch) dimension over ``batch_axes``, the rest replicated."""
    return jax.tree.map(
        lambda leaf: NamedSharding(mesh, PartitionSpec(batch_axes, *([None] * (leaf.ndim - 1)))), batch
    )


def make_train_step(objective, tx: optax.GradientTransformation, schedule, state_shardings, batch_sharding_tree,
                    mesh):
    """jit(step): ``(state, batch) -> (new_state, metrics)``; the old state's buffers are donated."""

    def step(state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(state.params, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            "grad_norm": optax.global_norm(grads),
            "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
            **aux,
        }
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_sharding_tree),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )

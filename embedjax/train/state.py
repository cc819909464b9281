"""The training state pytree and its shardings.

``TrainState`` holds everything a step changes or needs: the step counter, the
parameters, the optimizer state and the base dropout key (raw uint32 key data,
so it checkpoints like any array). Shardings come from the parameters' logical
axis names (the model's `nn.with_logical_partitioning` boxes) through the
config's rules table; optimizer moments inherit their parameter's sharding
because optax builds them with tree maps that keep the boxes.
"""
from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from embedjax.sharding.partition import param_shardings


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of updates applied
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32 [2] (threefry) or [4] (rbg): base key data; step t uses fold_in(key, t)


# PRNG implementations of the dropout key (``train.dropout_rng``). threefry2x32 is JAX's default and
# gives the same bits on every backend; rbg and unsafe_rbg draw the masks with XLA's
# RngBitGenerator, which JAX documents as faster on TPUs (on GPUs unmeasured here: the
# `train_step_b256_rbg` device bench); their bits may change across backends and XLA versions, and
# unsafe_rbg also derives keys more cheaply, with weaker guarantees on the streams' independence.
DROPOUT_RNGS = ("threefry2x32", "rbg", "unsafe_rbg")
DEFAULT_DROPOUT_RNG = "threefry2x32"


def check_dropout_rng(impl: str) -> str:
    if impl not in DROPOUT_RNGS:
        raise ValueError(f"train.dropout_rng={impl!r} is not a PRNG implementation; use one of {DROPOUT_RNGS}")
    return impl


def create_state(params, tx: optax.GradientTransformation, seed: int, trainable=None,
                 dropout_rng: str = DEFAULT_DROPOUT_RNG) -> TrainState:
    """A fresh state (step 0) around ``params`` (plain or logically boxed). The optimizer state
    covers only the ``trainable`` top-level entries (None: all), e.g. LoRA adapters and the head.
    ``dropout_rng``: the PRNG implementation of the dropout key (`DROPOUT_RNGS`)."""
    from embedjax.train.step import trainable_part

    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(trainable_part(params, trainable)),
        rng=jax.random.key_data(jax.random.key(seed, impl=check_dropout_rng(dropout_rng))),
    )


def state_shardings(abstract_boxed_params, tx: optax.GradientTransformation, mesh, rules, trainable=None,
                    dropout_rng: str = DEFAULT_DROPOUT_RNG):
    """``NamedSharding`` for every leaf of the (unboxed) TrainState.

    ``abstract_boxed_params`` is ``jax.eval_shape(model.init, ...)["params"]``: shapes
    plus logical names, no memory.
    """
    abstract_state = jax.eval_shape(lambda p: create_state(p, tx, 0, trainable, dropout_rng), abstract_boxed_params)
    return param_shardings(abstract_state, mesh, rules)


def unbox(tree):
    """Strip logical-partitioning boxes (the arrays inside are what the step sees)."""
    return nn.meta.unbox(tree)

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
    rng: jax.Array  # uint32 [2]: base key; step t uses fold_in(rng, t)


def create_state(params, tx: optax.GradientTransformation, seed: int, trainable=None) -> TrainState:
    """A fresh state (step 0) around ``params`` (plain or logically boxed). The optimizer state
    covers only the ``trainable`` top-level entries (None: all), e.g. LoRA adapters and the head."""
    from embedjax.train.step import trainable_part

    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(trainable_part(params, trainable)),
        rng=jax.random.PRNGKey(seed),
    )


def state_shardings(abstract_boxed_params, tx: optax.GradientTransformation, mesh, rules, trainable=None):
    """``NamedSharding`` for every leaf of the (unboxed) TrainState.

    ``abstract_boxed_params`` is ``jax.eval_shape(model.init, ...)["params"]``: shapes
    plus logical names, no memory.
    """
    abstract_state = jax.eval_shape(lambda p: create_state(p, tx, 0, trainable), abstract_boxed_params)
    return param_shardings(abstract_state, mesh, rules)


def unbox(tree):
    """Strip logical-partitioning boxes (the arrays inside are what the step sees)."""
    return nn.meta.unbox(tree)

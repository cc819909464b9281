"""The optimizer: AdamW with warm-up then linear/cosine decay, global-norm clipping,
and weight decay only on matrices (kernels and embedding tables).

This is the recipe sentence-transformers gets from the transformers Trainer: the
learning rate rises linearly from 0 over the warm-up steps (the first update uses
lr 0, as there), then decays to 0 at the last step; biases and LayerNorm
parameters are not decayed.
"""
from __future__ import annotations

import math

import jax
import optax

DECAYED_LEAF_NAMES = ("kernel", "embedding")
SCHEDULES = ("linear", "cosine", "constant")


def warmup_steps_for(num_steps: int, warmup_ratio: float, warmup_steps: int = 0) -> int:
    """Explicit ``warmup_steps`` wins; otherwise ``ceil(ratio * num_steps)`` (the transformers rule)."""
    if warmup_steps < 0 or not 0.0 <= warmup_ratio <= 1.0:
        raise ValueError(f"warmup_steps={warmup_steps} must be >= 0 and warmup_ratio={warmup_ratio} in [0, 1]")
    return warmup_steps if warmup_steps > 0 else math.ceil(warmup_ratio * num_steps)


def learning_rate_schedule(peak: float, num_steps: int, warmup: int, kind: str = "linear") -> optax.Schedule:
    """lr(step) for step = 0 .. num_steps - 1."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {kind!r}; choose one of {SCHEDULES}")
    if peak <= 0:
        raise ValueError(f"learning_rate={peak} must be positive")
    if warmup > num_steps:
        raise ValueError(f"{warmup} warm-up steps exceed the {num_steps} training steps")
    decay_steps = max(num_steps - warmup, 1)
    if kind == "linear":
        after = optax.linear_schedule(peak, 0.0, decay_steps)
    elif kind == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps)
    else:
        after = optax.constant_schedule(peak)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def decay_mask(params):
    """True for the leaves weight decay applies to (the last path key names a kernel or embedding).

    Works on plain and on logically-boxed parameter trees (a box counts as one leaf).
    """

    def decide(path, _):
        last = path[-1]
        name = getattr(last, "key", getattr(last, "name", None))
        if name == "value" and len(path) > 1:  # inside a flax LogicallyPartitioned box
            last = path[-2]
            name = getattr(last, "key", getattr(last, "name", None))
        return name in DECAYED_LEAF_NAMES

    return jax.tree_util.tree_map_with_path(decide, params)


def adamw(
    schedule: optax.Schedule,
    *,
    weight_decay: float,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    grad_clip: float = 1.0,
) -> optax.GradientTransformation:
    """Clip by global norm (``grad_clip`` > 0), then decoupled-weight-decay Adam."""
    if weight_decay < 0 or grad_clip < 0:
        raise ValueError(f"weight_decay={weight_decay} and grad_clip={grad_clip} must be >= 0")
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
    return optax.chain(*parts)

"""Logical-axis rule presets: logical parameter/activation names -> mesh axes.

Parameters carry logical axis names (``embed``, ``mlp``, ``heads``, ``kv_heads`` (GQA key/value
heads), ``kv`` (head dim), ``layers`` (the stacked axis of scanned layers), ``vocab``, ``position``,
``token_type``); activations use ``batch`` and ``length``. ``layers`` is never sharded by the
presets: a scan reads one layer per step, and splitting the stack would gather it every step.
A rules table is a tuple of ``(logical_name, mesh_axis_or_axes_or_None)`` pairs,
the format ``flax.linen`` uses. Names absent from a table are replicated.
"""
from __future__ import annotations

from collections.abc import Sequence

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# Pure data parallelism: the batch is split over every mesh axis, weights are replicated.
DATA_PARALLEL: Rules = (
    ("batch", ("data", "fsdp")),
)

# FSDP (ZeRO-3 style): weights split along their model dimension over `fsdp`,
# the batch over `data` and `fsdp` together.
FSDP: Rules = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("layers", None),
)

# FSDP + tensor (Megatron-style) parallelism: wide dimensions over `tensor`.
FSDP_TENSOR: Rules = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),  # replicated when the KV heads are fewer than the tensor axis
    ("vocab", "tensor"),
    ("layers", None),
)

PRESETS: dict[str, Rules] = {
    "data_parallel": DATA_PARALLEL,
    "fsdp": FSDP,
    "fsdp_tensor": FSDP_TENSOR,
}


def get_rules(name_or_rules: str | Sequence) -> Rules:
    """Return a rules table from a preset name or validate and return a given table."""
    if isinstance(name_or_rules, str):
        if name_or_rules not in PRESETS:
            raise ValueError(f"unknown sharding rules preset {name_or_rules!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[name_or_rules]
    rules = tuple(tuple(pair) for pair in name_or_rules)
    for pair in rules:
        if len(pair) != 2 or not isinstance(pair[0], str):
            raise ValueError(f"a sharding rule must be a (logical_name, mesh_axes) pair, got {pair!r}")
    names = [name for name, _ in rules]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise ValueError(f"sharding rules name logical axes {duplicated} more than once; keep one rule each")
    return rules

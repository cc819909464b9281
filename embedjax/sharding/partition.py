"""Turn logical axis names into ``PartitionSpec``s and ``NamedSharding``s.

A mesh axis is used at most once per array, and a dimension that the mesh axes
do not divide evenly is replicated instead (always correct, only less sharded).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
from jax.sharding import NamedSharding, PartitionSpec

from embedjax.sharding.rules import Rules, get_rules


def _axes_tuple(axes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(
    logical_axes: Sequence[str | None],
    rules: Rules | str,
    mesh: jax.sharding.Mesh | None = None,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """Map one array's logical axis names to a ``PartitionSpec`` of mesh axes.

    With ``mesh`` and ``shape`` given, mesh axes of size 1 are dropped and a
    dimension not divisible by its mesh axes' total size is replicated.
    """
    table = dict(get_rules(rules))
    if shape is not None and len(shape) != len(logical_axes):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match array shape {tuple(shape)}")
    used: set[str] = set()
    out = []
    for dim, name in enumerate(logical_axes):
        axes = tuple(a for a in _axes_tuple(table.get(name)) if a not in used) if name is not None else ()
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
            if shape is not None and axes and shape[dim] % math.prod(mesh.shape[a] for a in axes):
                axes = ()
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def param_shardings(params, mesh: jax.sharding.Mesh, rules: Rules | str):
    """``NamedSharding`` for every leaf of a params tree whose leaves may be
    ``nn.LogicallyPartitioned`` boxes (Flax) or plain arrays (replicated).

    Returns a tree with the boxes unwrapped, matching ``nn.unbox(params)``.
    """

    def one(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            value = leaf.value
            return NamedSharding(mesh, logical_to_spec(leaf.names, rules, mesh, value.shape))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def batch_sharding(mesh: jax.sharding.Mesh, rules: Rules | str = "data_parallel", ndim: int = 2) -> NamedSharding:
    """Sharding for a batch array whose leading dimension is the batch."""
    batch_axes = tuple(a for a in _axes_tuple(dict(get_rules(rules)).get("batch")) if mesh.shape[a] > 1)
    lead = None if not batch_axes else batch_axes[0] if len(batch_axes) == 1 else batch_axes
    return NamedSharding(mesh, PartitionSpec(lead, *([None] * (ndim - 1))))

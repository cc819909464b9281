"""Meshes, logical-axis rules and shardings (see DESIGN.md: sharding is data)."""
from embedjax.sharding.mesh import MESH_AXES, initialize_multihost, make_mesh, resolve_axis_sizes
from embedjax.sharding.partition import batch_sharding, logical_to_spec, param_shardings
from embedjax.sharding.rules import DATA_PARALLEL, FSDP, FSDP_TENSOR, PRESETS, get_rules

__all__ = [
    "MESH_AXES", "make_mesh", "resolve_axis_sizes", "initialize_multihost",
    "logical_to_spec", "param_shardings", "batch_sharding",
    "DATA_PARALLEL", "FSDP", "FSDP_TENSOR", "PRESETS", "get_rules",
]

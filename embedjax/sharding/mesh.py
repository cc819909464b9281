"""Device meshes built from a plain spec.

A spec maps the three embedjax mesh axes to sizes, e.g. ``{"data": -1, "fsdp": 2,
"tensor": 1}``. At most one size may be -1; it is filled so that the product of
the sizes equals the device count. Axes are ``Explicit`` by default, matching
``jax.make_mesh`` in current JAX.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax

MESH_AXES = ("data", "fsdp", "tensor")


def resolve_axis_sizes(spec: Mapping[str, int], device_count: int) -> dict[str, int]:
    """Return ``{axis: size}`` for every axis in ``MESH_AXES`` with the -1 filled in.

    Axes missing from ``spec`` get size 1. Raises ValueError for unknown axes,
    sizes that are not positive integers (or -1), more than one -1, or sizes whose
    product cannot equal ``device_count``.
    """
    unknown = sorted(set(spec) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh spec has unknown axes {unknown}; allowed axes are {list(MESH_AXES)}")
    sizes = {axis: spec.get(axis, 1) for axis in MESH_AXES}
    for axis, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
            raise ValueError(f"mesh spec size for axis {axis!r} must be a positive int or -1, got {size!r}")
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"mesh spec may contain at most one -1, got -1 for axes {free}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if device_count % fixed:
            raise ValueError(
                f"mesh spec {dict(spec)}: the fixed axis sizes multiply to {fixed}, which does not divide "
                f"the {device_count} devices; change the sizes so their product divides the device count"
            )
        sizes[free[0]] = device_count // fixed
    elif fixed != device_count:
        raise ValueError(
            f"mesh spec {dict(spec)} needs {fixed} devices but {device_count} are available; "
            "use -1 for one axis to fill it from the device count"
        )
    return sizes


def make_mesh(
    spec: Mapping[str, int] | None = None,
    *,
    devices: Sequence[jax.Device] | None = None,
    axis_type: jax.sharding.AxisType = jax.sharding.AxisType.Explicit,
) -> jax.sharding.Mesh:
    """Build a ``Mesh`` with axes ``("data", "fsdp", "tensor")`` from a plain spec.

    ``spec=None`` means pure data parallelism over all devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_axis_sizes({"data": -1} if spec is None else spec, len(devices))
    return jax.make_mesh(
        tuple(sizes[axis] for axis in MESH_AXES),
        MESH_AXES,
        axis_types=(axis_type,) * len(MESH_AXES),
        devices=devices,
    )


def initialize_multihost(coordinator_address: str | None = None, num_processes: int | None = None,
                         process_id: int | None = None) -> None:
    """Connect this process to the others of a multi-host job (no-op for one process).

    With all arguments None, JAX auto-detects the cluster (TPU pods, SLURM).
    Call before any other JAX call that touches devices.
    """
    if num_processes == 1:
        return
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )

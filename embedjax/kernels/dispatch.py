"""Choosing between a Pallas kernel and its plain-jnp twin."""
from __future__ import annotations

import jax

IMPLS = ("auto", "pallas", "xla")


def resolve_impl(impl: str) -> tuple[str, bool]:
    """``(impl, interpret)``: "auto" picks Pallas where it compiles natively (GPU via
    Triton) and the XLA twin elsewhere; "pallas" on CPU runs in interpret mode
    (slow, for tests)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
    backend = jax.default_backend()
    if impl == "auto":
        return ("pallas", False) if backend == "gpu" else ("xla", False)
    if impl == "pallas":
        return "pallas", backend not in ("gpu", "tpu")
    return "xla", False

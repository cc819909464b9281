"""Choosing between a Pallas kernel and its plain-jnp twin, and the GPU backend a kernel compiles with."""
from __future__ import annotations

import os

import jax
import numpy as np

IMPLS = ("auto", "pallas", "xla")
GPU_BACKEND_ENV = "EMBEDJAX_PALLAS_GPU"
GPU_BACKENDS = ("triton", "mosaic")


def default_backend() -> str:
    """The platform kernels are traced for ("cpu", "gpu", "tpu"); one place, so that a test can
    trace them for a GPU on a CPU machine."""
    return jax.default_backend()


def resolve_impl(impl: str, *, pallas_fits: bool = True) -> tuple[str, bool]:
    """``(impl, interpret)``: "auto" picks Pallas where it compiles natively (GPU via
    Triton) and the input fits the kernel (``pallas_fits``; e.g. `pallas_topk.scan_fits`), the
    XLA twin elsewhere; "pallas" on CPU runs in interpret mode (slow, for tests)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
    backend = default_backend()
    if impl == "auto":
        return ("pallas", False) if backend == "gpu" and pallas_fits else ("xla", False)
    if impl == "pallas":
        return "pallas", backend not in ("gpu", "tpu")
    return "xla", False


def pallas_compiler_params(**triton_options):
    """``compiler_params`` for every ``pallas_call`` of the package: on a GPU, the Triton backend's
    (or Mosaic GPU's with ``EMBEDJAX_PALLAS_GPU=mosaic``); None elsewhere (TPU lowering and interpret
    mode take their defaults). ``triton_options`` (``num_warps``, ``num_stages``) go to Triton.
    Read when a kernel is traced: jitted kernels keep their first choice.

    Since JAX 0.10 a ``pallas_call`` without parameters lowers to Mosaic GPU on NVIDIA cards
    (``jax_pallas_use_mosaic_gpu`` defaults to True). The kernels here follow Triton's rules
    (power-of-two blocks; whole operands walked with ``pl.ds`` inside a program); Mosaic GPU
    stages each block in shared memory, and there the ring loss's tiles ask for 12 MiB of the
    H200's 227 KiB and the top-k scans' scalar operands are refused (copies under 128 bytes).
    `tests/kernels/test_gpu_lowering.py` lowers every kernel for CUDA on a CPU machine.
    """
    if default_backend() != "gpu":
        return None
    choice = os.environ.get(GPU_BACKEND_ENV, "triton")
    if choice not in GPU_BACKENDS:
        raise ValueError(f"{GPU_BACKEND_ENV} must be one of {GPU_BACKENDS}; got {choice!r}")
    if choice == "mosaic":
        from jax.experimental.pallas import mosaic_gpu
        return mosaic_gpu.CompilerParams()
    from jax.experimental.pallas import triton
    return triton.CompilerParams(**triton_options)


CPU_ALIAS_ALIGNMENT = 64  # bytes: jax.device_put aliases a NumPy buffer on CPU only at this alignment


def aligned_copy(x: np.ndarray, alignment: int = CPU_ALIAS_ALIGNMENT) -> np.ndarray:
    """A C-contiguous copy of ``x`` whose buffer starts on an ``alignment``-byte boundary."""
    buf = np.empty(x.nbytes + alignment, np.uint8)
    start = (-buf.ctypes.data) % alignment
    out = buf[start:start + x.nbytes].view(x.dtype).reshape(x.shape)
    np.copyto(out, x)
    return out


def device_array(x):
    """A kernel input as a ``jax.Array`` without a second host copy where the backend allows.

    jax arrays pass through. Anything else goes through ``jax.device_put``, which on CPU aliases
    a NumPy buffer aligned to 64 bytes instead of copying it. NumPy allocates large arrays on
    16-byte boundaries, so most arrays miss that; those are copied by NumPy into an aligned buffer
    which is then aliased: ~6x faster than device_put's own copy (1M x 1024-bit codes, 128 MB,
    2-core AMD EPYC: 14 ms against 84 ms; aliasing an aligned one: 0.03 ms). An aliased buffer
    must not be written while a search that reads it is still running (JAX dispatches
    asynchronously)."""
    if isinstance(x, jax.Array):
        return x
    x = np.asarray(x)
    if default_backend() == "cpu" and x.ctypes.data % CPU_ALIAS_ALIGNMENT:
        x = aligned_copy(x)
    return jax.device_put(x)

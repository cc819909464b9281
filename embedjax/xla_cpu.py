"""Which kernel libraries XLA:CPU calls for inference programs (`Encoder`'s embedding function).

XLA:CPU hands dense products, reductions and some elementwise work to a kernel library. jaxlib
0.10's default, YNNPACK, runs MiniLM's float32 GEMMs at 0.65-0.92x PyTorch's rate on the 2-core
Intel Xeon (Emerald Rapids) this project measures on (`bench matmul`, BENCHMARKS.md); oneDNN, also
compiled into jaxlib, runs them at 0.92-1.0x. The ``onednn`` programs give oneDNN each dot on its
own and XLA's own emitter everything else. Letting oneDNN fuse elementwise producers into its
dots (``LIBRARY_FUSION_TYPE_DOT``) is no faster and unsafe: jaxlib 0.10.2 then aborts the whole
process at the first run of some programs ("partition compile failed": a dot reading erf GELU,
SiLU, or the exponential of another dot). Two mixtures measured worse: YNNPACK as the elementwise
library splits GELU's erf into a chain of materialised fusions, and YNNPACK as the reduction
library pulls the dot before each layer norm into its own fusion and runs it at half oneDNN's
rate. XLA's emitter in turn runs long row reductions slowly (a reduce-window), which the blocked
attention kernel avoids by reducing pairwise in oneDNN programs (`tracing_library`).

The choice, ``EMBEDJAX_CPU_GEMM`` (default ``auto``):

- ``auto``: ``onednn`` on Intel x86-64 where this jaxlib accepts the options, else ``xla``. AMD
  EPYC keeps XLA's defaults: there they ran ahead of PyTorch already and oneDNN was not measured.
- ``onednn``: as above; an error if this jaxlib rejects the options.
- ``xla``: XLA's defaults (no per-program options).

Only inference takes these options so far. The training step keeps XLA's defaults: a scratch
timing of MiniLM's gradient at 32 x 40 tokens ran ~13 % faster with oneDNN's single dots
(`benchmarks/profile_grad_step.py` under the equivalent XLA_FLAGS, two pairs), but backward
programs have not been checked against the abort above. Compiler options are per program, so
nothing else in the process changes. `inference_jit` compiles a function with them and tells its
tracing the library (`tracing_library`).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import platform

ENV = "EMBEDJAX_CPU_GEMM"
_TRACING_FOR = contextvars.ContextVar("embedjax_xla_cpu_library", default="xla")
CHOICES = ("auto", "onednn", "xla")

# Enum values are spelled out: compiler_options reads them as the DebugOptions proto's names.
ONEDNN_DOTS = {
    "xla_cpu_use_onednn": True,
    "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
    "xla_cpu_use_xnnpack": False,
    "xla_cpu_experimental_ynn_fusion_type": "",
}


def requested(value: str | None = None) -> str:
    """The choice in force: ``value`` or ``$EMBEDJAX_CPU_GEMM`` (default ``auto``), checked."""
    choice = (value if value is not None else os.environ.get(ENV, "auto")).strip().lower()
    if choice not in CHOICES:
        raise ValueError(f"{ENV}={choice!r} is not a CPU kernel choice; set it to one of {CHOICES}")
    return choice


@functools.cache
def _is_intel_x86() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return any(line.startswith("vendor_id") and "GenuineIntel" in line for line in f)
    except OSError:
        return False


@functools.cache
def _accepted(options: tuple) -> str | None:
    """None when this jaxlib compiles a small dot and reduction under ``options``, else the error."""
    import jax
    import jax.numpy as jnp

    try:
        x = jax.ShapeDtypeStruct((8, 8), jnp.float32)
        jax.jit(lambda a: (a @ a).max(axis=-1), compiler_options=dict(options)).lower(x).compile()
    except Exception as err:  # an unknown option or enum name surfaces as jaxlib's runtime error
        return f"{type(err).__name__}: {err}"
    return None


def resolved(platform_name: str, value: str | None = None) -> str:
    """``onednn`` or ``xla``: what the choice means for programs on ``platform_name`` devices."""
    choice = requested(value)
    if platform_name != "cpu" or choice == "xla":
        return "xla"
    options = tuple(sorted(ONEDNN_DOTS.items()))
    if choice == "auto":
        return "onednn" if _is_intel_x86() and _accepted(options) is None else "xla"
    error = _accepted(options)
    if error is not None:
        raise ValueError(f"{ENV}=onednn: this jaxlib does not accept the oneDNN options ({error}); "
                         f"set {ENV}=xla")
    return "onednn"


def inference_options(platform_name: str, value: str | None = None) -> dict | None:
    """``compiler_options`` for an inference program on ``platform_name`` devices (None: XLA's)."""
    return dict(ONEDNN_DOTS) if resolved(platform_name, value) == "onednn" else None


def tracing_library() -> str:
    """``onednn`` while `inference_jit` traces a function for a oneDNN program, else ``xla``."""
    return _TRACING_FOR.get()


@contextlib.contextmanager
def tracing_for(library: str):
    """Within the block, `tracing_library` answers ``library`` (``onednn`` or ``xla``)."""
    if library not in ("onednn", "xla"):
        raise ValueError(f"library={library!r}: trace for 'onednn' or 'xla'")
    token = _TRACING_FOR.set(library)
    try:
        yield
    finally:
        _TRACING_FOR.reset(token)


def inference_jit(fn, platform_name: str, **jit_kwargs):
    """``jax.jit(fn, **jit_kwargs)`` compiled with `inference_options` for ``platform_name``, its
    tracing told the library (`tracing_library`)."""
    import jax

    library = resolved(platform_name)

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with tracing_for(library):
            return fn(*args, **kwargs)

    return jax.jit(traced, compiler_options=dict(ONEDNN_DOTS) if library == "onednn" else None, **jit_kwargs)

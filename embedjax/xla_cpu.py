"""Which kernel libraries XLA:CPU calls for embedjax's programs (`Encoder`'s embedding function and
the training step).

XLA:CPU hands dense products, reductions and some elementwise work to a kernel library. jaxlib
0.10's default, YNNPACK, runs MiniLM's float32 GEMMs at 0.65-0.92x PyTorch's rate on the 2-core
Intel Xeon (Emerald Rapids) this project measures on (`bench matmul`, BENCHMARKS.md); oneDNN, also
compiled into jaxlib, runs them at 0.92-1.0x. On a 2-core AMD EPYC (Zen 4 with only AVX2 exposed
by its hypervisor) oneDNN encoded long documents 1.37-1.44x faster than XLA's defaults in the same sitting.
The ``onednn`` programs give oneDNN each dot on its own and XLA's own emitter everything else.
Letting oneDNN fuse elementwise producers into its dots (``LIBRARY_FUSION_TYPE_DOT``) is no
faster and unsafe: jaxlib 0.10.2 then aborts the whole process at the first run of some programs
("partition compile failed": a dot reading erf GELU, SiLU, or the exponential of another dot).
Two mixtures measured worse: YNNPACK as the elementwise library splits GELU's erf into a chain of
materialised fusions, and YNNPACK as the reduction library pulls the dot before each layer norm
into its own fusion and runs it at half oneDNN's rate. XLA's emitter in turn runs long row
reductions slowly (a reduce-window), which the blocked attention kernel avoids by reducing
pairwise in oneDNN inference programs (`tracing_library`).

The choice, ``EMBEDJAX_CPU_GEMM`` (default ``auto``):

- ``auto``: ``onednn`` on x86-64 (Intel or AMD) where this jaxlib accepts the options, else
  ``xla`` (other architectures keep XLA's defaults: not measured). Also ``xla`` while JAX's
  persistent compilation cache is on (``jax_compilation_cache_dir`` set): jaxlib 0.10.2 cannot
  serialise a oneDNN program ("ToProto is not implemented for thunk kind: onednn-fusion"), so
  every process would compile it again, and warn, where the cache was asked to save that time.
- ``onednn``: as above, cache or not; an error if this jaxlib rejects the options.
- ``xla``: XLA's defaults (no per-program options).

jaxlib 0.10.2 has a second oneDNN bug: when a program's last reference is the execution that is
just finishing (a jitted function dropped right after its call), destroying it aborts the process
("object_pool.h: Check failed: available_.size() == num_created_"; 2 of 12 runs of a small
attention program, none of 16 when the caller held the function). A result is readable a moment
before its run lets go of its oneDNN objects, so holding a program until its result is read is
not enough: the test suite aborted a worker that way twice in four runs of tests/models with
tests/bench under xdist, as a test returned (dropping its program) right after reading its result;
two processes dropping 40 small programs each beside each other aborted 2 of 6 times. `Encoder`
and the training loop keep their programs for their lifetime; callers that compile throwaway
oneDNN programs should hold them well past their last run (the tests hold them for the session).

Inference programs under ``onednn`` (`inference_jit`) also ask for XLA's loop emitter
(``xla_cpu_use_fusion_emitters=False``) for the fusions oneDNN leaves to XLA, where the default is
the newer MLIR fusion emitters. On the 2-core AMD EPYC (AVX-512 exposed) the new emitters ran the
attention softmax's ``exp(s - max)`` fusion 15x slower when MiniLM encoded 256 msmarco passages
(741 against 49 ms over 6 layers x 35 blocks, a ``jax.profiler`` trace per fusion): that encode
took 4.10 s against 2.87, and 1,000 passages 14.8 s against 11.5 once compiled. How much depends on
the shapes: scifact abstracts at 256 tokens and packed STS-B sentences encoded at the same speed
either way. The training step keeps the fusion emitters: its backward pass ran 12 % slower under
the loop emitter (40.4 against 45.3 pairs/s, `bench train --steps 20`, two runs each). Where a jaxlib
rejects the option, inference goes on without it. Programs under ``xla`` keep XLA's defaults: with
YNNPACK doing the elementwise work the emitter changed nothing there (14.6 against 14.5 s).

Compiler options are per program, so nothing else in the process changes. `inference_jit`
compiles a function with them and tells its tracing the library (`tracing_library`); the training
step (`embedjax.train.step`) takes `compiler_options` but traces as for XLA, so its attention
blocks keep the rounding (and the gradient) the rest of the tests pin.
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


# XLA's loop emitter for the fusions left to XLA in oneDNN inference programs (module docstring).
LOOP_EMITTER = {"xla_cpu_use_fusion_emitters": False}


def requested(value: str | None = None) -> str:
    """The choice in force: ``value`` or ``$EMBEDJAX_CPU_GEMM`` (default ``auto``), checked."""
    choice = (value if value is not None else os.environ.get(ENV, "auto")).strip().lower()
    if choice not in CHOICES:
        raise ValueError(f"{ENV}={choice!r} is not a CPU kernel choice; set it to one of {CHOICES}")
    return choice


def _is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


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


def persistent_cache_on() -> bool:
    """Whether JAX writes compiled programs to a persistent cache (a cache folder is set)."""
    import jax

    return bool(jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir)


def resolved(platform_name: str, value: str | None = None) -> str:
    """``onednn`` or ``xla``: what the choice means for programs on ``platform_name`` devices."""
    choice = requested(value)
    if platform_name != "cpu" or choice == "xla":
        return "xla"
    options = tuple(sorted(ONEDNN_DOTS.items()))
    if choice == "auto":
        if not _is_x86_64() or persistent_cache_on():
            return "xla"
        return "onednn" if _accepted(options) is None else "xla"
    error = _accepted(options)
    if error is not None:
        raise ValueError(f"{ENV}=onednn: this jaxlib does not accept the oneDNN options ({error}); "
                         f"set {ENV}=xla")
    return "onednn"


def compiler_options(platform_name: str, value: str | None = None) -> dict | None:
    """``jax.jit``'s ``compiler_options`` for a program on ``platform_name`` devices (None: XLA's)."""
    return _options_for(resolved(platform_name, value))


def _options_for(library: str) -> dict | None:
    """The ``compiler_options`` of a resolved library (``onednn`` or ``xla``)."""
    return dict(ONEDNN_DOTS) if library == "onednn" else None


def inference_options(platform_name: str, value: str | None = None) -> dict | None:
    """`compiler_options` for an inference program: under ``onednn`` with XLA's loop emitter where
    this jaxlib accepts it (see the module docstring)."""
    return _inference_options_for(resolved(platform_name, value))


def _inference_options_for(library: str) -> dict | None:
    options = _options_for(library)
    if options is None:
        return None
    with_loop_emitter = {**options, **LOOP_EMITTER}
    return with_loop_emitter if _accepted(tuple(sorted(with_loop_emitter.items()))) is None else options


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

    return jax.jit(traced, compiler_options=_inference_options_for(library), **jit_kwargs)

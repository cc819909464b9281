"""What each Pallas kernel asks of an H100/H200, compiled offline: shared memory, registers, spills.

    pip install triton            # not a project dependency (~290 MB); any machine, no GPU needed
    python benchmarks/triton_resources.py [--out benchmarks/triton_resources.json]

Each kernel is lowered for CUDA as `tests/kernels/test_gpu_lowering.py` lowers it (`jax.export`,
the kernels traced as for a GPU), which runs the Pallas Triton lowering for compute capability 9.0.
Its Triton IR is captured from that lowering, and the pip `triton` package compiles it for sm_90
at the kernel's own ``num_warps`` and ``num_stages`` (read from the lowered call). The cubin's
resource usage (`cuobjdump --dump-resource-usage`, shipped with triton) gives the registers per
thread and the local memory (spills) of each kernel.

This is not the compiler a GPU run uses: jaxlib bundles its own Triton, so the figures are those
of the pip version (recorded in the output), a close relative. Checked against the one resource
figure a GPU has given us: the ring loss's fused tiles at block 64 ask 608 KiB of shared memory at
3 stages here, as the H200 reported on 2026-12-04 (it has 227 KiB per block).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile

SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on an H100 / H200
TRITON_CALL = "__gpu$xla.gpu.triton"


def _cases():
    """name -> (function, input shapes): the kernels at the shapes the device benches time."""
    import jax
    import jax.numpy as jnp

    from embedjax.kernels import flash_attention, lowbit
    from embedjax.kernels.hamming import hamming_topk_pallas
    from embedjax.losses import ring

    spec = jax.ShapeDtypeStruct

    def flash(causal, rate):
        def run(q, k, v, ids):
            def loss(q, k, v):
                out = flash_attention.flash_attention(q, k, v, jnp.ones_like(ids), ids, causal=causal,
                                                      dropout_rate=rate, seed=jnp.int32(1) if rate else None)
                return jnp.sum(out.astype(jnp.float32))
            return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)
        return run

    def ring_loss(tile):
        def run(q, d):
            mesh = jax.make_mesh((1,), ("data",))
            return jax.value_and_grad(lambda q, d: ring.ring_infonce(q, d, mesh=mesh, temperature=0.05, impl="pallas",
                                                                     tile=tile), argnums=(0, 1))(q, d)
        return run

    bf16 = jnp.bfloat16
    minilm = (spec((8, 128, 12, 32), bf16),) * 3 + (spec((8, 128), jnp.int32),)
    smollm2 = (spec((2, 256, 9, 64), bf16), spec((2, 256, 3, 64), bf16), spec((2, 256, 3, 64), bf16),
               spec((2, 256), jnp.int32))
    words, rows = 32, 1 << 20
    return {
        "flash attention, MiniLM training (L 128, 12 x 32 heads, dropout 0.1)": (flash(False, 0.1), minilm),
        "flash attention, SmolLM2 training (L 256, 9/3 x 64 heads, causal)": (flash(True, 0.0), smollm2),
        **{f"hamming {select}, {q} quer{'y' if q == 1 else 'ies'}, 1024 bits, word-major": (
            lambda qc, x, select=select: hamming_topk_pallas(qc, x, 10, rows, select=select, layout="words"),
            (spec((q, words), jnp.uint32), spec((words, rows), jnp.uint32)))
           for select in ("running", "two_pass") for q in (1, 64)},
        **{f"{kind} {select}, 64 queries, 384 dims, block {bq}x{bn}": (
            lambda q, x, qs, xs, kind=kind, select=select, bq=bq, bn=bn: lowbit._lowbit_pallas(
                q, qs, x, xs, qs, 10, rows, kind=kind, select=select, block_q=bq, block_n=bn),
            (spec((64, 384), q_dtype), spec((rows, width), x_dtype), spec((64,), jnp.float32),
             spec((rows,), jnp.float32)))
           for kind, q_dtype, x_dtype, width in (("int8", jnp.int8, jnp.int8, 384),
                                                 ("int4", jnp.int8, jnp.uint8, 192),
                                                 ("fp8", jnp.float8_e4m3fn, jnp.float8_e4m3fn, 384))
           for bq, bn in ((16, 128), (32, 128), (64, 64)) for select in ("running", "two_pass")},
        **{f"ring InfoNCE fused tiles, 4096 x 768, block {tile}": (ring_loss(tile), (spec((4096, 768), jnp.float32),) * 2)
           for tile in (64, 32)},
    }


def capture(fn, shapes) -> list[dict]:
    """[{kernel, num_warps, num_stages, ttir}] of every pallas_call in ``fn`` lowered for CUDA."""
    import jax
    from jax import export
    from jax._src.pallas.triton import lowering

    captured = []
    original = lowering.lower_jaxpr_to_triton_module

    def keep(*args, **kwargs):
        result = original(*args, **kwargs)
        captured.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    lowering.lower_jaxpr_to_triton_module = keep
    try:
        jax.clear_caches()  # a cached lowering would skip the capture
        text = export.export(jax.jit(fn), platforms=("cuda",),
                             disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(
            *shapes).mlir_module()
    finally:
        lowering.lower_jaxpr_to_triton_module = original
    calls = re.findall(r'name = "([^"]+)", num_stages = (\d+) : i32, num_warps = (\d+) : i32', text)
    if len(calls) != len(captured):
        raise RuntimeError(f"{len(calls)} Triton calls in the module but {len(captured)} captured kernels")
    out = []
    for ttir in captured:
        kernel = re.match(r"module @(\S+)", ttir).group(1)
        stages, warps = next((int(s), int(w)) for name, s, w in calls if name == kernel)
        out.append(dict(kernel=kernel, num_warps=warps, num_stages=stages, ttir=ttir))
    return out


def compile_sm90(ttir: str, num_warps: int, num_stages: int) -> dict:
    """Shared memory (bytes), registers per thread and local (spill) bytes of ``ttir`` for sm_90."""
    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ttir")
        with open(path, "w") as f:
            f.write(ttir)
        kernel = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": num_warps, "num_stages": num_stages})
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        usage = subprocess.run([tool, "--dump-resource-usage", cubin], capture_output=True, text=True,
                               check=True).stdout
    registers, local = re.search(r"REG:(\d+) .*LOCAL:(\d+)", usage).groups()
    return dict(shared_bytes=kernel.metadata.shared, registers=int(registers), local_bytes=int(local))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/triton_resources.json")
    args = parser.parse_args()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    import jax
    import triton

    from embedjax.kernels import dispatch

    dispatch.default_backend = lambda: "gpu"  # trace the kernels as for a GPU (not interpret mode)
    rows = []
    for case, (fn, shapes) in _cases().items():
        for kernel in capture(fn, shapes):
            ttir = kernel.pop("ttir")
            # the ring's tiles run unpipelined; also ask what Triton's default 3 stages would take
            stage_settings = [kernel["num_stages"]] + ([3] if kernel["num_stages"] != 3 else [])
            for stages in stage_settings:
                try:
                    usage = compile_sm90(ttir, kernel["num_warps"], stages)
                    usage["fits_shared"] = usage["shared_bytes"] <= SHARED_LIMIT
                except Exception as err:  # a kernel Triton refuses is a result to report
                    usage = dict(error=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
                rows.append(dict(case=case, **{**kernel, "num_stages": stages},
                                 as_lowered=stages == kernel["num_stages"], **usage))
                print(json.dumps(rows[-1]))
    result = dict(target="sm_90 (H100/H200)", shared_limit_bytes=SHARED_LIMIT, triton=triton.__version__,
                  jax=jax.__version__, rows=rows)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()

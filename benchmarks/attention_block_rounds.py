"""Round-by-round timings of the CPU blocked attention kernel in a oneDNN program, per batch block.

    python benchmarks/attention_block_rounds.py [--out benchmarks/attention_block_rounds.json]

One layer of MiniLM-shaped attention (64 rows x ``--length`` tokens x 12 heads x 32, no padding)
through `blocked_attention` as `Encoder`'s oneDNN programs trace it, compiled once per ``block``
(batch rows per block; `batch_block` picks the default), then called in interleaved rounds.
Every round's time is kept, not only the median: on a shared 2-core VM the same program's time
moves by more than the differences between blocks, and the rounds show when. Beside it, one
block's two dots alone (scores and values for 2 rows x 12 heads), which bound what the
elementwise passes between them cost, and PyTorch's fused CPU SDPA on the same [64, 12, L, 32]
tensors as the reference, interleaved with the rest (``torch_threads`` in the record). A diagnostic, not a speed claim: run it idle.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

HEADS, HEAD_DIM, ROWS = 12, 32, 64


def main() -> None:
    import jax
    import jax.numpy as jnp

    from embedjax import provenance, xla_cpu
    from embedjax.bench.report import device_description
    from embedjax.bench.timing import interleaved_seconds, seconds_once  # a torch tensor passes through
    from embedjax.models import attention

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/attention_block_rounds.json")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--blocks", default="1,2,4,8")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()

    length, blocks = args.length, [int(b) for b in args.blocks.split(",")]
    options = xla_cpu.compiler_options("cpu", "onednn")
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((ROWS, length, HEADS, HEAD_DIM), np.float32)) for _ in range(3))
    mask = jnp.ones((ROWS, length), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(length), (ROWS, length))

    def layer(block):
        def fn(q, k, v):
            with xla_cpu.tracing_for("onednn"):
                return attention.blocked_attention((q,), (k,), v, mask, positions, attention.Masking(), block=block)
        return fn

    # Held for the whole run: jaxlib 0.10.2 aborts when a oneDNN program is dropped mid-execution.
    programs = {f"block={b}": (jax.jit(layer(b), compiler_options=options), (q, k, v)) for b in blocks}
    pair = 2 * HEADS
    qb, kb = (jnp.asarray(rng.standard_normal((pair, length, HEAD_DIM), np.float32)) for _ in range(2))
    wb = jnp.asarray(rng.standard_normal((pair, length, length), np.float32))
    programs["scores dot, one 2-row block"] = (
        jax.jit(lambda a, b: jnp.einsum("nqk,nck->nqc", a, b), compiler_options=options), (qb, kb))
    programs["values dot, one 2-row block"] = (
        jax.jit(lambda w, b: jnp.einsum("nqc,nck->nqk", w, b), compiler_options=options), (wb, kb))
    import torch

    qt, kt, vt = (torch.from_numpy(np.asarray(x)).transpose(1, 2).contiguous() for x in (q, k, v))

    def sdpa(a, b, c):
        with torch.inference_mode():
            return torch.nn.functional.scaled_dot_product_attention(a, b, c)

    programs["torch sdpa (reference)"] = (sdpa, (qt, kt, vt))
    load = provenance.load_average_1min()
    for fn, fn_args in programs.values():
        seconds_once(lambda: fn(*fn_args))  # compile
    seconds = interleaved_seconds({name: (lambda f=fn, a=fn_args: f(*a)) for name, (fn, fn_args) in programs.items()},
                                  args.rounds)
    rounds = {name: [round(s * 1e3, 2) for s in times] for name, times in seconds.items()}
    dot_flops = 2 * pair * length * length * HEAD_DIM
    record = {
        "what": "blocked attention (oneDNN program) per batch block, every round's ms; one block's dots alone",
        "shape": f"{ROWS}x{length}x{HEADS}x{HEAD_DIM}", "default_block": attention.batch_block(ROWS, HEADS, length),
        "rounds": args.rounds,
        "results": [{"name": name, "median_ms": round(float(np.median(ms)), 2), "min_ms": min(ms),
                     "max_ms": max(ms), "rounds_ms": ms,
                     **({"gflops_median": round(dot_flops / float(np.median(ms)) / 1e6, 1)} if "dot" in name else {})}
                    for name, ms in rounds.items()],
        "torch_threads": torch.get_num_threads(), "device": device_description(), "load_1min": load, "commit": provenance.git_commit(),
        "command": "python benchmarks/attention_block_rounds.py",
    }
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    for row in record["results"]:
        print(row["name"], row["median_ms"], row["rounds_ms"])


if __name__ == "__main__":
    main()

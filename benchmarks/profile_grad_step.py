"""Where the CPU time of one MiniLM gradient goes: XLA's own trace of the compiled program, by op kind.

    python benchmarks/profile_grad_step.py [--out benchmarks/profile_grad_step.json]

The gradient of a CoSENT-shaped objective (16 pairs = 32 sentences, padded to 40 tokens, no
dropout) w.r.t. every MiniLM parameter, as the training step computes it. The program runs twice
untraced (wall-clock medians, beside sentence-transformers' forward and backward of the same
objective on the same batch), then `--calls` times under `jax.profiler.trace`; each XLA thunk's trace events are summed
per op kind (the name without its numeric suffix) and divided by the calls. Durations on the two
worker threads add up, so the per-call total can exceed wall time. The largest zero-filling
broadcasts are listed with their shapes (from the compiled HLO). A diagnostic, not a speed claim:
kernel times move with load; run it on an idle machine.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile

import numpy as np

# Runtime and host-side events, not XLA kernels.
NOT_KERNELS = ("ThunkExecutor", "$", "SlinkyThreadPool", "while", "conditional", "call")


def kernel_times(trace_dir: str, calls: int) -> dict[str, float]:
    """Milliseconds per call of every traced XLA kernel, by event name."""
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))[-1]
    events = json.load(gzip.open(path))["traceEvents"]
    per_name = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and not event["name"].startswith(NOT_KERNELS):
            per_name[event["name"]] += event["dur"]
    return {name: us / calls / 1000 for name, us in per_name.items()}


def by_kind(times_ms: dict[str, float]) -> dict[str, float]:
    kinds = collections.Counter()
    for name, ms in times_ms.items():
        kinds[re.sub(r"[.\d]+$", "", name)] += ms
    return dict(kinds.most_common())


def median_ms(fn, repeats: int = 7) -> float:
    import time

    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def torch_times(ids, mask) -> dict[str, float]:
    """sentence-transformers' forward and forward + backward of the same objective, same batch."""
    import torch
    from sentence_transformers import SentenceTransformer

    from embedjax.models.pretrained import resolve_model_dir

    model = SentenceTransformer(str(resolve_model_dir("minilm")), device="cpu")
    model.eval()  # no dropout, as on the JAX side
    features = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask),
                "token_type_ids": torch.zeros(ids.shape, dtype=torch.long)}
    half = ids.shape[0] // 2

    def objective():
        emb = model(features)["sentence_embedding"]
        return (emb[:half] * emb[half:]).sum(-1).mean()

    def forward_backward():
        model.zero_grad()
        objective().backward()

    with torch.no_grad():
        forward = median_ms(objective)
    return {"torch_forward_ms": round(forward, 1), "torch_forward_backward_ms": round(median_ms(forward_backward), 1),
            "torch_threads": torch.get_num_threads()}


def main() -> None:
    import jax
    import jax.numpy as jnp

    from embedjax import provenance
    from embedjax.bench.report import device_description
    from embedjax.encoder import Encoder, embed_batch

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/profile_grad_step.json")
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--sentences", type=int, default=32)
    parser.add_argument("--length", type=int, default=40)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    b, length = args.sentences, args.length
    ids = rng.integers(1000, 20000, (b, length))
    mask = (np.arange(length)[None] < rng.integers(8, length, (b, 1))).astype(np.int64)
    tokens = {"input_ids": jnp.asarray(ids, jnp.int32), "attention_mask": jnp.asarray(mask, jnp.int32),
              "token_type_ids": jnp.zeros((b, length), jnp.int32)}
    encoder = Encoder.from_pretrained("minilm")

    def objective(params):
        emb = embed_batch(encoder.model, params, tokens, pooling="mean", normalize=True, deterministic=True)
        return jnp.mean(jnp.sum(emb[: b // 2] * emb[b // 2:], axis=-1))

    grad = jax.jit(jax.grad(objective))
    forward = jax.jit(objective)
    load = provenance.load_average_1min()
    wall = {"embedjax_forward_ms": round(median_ms(lambda: jax.block_until_ready(forward(encoder.params))), 1),
            "embedjax_forward_backward_ms": round(median_ms(lambda: jax.block_until_ready(grad(encoder.params))), 1),
            **torch_times(ids, mask)}
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(args.calls):
                jax.block_until_ready(grad(encoder.params))
        times = kernel_times(trace_dir, args.calls)
    hlo = grad.lower(encoder.params).compile().as_text()
    broadcasts = []
    for name, ms in sorted(times.items(), key=lambda item: -item[1]):
        shape = re.search(r"%" + re.escape(name) + r" = ([^ ]+) ", hlo)
        if name.startswith("wrapped_broadcast") and ms >= 1.0:
            broadcasts.append({"op": name, "ms": round(ms, 2), "shape": shape.group(1) if shape else None})
    kinds = by_kind(times)
    total = sum(kinds.values())
    record = {
        "what": "XLA kernel time per gradient call of MiniLM, by op kind",
        "batch": f"{b}x{length}",
        "calls": args.calls,
        "wall_medians": wall,
        "kernel_ms_per_call": round(total, 1),
        "by_kind": [{"kind": k, "ms": round(v, 2), "share": round(v / total, 3)} for k, v in kinds.items() if v >= 1.0],
        "largest_broadcasts": broadcasts,
        "device": device_description(),
        "load_1min": load,
        "commit": provenance.git_commit(),
        "command": "python benchmarks/profile_grad_step.py",
    }
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps({k: record[k] for k in ("wall_medians", "kernel_ms_per_call", "by_kind")})[:2000])


if __name__ == "__main__":
    main()

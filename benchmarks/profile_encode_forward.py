"""Where the CPU time of one long-document encode batch goes, per XLA:CPU kernel library.

    python benchmarks/profile_encode_forward.py [--out benchmarks/profile_encode_forward.json]

MiniLM's embedding program (`Encoder`'s) on the first 64 scifact abstracts padded to 256 tokens,
compiled once per library of `embedjax.xla_cpu` (``xla``: XLA's defaults, YNNPACK; ``onednn``:
oneDNN dots and the attention kernel's pairwise reductions). Each program's wall-clock median is
taken beside sentence-transformers' forward of the same texts (alternating, ``--repeats`` rounds),
then ``--calls`` calls run under `jax.profiler.trace` and each kernel's trace events are summed
per op kind (`profile_grad_step.by_kind`). Durations on the two worker threads add up, so the
per-call kernel total can exceed wall time. A diagnostic, not a speed claim: run it idle.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from profile_grad_step import by_kind, kernel_times  # noqa: E402


def main() -> None:
    import jax
    import torch
    from sentence_transformers import SentenceTransformer

    from embedjax import provenance, xla_cpu
    from embedjax.bench.encode import load_texts
    from embedjax.bench.report import device_description
    from embedjax.bench.timing import interleaved_seconds
    from embedjax.encoder import Encoder
    from embedjax.models.pretrained import resolve_model_dir

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/profile_encode_forward.json")
    parser.add_argument("--texts", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7, help="alternating timed rounds (medians)")
    parser.add_argument("--calls", type=int, default=2, help="traced calls per library")
    args = parser.parse_args()

    texts = load_texts("scifact", None, args.texts)
    load = provenance.load_average_1min()
    programs, batch = {}, None
    for library in ("xla", "onednn"):
        os.environ[xla_cpu.ENV] = library
        encoder = Encoder.from_pretrained("all-MiniLM-L6-v2", max_length=args.max_length)
        batch = encoder.tokenizer.pad(encoder.tokenizer.token_ids(texts), rows=args.texts)
        programs[library] = (encoder._jitted, encoder.params)
    st = SentenceTransformer(str(resolve_model_dir("all-MiniLM-L6-v2")), device="cpu")
    st.max_seq_length = args.max_length
    features = st.tokenize(texts)

    def torch_forward():
        with torch.inference_mode():
            return st.forward(dict(features))["sentence_embedding"]

    calls = {"torch": torch_forward}
    calls.update({library: (lambda p=program, w=params: jax.block_until_ready(p(w, batch)))
                  for library, (program, params) in programs.items()})
    for fn in calls.values():
        fn()  # compile / warm up
    seconds = interleaved_seconds(calls, args.repeats)
    wall_ms = {name: round(float(np.median(s)) * 1e3, 1) for name, s in seconds.items()}
    libraries = {}
    for library in programs:
        with tempfile.TemporaryDirectory() as trace_dir:
            with jax.profiler.trace(trace_dir):
                for _ in range(args.calls):
                    calls[library]()
            kinds = by_kind(kernel_times(trace_dir, args.calls))
        total = sum(kinds.values())
        libraries[library] = {
            "wall_ms": wall_ms[library], "torch_over_embedjax": round(wall_ms["torch"] / wall_ms[library], 3),
            "kernel_ms_per_call": round(total, 1),
            "by_kind": [{"kind": k, "ms": round(v, 1), "share": round(v / total, 3)} for k, v in kinds.items()
                        if v >= 0.01 * total]}
    record = {
        "what": "MiniLM embedding program on long documents: wall time against sentence-transformers and XLA "
                "kernel time by op kind, per XLA:CPU kernel library",
        "batch": f"{args.texts}x{batch['input_ids'].shape[1]}", "repeats": args.repeats, "calls": args.calls,
        "torch_forward_ms": wall_ms["torch"], "torch_threads": torch.get_num_threads(), "libraries": libraries,
        "device": device_description(), "load_1min": load, "commit": provenance.git_commit(),
        "command": "python benchmarks/profile_encode_forward.py",
    }
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps({"torch_forward_ms": wall_ms["torch"],
                      **{k: {"wall_ms": v["wall_ms"], "ratio": v["torch_over_embedjax"]} for k, v in libraries.items()}}))


if __name__ == "__main__":
    main()

"""XLA's loop emitter against the MLIR fusion emitters in MiniLM's oneDNN encode programs.

    python benchmarks/loop_emitter_ab.py [--out benchmarks/loop_emitter_ab.json] [--rounds 5]

`embedjax.xla_cpu.inference_jit` compiles oneDNN inference programs with XLA's loop emitter
(``xla_cpu_use_fusion_emitters=False``). This builds two `Encoder`s in one process, one with the
option (``loop``) and one without it (``fusion``, XLA's default), and times ``Encoder.encode`` on
three corpora with the two alternating (`interleaved_seconds`, one warm-up call each, so compiles
are excluded): the first 1,000 msmarco passages (title + text, length buckets up to 256 tokens),
the bench's 384 scifact abstracts at 256 tokens and the 2,758 STS-B test sentences (packed). Then
it traces one encode of 256 msmarco passages per emitter and lists each emitter's longest XLA
kernels with what the same kernels took under the other (`profile_grad_step.kernel_times`; 0: no
kernel of that name). Embeddings of the two encoders are compared too. A
diagnostic, not a speed claim against another library: run it idle.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

# Per-kernel trace events of XLA:CPU's thunks; read once, when jax starts.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from profile_grad_step import kernel_times  # noqa: E402


def corpora() -> dict[str, list[str]]:
    from embedjax.bench.encode import load_texts

    msmarco = os.path.join(os.environ.get("EMBEDJAX_DATA_DIR", "../shared/data"), "msmarco")
    return {"msmarco_1000": load_texts("msmarco", msmarco, 1000), "scifact_384": load_texts("scifact", None, 384),
            "stsb_2758": load_texts("stsb", None, 2758)}


def encoders() -> dict:
    """Two MiniLM encoders whose programs differ only in the emitter option."""
    from embedjax import xla_cpu
    from embedjax.encoder import Encoder

    os.environ[xla_cpu.ENV] = "onednn"
    built, default = {}, dict(xla_cpu.LOOP_EMITTER)
    for name, option in (("loop", default), ("fusion", {})):
        xla_cpu.LOOP_EMITTER = option  # read when the encoder compiles its program
        built[name] = Encoder.from_pretrained("all-MiniLM-L6-v2", max_length=256)
    xla_cpu.LOOP_EMITTER = default
    return built


def main() -> None:
    import jax

    from embedjax import provenance
    from embedjax.bench.report import device_description
    from embedjax.bench.timing import interleaved_seconds

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/loop_emitter_ab.json")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timed rounds per corpus")
    parser.add_argument("--top", type=int, default=6, help="kernels listed per emitter")
    args = parser.parse_args()

    load = provenance.load_average_1min()
    texts, encs = corpora(), encoders()
    results = {}
    for corpus, batch in texts.items():
        calls = {name: (lambda e=enc, t=batch: e.encode(t, batch_size=64)) for name, enc in encs.items()}
        first = {name: fn() for name, fn in calls.items()}  # compiles every length bucket
        seconds = interleaved_seconds(calls, args.rounds)
        per_s = {name: round(len(batch) / float(np.median(s)), 1) for name, s in seconds.items()}
        results[corpus] = {"texts_per_s": per_s, "loop_over_fusion": round(per_s["loop"] / per_s["fusion"], 3),
                           "max_abs_embedding_difference": float(np.abs(first["loop"] - first["fusion"]).max())}
        print(corpus, json.dumps(results[corpus]), flush=True)
    kernels = {}
    for name, enc in encs.items():
        batch = texts["msmarco_1000"][:256]
        enc.encode(batch, batch_size=64)
        with tempfile.TemporaryDirectory() as trace_dir:
            with jax.profiler.trace(trace_dir):
                enc.encode(batch, batch_size=64)
            kernels[name] = kernel_times(trace_dir, 1)
    # Each emitter's longest kernels, and what the same kernels took under the other one.
    top = {k for times in kernels.values() for k in sorted(times, key=times.get, reverse=True)[:args.top]}
    traced = {name: {"kernel_ms": round(sum(times.values()), 1),
                     "kernels_ms": {k: round(times.get(k, 0.0), 1) for k in sorted(top, key=lambda k: -times.get(k, 0.0))}}
              for name, times in kernels.items()}
    provenance.write_artifact(args.out, {  # commit, versions and command; the load is the start's
        "what": "MiniLM oneDNN encode programs compiled with XLA's loop emitter against the MLIR fusion emitters "
                "(texts/s, medians of alternating rounds after a warm-up; kernels of one traced encode of 256 "
                "msmarco passages)",
        "rounds": args.rounds, "corpora": results, "trace_msmarco_256": traced,
        "device": device_description(), "load_1min": load,
    })
    print(json.dumps({k: v["loop_over_fusion"] for k, v in results.items()}))


if __name__ == "__main__":
    main()

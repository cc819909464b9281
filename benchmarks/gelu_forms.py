"""What the spelling of exact GELU costs on the CPU: jax.nn.gelu's erfc form against the erf form.

    python benchmarks/gelu_forms.py [--out benchmarks/gelu_forms.json]

Two parts, both in programs compiled for oneDNN (`embedjax.xla_cpu`, what `Encoder` runs on
x86-64):

1. The activation alone (bias add included, as the MLP fuses it) at MiniLM's MLP width, [640,
   1536] (one packed STS-B batch of 10 rows x 64 tokens) and [16384, 1536] (64 abstracts x 256
   tokens), in interleaved rounds, with each form's largest error against a float64 reference on
   N(0, 4) inputs. ``tanh`` (the approximate GELU) is timed beside them for scale.
2. MiniLM's whole `Encoder.encode` with the MLP activation traced as each form (the erfc form is
   put into `layers.ACTIVATIONS` while its encoder compiles), on all STS-B test sentences and on
   the first ``--scifact-texts`` scifact abstracts, alternating, every round kept: the ratio of
   the two encode times per round is paired, so the VM's drift between rounds cancels.

A diagnostic, not a speed claim: run it idle.
"""
from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np


def kernel_rounds(rounds: int) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from embedjax import xla_cpu
    from embedjax.bench.timing import interleaved_seconds
    from embedjax.models import layers

    options = xla_cpu.compiler_options("cpu", "onednn")
    forms = {"erfc (jax.nn.gelu)": lambda x: jax.nn.gelu(x, approximate=False), "erf (layers.gelu_erf)": layers.gelu_erf,
             "tanh approximation": lambda x: jax.nn.gelu(x, approximate=True)}
    rng = np.random.default_rng(0)
    erf64 = np.vectorize(math.erf)
    results = []
    for shape in ((640, 1536), (16384, 1536)):
        x = (rng.standard_normal(shape) * 2.0).astype(np.float32)
        bias = rng.standard_normal(shape[-1:]).astype(np.float32)
        x64 = x.astype(np.float64) + bias.astype(np.float64)
        # The float64 reference only at the small shape: math.erf over 25M values would take minutes.
        want = x64 * 0.5 * (1.0 + erf64(x64 / math.sqrt(2.0))) if shape[0] <= 640 else None
        # Held for the whole run: jaxlib 0.10.2 aborts when a oneDNN program is dropped mid-execution.
        programs = {name: jax.jit(lambda a, b, f=f: f(a + b), compiler_options=options) for name, f in forms.items()}
        xs, bs = jnp.asarray(x), jnp.asarray(bias)
        errors = {}
        for name, program in programs.items():
            out = np.asarray(program(xs, bs), np.float64)
            if want is not None:
                errors[name] = float(np.abs(out - want).max())
        seconds = interleaved_seconds({name: (lambda p=program: p(xs, bs)) for name, program in programs.items()},
                                      rounds)
        ms = {name: [round(s * 1e3, 3) for s in times] for name, times in seconds.items()}
        for name in programs:
            results.append({"shape": list(shape), "form": name, "median_ms": round(float(np.median(ms[name])), 3),
                            "rounds_ms": ms[name],
                            **({"max_abs_error_vs_float64": errors[name]} if name in errors else {})})
    return results


def encode_rounds(corpus: str, num_texts: int | None, rounds: int) -> dict:
    import jax

    from embedjax.bench.encode import load_texts
    from embedjax.bench.timing import interleaved_seconds
    from embedjax.encoder import Encoder
    from embedjax.models import layers

    texts = load_texts(corpus, None, num_texts)
    erf_form = layers.ACTIVATIONS["gelu"]
    encoders = {}
    for name, act in (("erfc", lambda x: jax.nn.gelu(x, approximate=False)), ("erf", erf_form)):
        layers.ACTIVATIONS["gelu"] = act
        try:
            encoder = Encoder.from_pretrained("all-MiniLM-L6-v2", max_length=256)
            encoder.encode(texts)  # compiles every shape while the form is in place
        finally:
            layers.ACTIVATIONS["gelu"] = erf_form
        encoders[name] = encoder
    gap = float(np.abs(encoders["erfc"].encode(texts) - encoders["erf"].encode(texts)).max())
    seconds = {name: [round(s, 3) for s in times] for name, times in
               interleaved_seconds({name: (lambda e=e: e.encode(texts)) for name, e in encoders.items()}, rounds).items()}
    paired = [a / b for a, b in zip(seconds["erfc"], seconds["erf"])]
    return {"corpus": corpus, "texts": len(texts), "rounds": rounds, "seconds": seconds,
            "median_s": {name: round(float(np.median(s)), 3) for name, s in seconds.items()},
            "erfc_over_erf_paired_median": round(float(np.median(paired)), 3),
            "erfc_over_erf_per_round": [round(r, 3) for r in paired], "max_abs_embedding_gap": gap}


def main() -> None:
    from embedjax import provenance
    from embedjax.bench.report import device_description

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/gelu_forms.json")
    parser.add_argument("--kernel-rounds", type=int, default=15)
    parser.add_argument("--encode-rounds", type=int, default=7)
    parser.add_argument("--scifact-texts", type=int, default=128)
    args = parser.parse_args()
    os.environ["EMBEDJAX_CPU_GEMM"] = "onednn"

    load = provenance.load_average_1min()
    record = {
        "what": "exact GELU as erfc (jax.nn.gelu) against erf (layers.gelu_erf) in oneDNN programs: the activation "
                "alone, and MiniLM's whole encode with each, paired rounds",
        "kernel": kernel_rounds(args.kernel_rounds),
        "encode": [encode_rounds("stsb", None, args.encode_rounds),
                   encode_rounds("scifact", args.scifact_texts, args.encode_rounds)],
        "device": device_description(), "load_1min": load, "commit": provenance.git_commit(),
        "command": "python benchmarks/gelu_forms.py",
    }
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    for row in record["kernel"]:
        print(row["shape"], row["form"], row["median_ms"], row.get("max_abs_error_vs_float64"))
    for row in record["encode"]:
        print(row["corpus"], row["median_s"], "erfc/erf paired", row["erfc_over_erf_paired_median"])


if __name__ == "__main__":
    main()

"""``python -m embedjax bench scan``: compile and run time of the scanned layer stack vs the unrolled one.

The same encoder (default: the 30-layer SmolLM2-135M-Instruct) is built twice from the same
weights: ``scan_unroll=1`` (one ``lax.scan`` step holding one layer: the program's size does not
grow with depth) and ``scan_unroll=num_layers`` (every layer spelled out, what a Python loop over
layers compiles to). Each is lowered and compiled for one padded batch shape, alternating the two
to share background load; the medians of the compile times and of the run times of the compiled
programs are reported with their ratios, and the two programs' embeddings are compared.
"""
from __future__ import annotations

import argparse
import time

from embedjax.bench import report

SECTION = "Scanned vs unrolled layers (issue 11)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="SmolLM2-135M-Instruct", help="model folder or packaged alias")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--length", type=int, default=64, help="padded tokens per text")
    parser.add_argument("--repeats", type=int, default=3, help="compiles and timed runs per variant (medians)")
    parser.add_argument("--dtype", default="float32")
    report.add_arguments(parser)


def _compile_seconds(encoder, params, batch) -> tuple[float, object]:
    import jax

    fn = jax.jit(lambda p, b: encoder.embed_fn(p, b))
    start = time.perf_counter()
    compiled = fn.lower(params, batch).compile()
    return time.perf_counter() - start, compiled


def run(args: argparse.Namespace) -> dict:
    import jax
    import numpy as np

    import embedjax as ej
    from embedjax.bench.timing import median_seconds
    from embedjax.models.registry import family_for_config

    scanned = ej.Encoder.from_pretrained(args.model, dtype=args.dtype, scan_unroll=1)
    layers = scanned.config.num_layers
    family = family_for_config(scanned.config)
    unrolled_model = family.build(scanned.config, dtype=args.dtype, scan_unroll=layers)
    unrolled = ej.Encoder(unrolled_model, scanned.params, scanned.tokenizer, pooling=scanned.pooling,
                          normalize=scanned.normalize, source=scanned.source)
    rng = np.random.default_rng(0)
    vocab = scanned.config.vocab_size
    batch = {"input_ids": rng.integers(3, vocab, size=(args.batch_size, args.length)).astype(np.int32),
             "attention_mask": np.ones((args.batch_size, args.length), np.int32)}
    if scanned.family.tokenizer.token_type_ids:
        batch["token_type_ids"] = np.zeros_like(batch["input_ids"])
    started = report.start(args)
    compile_times = {"scan": [], "unrolled": []}
    programs = {}
    for _ in range(max(1, args.repeats)):
        for name, enc in (("scan", scanned), ("unrolled", unrolled)):
            jax.clear_caches()
            seconds, programs[name] = _compile_seconds(enc, enc.params, batch)
            compile_times[name].append(seconds)
    run_times = {name: median_seconds(lambda p=prog: p(scanned.params, batch), args.repeats)
                 for name, prog in programs.items()}
    emb = {name: np.asarray(prog(scanned.params, batch)) for name, prog in programs.items()}
    scan_compile = float(np.median(compile_times["scan"]))
    unrolled_compile = float(np.median(compile_times["unrolled"]))
    row = {
        "model": args.model,
        "family": family.name,
        "layers": layers,
        "batch": f"{args.batch_size}x{args.length}",
        "dtype": args.dtype,
        "scan_compile_s": scan_compile,
        "unrolled_compile_s": unrolled_compile,
        "compile_ratio": scan_compile / unrolled_compile,
        "scan_run_ms": 1e3 * run_times["scan"],
        "unrolled_run_ms": 1e3 * run_times["unrolled"],
        "max_abs_embedding_diff": float(np.abs(emb["scan"] - emb["unrolled"]).max()),
        "device": report.device_description(),
    }
    return report.finish(args, "scan", SECTION, [row], started)[0]


if __name__ == "__main__":  # runnable without the CLI's optional imports
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    import json

    print(json.dumps(run(parser.parse_args())))

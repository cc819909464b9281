"""``python -m embedjax bench long_context``: compiled memory of encoding one long input, per
attention implementation and length (issue 15).

The encoder's embedding function (model + pooling) is lowered and compiled for one input of each
length; XLA's memory analysis of the compiled program gives its temporary buffers (activations,
attention scores) apart from the weights and inputs. Nothing runs, so the figures are the same on
a loaded machine. Dense attention keeps [L, L] scores per head (temporaries ~ L^2); the chunked
kernel keeps one [L, chunk] block (~ L). The bench fails when the chunked kernel's growth from
``--ratio-from`` to the longest length exceeds ``--max-ratio`` (10 for 4k -> 32k: 8x the tokens).

Positions past the model's trained length need a method: ``--position-extension TYPE`` (absolute
tables) or ``--rope-scaling JSON`` (RoPE models), applied with ``max_length`` = the longest length.
"""
from __future__ import annotations

import argparse
import json

from embedjax.bench import report

SECTION = "Compiled memory of one long input (issue 15)"
MIB = 2 ** 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="all-MiniLM-L6-v2", help="model folder or packaged alias")
    parser.add_argument("--lengths", default="4096,32768", help="comma-separated token counts of the one input")
    parser.add_argument("--impls", default="chunked,explicit",
                        help="attention implementations (embedjax.models.attention.ATTENTION_IMPLS)")
    parser.add_argument("--position-extension", default=None,
                        help="absolute-position method for lengths past the table (interpolate, grouped, recurrent, pcw)")
    parser.add_argument("--rope-scaling", default=None, help='RoPE scaling as JSON, e.g. \'{"type": "linear", "factor": 4}\'')
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--ratio-from", type=int, default=4096, help="length the growth ratio is measured from")
    parser.add_argument("--max-ratio", type=float, default=10.0,
                        help="fail when the chunked kernel's temporaries grow more than this from --ratio-from "
                             "to the longest length")
    report.add_arguments(parser)


def compiled_temp_bytes(folder, length: int, *, impl: str, dtype: str = "float32", options: dict | None = None) -> dict:
    """Temporary and argument bytes of the compiled embedding function for one input of ``length``
    tokens, from the model's config alone (abstract weights: nothing is loaded or run)."""
    import jax
    import jax.numpy as jnp

    from embedjax.convert import hf
    from embedjax.encoder import abstract_params, embed_batch
    from embedjax.models.registry import family_for_config

    config = hf.read_config(folder, attention_impl=impl, **(options or {}))
    if length > config.max_supported_length:
        raise ValueError(f"length {length} exceeds the {config.max_supported_length} positions {folder} supports "
                         "as configured; pass --position-extension or --rope-scaling")
    family = family_for_config(config)
    model = family.build(config, dtype=dtype)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          _unbox(abstract_params(model, None, family)))
    batch = {"input_ids": jax.ShapeDtypeStruct((1, length), jnp.int32),
             "attention_mask": jax.ShapeDtypeStruct((1, length), jnp.int32)}
    if family.tokenizer.token_type_ids:
        batch["token_type_ids"] = jax.ShapeDtypeStruct((1, length), jnp.int32)
    embed = jax.jit(lambda p, b: embed_batch(model, p, b, pooling="mean", normalize=True))
    analysis = embed.lower(params, batch).compile().memory_analysis()
    return {"temp_bytes": int(analysis.temp_size_in_bytes), "argument_bytes": int(analysis.argument_size_in_bytes)}


def _unbox(tree):
    from flax.linen import meta

    return meta.unbox(tree)


def _options(args) -> tuple[dict, str]:
    longest = max(_lengths(args.lengths))
    options, label = {}, "none"
    if args.position_extension:
        options["position_extension"] = {"type": args.position_extension, "max_length": longest}
        label = args.position_extension
    if args.rope_scaling:
        options["rope_scaling"] = json.loads(args.rope_scaling)
        label = json.dumps(options["rope_scaling"], sort_keys=True)
    return options, label


def _lengths(text: str) -> list[int]:
    lengths = sorted({int(x) for x in text.split(",") if x.strip()})
    if not lengths or lengths[0] < 2:
        raise ValueError(f"--lengths {text!r} must list token counts >= 2")
    return lengths


def run(args: argparse.Namespace) -> dict:
    from tqdm.auto import tqdm

    from embedjax.models.pretrained import resolve_model_dir

    folder = resolve_model_dir(args.model)
    lengths = _lengths(args.lengths)
    impls = [x.strip() for x in args.impls.split(",") if x.strip()]
    options, label = _options(args)
    started = report.start(args)
    measured = {}
    for impl in impls:
        for length in tqdm(lengths, desc=f"compile {impl}", unit="length"):
            measured[impl, length] = compiled_temp_bytes(folder, length, impl=impl, dtype=args.dtype, options=options)
    base = args.ratio_from if args.ratio_from in lengths else lengths[0]
    rows = []
    for impl in impls:
        for length in lengths:
            temp = measured[impl, length]["temp_bytes"]
            rows.append({"model": args.model, "method": label, "impl": impl, "dtype": args.dtype, "length": length,
                         "temp_mib": temp / MIB, "weights_mib": measured[impl, length]["argument_bytes"] / MIB,
                         "ratio_from": base, "temp_ratio": temp / measured[impl, base]["temp_bytes"],
                         "device": report.device_description()})
    records = report.finish(args, "long_context", SECTION, rows, started)
    result = {"rows": records}
    if "chunked" in impls:
        growth = measured["chunked", lengths[-1]]["temp_bytes"] / measured["chunked", base]["temp_bytes"]
        result["chunked_growth"] = growth
        if growth > args.max_ratio:
            raise report.BenchFailed(f"chunked attention's temporaries grew {growth:.2f}x from {base} to "
                                     f"{lengths[-1]} tokens (bound {args.max_ratio})", result)
    return result


if __name__ == "__main__":  # runnable without the CLI's optional imports
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    print(json.dumps(run(parser.parse_args()), default=float))

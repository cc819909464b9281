"""Command line: ``python -m embedjax {encode,eval,train,bench,demo,...}``.

Every command prints one JSON object as the last line of stdout, so scripts can
``tail -n1 | jq``. Heavy imports (jax, torch) happen inside the commands, keeping
``--help`` fast and letting a bench module set XLA flags before JAX starts.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import pkgutil
import shlex
import sys

BENCH_SKIP = {"report", "timing"}  # helpers, not benchmarks


def _common_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder (transformers / sentence-transformers) "
                                                  "or 'all-MiniLM-L6-v2' for the packaged MiniLM")
    p.add_argument("--pooling", default=None, help="override the folder's pooling (cls, mean, max, lasttoken, ...)")
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--attention", default=None, choices=["causal", "bidirectional"],
                   help="decoder LLMs: override the model's attention (default: as trained, causal)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--progress", action="store_true", help="show tqdm progress bars")


def _load_encoder(args):
    import embedjax as ej

    return ej.Encoder.from_pretrained(args.model, pooling=args.pooling, max_length=args.max_length, dtype=args.dtype,
                                      attention=args.attention)


def cmd_convert_gguf(args) -> dict:
    """A GGUF file -> a transformers folder embedjax and transformers load."""
    from embedjax.convert.gguf import convert_gguf

    out = convert_gguf(args.input, args.output, overwrite=args.overwrite)
    config = json.loads((out / "config.json").read_text())
    return {"command": "convert gguf", "output": str(out), "model_type": config["model_type"],
            "num_hidden_layers": config["num_hidden_layers"], "hidden_size": config["hidden_size"]}


def cmd_encode(args) -> dict:
    import numpy as np

    src, dst = pathlib.Path(args.input), pathlib.Path(args.output)
    if not src.is_file():
        raise FileNotFoundError(f"--input {src} does not exist (one text per line)")
    if dst.suffix != ".npy":
        raise ValueError(f"--output {dst} must end in .npy")
    if dst.exists() and not args.overwrite:
        raise FileExistsError(f"--output {dst} exists; pass --overwrite to replace it")
    texts = src.read_text(encoding="utf-8").splitlines()
    emb = _load_encoder(args).encode(texts, batch_size=args.batch_size, prompt=args.prompt,
                                     show_progress=args.progress)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp.npy")
    np.save(tmp, emb)
    os.replace(tmp, dst)
    return {"command": "encode", "output": str(dst), "rows": int(emb.shape[0]), "dim": int(emb.shape[1])}


def cmd_eval(args) -> dict:
    import embedjax as ej

    if not args.sts and not args.beir:
        raise ValueError("eval needs --sts FILE and/or --beir DIR")
    enc = _load_encoder(args)
    out: dict = {"command": "eval", "model": args.model}
    if args.sts:
        s1, s2, gold = ej.data.read_sts(args.sts)
        out["sts"] = ej.eval.sts(enc, s1, s2, gold, batch_size=args.batch_size, show_progress=args.progress)
    if args.beir:
        corpus, queries, qrels = ej.data.read_beir(args.beir, split=args.split)
        out["retrieval"] = ej.eval.retrieval(
            enc, corpus, queries, qrels, k_values=tuple(args.k_values), quantization=args.quantization,
            dims=args.dims, batch_size=args.batch_size, query_prompt=args.query_prompt,
            document_prompt=args.document_prompt, show_progress=args.progress)
    return out


def cmd_demo(args) -> dict:
    """Evaluate the packaged MiniLM on STS-B test and the msmarco subset, and print a table."""
    import embedjax as ej

    data = pathlib.Path(args.data_dir or os.environ.get("EMBEDJAX_DATA_DIR", "../shared/data"))
    if not (data / "stsb").is_dir():
        raise FileNotFoundError(f"data folder {data} has no stsb/: set EMBEDJAX_DATA_DIR to the shared data folder")
    enc = ej.Encoder.from_pretrained("all-MiniLM-L6-v2")
    print(enc, flush=True)
    s1, s2, gold = ej.data.read_sts(data / "stsb" / "sts-test.csv")
    sts = ej.eval.sts(enc, s1, s2, gold, show_progress=True)
    corpus, queries, qrels = ej.data.read_beir(data / "msmarco")
    ret = ej.eval.retrieval(enc, corpus, queries, qrels, k_values=(10, 100), show_progress=True)
    rows = [("STS-B test Spearman (cosine)", sts["spearman_cosine"], 82.03),
            ("msmarco nDCG@10", ret["ndcg@10"], 79.77),
            ("msmarco recall@100", ret["recall@100"], 80.32)]
    print("\n| measure | embedjax | sentence-transformers |\n|---|---|---|")
    for name, ours, ref in rows:
        print(f"| {name} | {ours:.2f} | {ref:.2f} |")
    return {"command": "demo", "sts_spearman_cosine": sts["spearman_cosine"], "msmarco_ndcg@10": ret["ndcg@10"],
            "msmarco_recall@100": ret["recall@100"]}


def _bench_modules() -> list[str]:
    import embedjax.bench as bench_pkg

    return sorted(m.name for m in pkgutil.iter_modules(bench_pkg.__path__) if m.name not in BENCH_SKIP)


def build_parser(argv=None) -> argparse.ArgumentParser:
    """The full parser. Bench modules are imported only when ``bench`` is the command: some set
    XLA flags (fake device counts) at import, which must not leak into ``train`` or ``eval``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m embedjax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("encode", help="embed one text per line into a .npy [N, D] float32")
    _common_model_args(p)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--prompt", default=None, help='prefix for every text, e.g. "query: "')
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("eval", help="STS and/or BEIR retrieval evaluation")
    _common_model_args(p)
    p.add_argument("--sts", default=None, help="STS-B format file")
    p.add_argument("--beir", default=None, help="BEIR folder (corpus.jsonl, queries.jsonl, qrels)")
    p.add_argument("--split", default="test")
    p.add_argument("--k-values", type=int, nargs="+", default=[1, 10, 100])
    p.add_argument("--quantization", default=None, help="None, fp8, int8, int4, binary, binary+rescore, residual2, ...")
    p.add_argument("--dims", type=int, default=None, help="Matryoshka truncation before search")
    p.add_argument("--query-prompt", default=None)
    p.add_argument("--document-prompt", default=None)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("convert", help="convert a checkpoint into a transformers folder embedjax loads")
    formats = p.add_subparsers(dest="format", required=True)
    g = formats.add_parser("gguf", help="a llama.cpp GGUF file (dequantized to float32)")
    g.add_argument("--input", required=True, help="the .gguf file")
    g.add_argument("--output", required=True, help="the folder to write (config.json, model.safetensors, tokenizer)")
    g.add_argument("--overwrite", action="store_true")
    g.set_defaults(func=cmd_convert_gguf)

    p = sub.add_parser("demo", help="evaluate the packaged MiniLM on the shared data")
    p.add_argument("--data-dir", default=None)
    p.set_defaults(func=cmd_demo)

    from embedjax.data import filtered_benchmark

    p = sub.add_parser("filtered-benchmark", help="build the filtered-search benchmark (MiniLM embeddings of "
                                                  "scifact + nfcorpus + msmarco, attributes, exact ground truth)")
    filtered_benchmark.add_arguments(p)
    p.set_defaults(func=filtered_benchmark.main)

    p = sub.add_parser("train", help="train from an ml-collections config (python -m embedjax train --help)")
    from embedjax.train import cli as train_cli

    train_cli.add_arguments(p)
    p.set_defaults(func=train_cli.main, accepts_overrides=True)

    p = sub.add_parser("train-ctr", help="train a CTR model on a (compressed) embedding table: configs/ctr_tables.py")
    from embedjax.ctr import cli as ctr_cli

    ctr_cli.add_arguments(p)
    p.set_defaults(func=ctr_cli.main, accepts_overrides=True)

    p = sub.add_parser("bench", help="benchmarks; each prints one JSON line and appends to BENCHMARKS.md")
    bench_sub = p.add_subparsers(dest="bench", required=True)
    # `bench NAME` imports only NAME: a module that imports JAX (kernels) must not start it before
    # another (loss) sets its fake-device flags. `bench --help` imports them all for the listing.
    chosen = argv[1] if len(argv) > 1 and argv[0] == "bench" and not argv[1].startswith("-") else None
    import_all = argv[:1] == ["bench"] and chosen is None
    for name in _bench_modules():
        if not (import_all or name == chosen):
            bench_sub.add_parser(name)
            continue
        module = importlib.import_module(f"embedjax.bench.{name}")
        bp = bench_sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else "")
        module.add_arguments(bp)
        bp.set_defaults(func=module.run)

    for name, module_name in (("sweep", "embedjax.sweep"), ("results", "embedjax.results"),
                              ("merge", "embedjax.merge_cli")):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue
        p = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else "")
        module.add_arguments(p)
        p.set_defaults(func=module.main)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    args.command_line = "python -m embedjax " + shlex.join(argv)  # provenance of bench rows
    if extra:
        if not getattr(args, "accepts_overrides", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(getattr(args, "overrides", None) or []) + extra
    try:
        result = args.func(args)
    except RuntimeError as err:
        if not hasattr(err, "bench_result"):  # bench.report.BenchFailed: a bench that finished with errors
            raise
        print(f"error: {err}", file=sys.stderr)
        print(json.dumps(err.bench_result, default=float))
        return 1
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, FloatingPointError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        print(json.dumps({"command": args.command, "error": str(err)}))
        return 2
    print(json.dumps(result, default=float))
    return 0

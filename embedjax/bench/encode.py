"""``python -m embedjax bench encode``: embedjax vs sentence-transformers encode throughput.

Both encode the STS-B test sentences in the same process, with the same batch size, after
one untimed warm-up each (compilation for JAX, allocator warm-up for torch). Timed runs
alternate between the two so that background load hits both alike; the median of each is
reported with the ratio.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

SECTION = "Encode throughput (issue 2)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="all-MiniLM-L6-v2", help="model folder (default: the packaged MiniLM)")
    parser.add_argument("--data", default=None, help="STS file (default: $EMBEDJAX_DATA_DIR/stsb/sts-test.csv)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per implementation (median reported)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--no-report", action="store_true", help="do not append the row to BENCHMARKS.md")


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer

    import embedjax as ej
    from embedjax.bench.report import append_row, device_description
    from embedjax.models.pretrained import resolve_model_dir

    data = args.data or os.path.join(os.environ.get("EMBEDJAX_DATA_DIR", "../shared/data"), "stsb", "sts-test.csv")
    s1, s2, _ = ej.data.read_sts(data)
    sentences = s1 + s2
    folder = resolve_model_dir(args.model)
    enc = ej.Encoder.from_pretrained(folder, dtype=args.dtype)
    torch_device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch_device == "cuda":
        # JAX's default float32 matmul precision on GPUs is TF32; give PyTorch the same.
        torch.set_float32_matmul_precision("high")
    st = SentenceTransformer(str(folder), device=torch_device)

    def run_embedjax():
        enc.encode(sentences, batch_size=args.batch_size)

    def run_st():
        st.encode(sentences, batch_size=args.batch_size, convert_to_numpy=True)

    warmup_ej = _timed(run_embedjax)  # includes compilation; ST is warmed once too, untimed
    run_st()
    times_ej, times_st = [], []
    for _ in range(args.repeats):
        times_ej.append(_timed(run_embedjax))
        times_st.append(_timed(run_st))
    n = len(sentences)
    ej_rate, st_rate = n / statistics.median(times_ej), n / statistics.median(times_st)
    result = {
        "benchmark": "encode",
        "model": os.path.basename(str(folder).rstrip("/")) if args.model != "all-MiniLM-L6-v2" else args.model,
        "sentences": n,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "embedjax_sent_per_s": round(ej_rate, 1),
        "st_sent_per_s": round(st_rate, 1),
        "ratio": round(ej_rate / st_rate, 3),
        "repeats": args.repeats,
        "embedjax_first_call_s": round(warmup_ej, 2),
        "torch_threads": torch.get_num_threads(),
        "torch_device": torch_device,
        "device": device_description(),
    }
    if not args.no_report:
        append_row(SECTION, result)
    return result


if __name__ == "__main__":  # `python -m embedjax.bench.encode` runs without the CLI's optional imports
    import json

    _parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(_parser)
    print(json.dumps(run(_parser.parse_args())))

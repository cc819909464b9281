"""``python -m embedjax bench kernels``: Pallas top-k kernels against their XLA twins and the roofline.

On the device JAX sees (meant for a GPU, where the Pallas kernels compile through
Triton; on CPU they run in interpret mode, so keep ``--n`` tiny there) it:

* measures the two ceilings in the same run (``embedjax.bench.timing``): memory
  bandwidth from an elementwise pass (bytes read + written) and the dense bf16
  matrix-product rate;
* for the Hamming search (``--bits``-bit codes) and the int8 inner-product search
  (``--dim`` dims) over ``--n`` random corpus vectors, at each query batch and k,
  runs the Pallas kernel at each ``--blocks`` setting and ``--select`` top-k selection
  (the running top-k in the scan, or tile maxima + rescoring) and the XLA twin, checks that
  they return the same distances/scores and ids (exactly: both reduce integers and
  break ties toward the smaller id), and reports median times, the corpus bytes
  streamed per second as a fraction of the measured bandwidth, and the arithmetic
  rate (word XOR+popcounts per second for Hamming, int8 TOPS for int8).

A third ceiling, the popcount rate (`timing.popcount_tops`), bounds the Hamming scan with many
queries: each query and corpus word costs one popcount, so 64 queries over 10M 1024-bit codes ask
2e10 of them however fast the corpus streams; Hamming rows report both fractions. ``--layout
words`` stores the Hamming corpus word-major at `two_pass_topk.scan_rows` rows (the rows past
``--n`` are padding, searched away with ``n_valid``), so that the Pallas scan reads it where it
lies; with ``rows`` every search first copies the corpus into that layout (a transpose and a pad).
The int8 corpus is always stored row-major at ``scan_rows`` rows, which its scan reads in place.
Pallas rows give the query block they ran with (``block_q``: at most the queries rounded up to a
power of two).

With --record, rows go to BENCHMARKS.md ("Kernels on an accelerator") and benchmarks/kernels.jsonl.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from embedjax.bench import report
from embedjax.bench.timing import copy_bandwidth_gbs, matmul_tflops, median_seconds, popcount_tops, sig
from embedjax.kernels.dispatch import resolve_impl
from embedjax.kernels.hamming import query_block
from embedjax.kernels.two_pass_topk import check_selection, scan_rows

SECTION = "Kernels on an accelerator"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=4_000_000, help="corpus vectors (random)")
    parser.add_argument("--bits", type=int, default=1024, help="Hamming code length (multiple of 32)")
    parser.add_argument("--dim", type=int, default=384, help="int8 code dimension")
    parser.add_argument("--queries", default="64,512", help="comma-separated query batch sizes")
    parser.add_argument("--k", default="10,100", help="comma-separated k values")
    parser.add_argument("--blocks", default="16x128", help="Pallas block_q x block_n settings, comma-separated")
    parser.add_argument("--paths", default="hamming,int8", help="which searches to run")
    parser.add_argument("--splits", default="",
                        help="comma-separated target corpus splits per query block (programs = query blocks x "
                             "splits; default: the kernels' DEFAULT_SPLITS for each selection)")
    parser.add_argument("--select", default="running,two_pass",
                        help="Pallas top-k selections to time (embedjax.kernels.two_pass_topk.SELECTIONS)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per cell (median reported)")
    parser.add_argument("--bandwidth-mib", type=int, default=2048, help="buffer size of the bandwidth ceiling")
    parser.add_argument("--matmul-size", type=int, default=8192, help="size of the bf16 matmul ceiling")
    parser.add_argument("--popcount-mib", type=int, default=64, help="words of the popcount ceiling, in MiB")
    parser.add_argument("--layout", default="rows", choices=("rows", "words"),
                        help="Hamming corpus layout: row-major codes, or word-major at scan_rows (read in place)")
    report.add_arguments(parser)


def parse_blocks(text: str) -> list[tuple[int, int]]:
    """'16x128,32x64' -> [(16, 128), (32, 64)]; both sides powers of two (Triton tiles need it)."""
    out = []
    for part in text.split(","):
        try:
            bq, bn = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise ValueError(f"--blocks entries look like 16x128 (block_q x block_n); got {part!r}") from None
        if bq < 1 or bn < 1 or bq & (bq - 1) or bn & (bn - 1):
            raise ValueError(f"--blocks sizes must be powers of two; got {part!r}")
        out.append((bq, bn))
    return out


def _hamming_searches(q_codes, x_codes, n, layout):
    from embedjax.kernels.hamming import hamming_topk_pallas, hamming_topk_xla

    interpret = resolve_impl("pallas")[1]

    def pallas(k, bq, bn, select, splits):
        return lambda: hamming_topk_pallas(q_codes, x_codes, k, n, block_q=bq, block_n=bn, interpret=interpret,
                                           select=select, target_splits=splits, layout=layout)

    def xla(k):
        return lambda: hamming_topk_xla(q_codes, x_codes, k, n, layout=layout)

    return pallas, xla


def _int8_searches(q, x, q_scale, x_scale, n):
    from embedjax.kernels.lowbit import _lowbit_xla, lowbit_topk_pallas

    interpret = resolve_impl("pallas")[1]
    q_offset = jnp.zeros((q.shape[0],), jnp.float32)

    def pallas(k, bq, bn, select, splits):  # a corpus past 32-bit offsets runs in pieces
        return lambda: lowbit_topk_pallas(q, q_scale, x, x_scale, q_offset, k, n, kind="int8", block_q=bq,
                                          block_n=bn, interpret=interpret, select=select, target_splits=splits)

    def xla(k):
        return lambda: _lowbit_xla(q, q_scale, x, x_scale, q_offset, k, n, kind="int8")

    return pallas, xla


def _mismatches(got, want) -> int:
    """Rows of (values, ids) where the two searches disagree anywhere."""
    (gv, gi), (wv, wi) = [(np.asarray(v), np.asarray(i)) for v, i in (got, want)]
    return int(np.sum(np.any((gv != wv) | (gi != wi), axis=1)))


def _cells(kind, searches, qs, ks, blocks, selects, splits, corpus_bytes, ops_per_query, repeats, ceilings,
           popcounts_per_query=None):
    """One row per (queries, k, implementation); Pallas rows carry the check against the twin."""
    rows = []
    for q, (pallas, xla) in searches.items():
        for k in ks:
            reference = xla(k)
            want = jax.block_until_ready(reference())
            variants = [("xla", None, reference)]
            for select in selects:
                for split in splits:  # names without a suffix keep the defaults (running, DEFAULT_SPLITS)
                    suffix = ("" if select == "running" else f" {select}") + ("" if split is None else f" s{split}")
                    variants += [(f"pallas {bq}x{bn}{suffix}", (bq, bn), pallas(k, bq, bn, select, split))
                                 for bq, bn in blocks]
            base = None
            for name, bq_bn, fn in variants:
                row = dict(kernel=kind, impl=name, queries=q, k=k, error="")
                try:
                    got = jax.block_until_ready(fn())
                    seconds = median_seconds(fn, repeats, warmup=0)
                except Exception as err:  # a kernel that fails to lower is a result to report, not a crash
                    row.update(error=f"{type(err).__name__}: {str(err).splitlines()[0][:160]}")
                    rows.append(row)
                    continue
                base = seconds if name == "xla" else base
                row.update(
                    ms=sig(seconds * 1e3),
                    speedup_vs_xla=sig(base / seconds, 3) if base else None,
                    rows_differing_from_xla=_mismatches(got, want),
                    corpus_GBps=sig(corpus_bytes / seconds / 1e9),
                    fraction_of_bandwidth=sig(corpus_bytes / seconds / 1e9 / ceilings["bandwidth_GBps"]),
                    tera_ops_per_s=sig(q * ops_per_query / seconds / 1e12),
                )
                if popcounts_per_query:  # Hamming: the popcount ceiling binds with many queries
                    row["fraction_of_popcount_rate"] = sig(
                        q * popcounts_per_query / seconds / 1e12 / ceilings["popcount_T_per_s"])
                if name != "xla":  # the query block the kernels ran with (`hamming_topk_pallas` cuts it)
                    row["block_q"] = query_block(bq_bn[0], q) if kind == "hamming" else bq_bn[0]
                rows.append(row)
    return rows


def run(args: argparse.Namespace) -> dict:
    qs = [int(v) for v in args.queries.split(",")]
    ks = [int(v) for v in args.k.split(",")]
    blocks = parse_blocks(args.blocks)
    paths = [p for p in args.paths.split(",") if p]
    selects = [check_selection(v) for v in args.select.split(",") if v]
    splits = [int(v) for v in args.splits.split(",") if v] or [None]
    if unknown := set(paths) - {"hamming", "int8"}:
        raise ValueError(f"--paths may name hamming and int8; got {sorted(unknown)}")
    if args.bits % 32:
        raise ValueError(f"--bits must be a multiple of 32; got {args.bits}")
    if max(ks) > args.n:
        raise ValueError(f"k={max(ks)} is larger than --n={args.n}")

    started = report.start(args)
    ceilings = dict(bandwidth_GBps=sig(copy_bandwidth_gbs(args.bandwidth_mib << 20)),
                    bf16_matmul_TFLOPs=sig(matmul_tflops(args.matmul_size)))
    if "hamming" in paths:
        ceilings["popcount_T_per_s"] = sig(popcount_tops((args.popcount_mib << 20) // 4))
    key = jax.random.key(0)
    rows = []
    if "hamming" in paths:
        words = args.bits // 32
        # word-major at scan_rows: the rows past n are padding the searches mask with n_valid
        shape = (args.n, words) if args.layout == "rows" else (words, scan_rows(args.n))
        x = jax.random.bits(key, shape, jnp.uint32)
        searches = {q: _hamming_searches(jax.random.bits(jax.random.fold_in(key, q), (q, words), jnp.uint32), x, args.n,
                                         args.layout)
                    for q in qs}
        # Per query and corpus word: one XOR, one popcount, one add.
        rows += _cells("hamming", searches, qs, ks, blocks, selects, splits, args.n * words * 4, 3 * args.n * words,
                       args.repeats, ceilings, popcounts_per_query=args.n * words)
        for row in rows:
            row["layout"] = args.layout
        del x, searches
    if "int8" in paths:
        kx, ks_ = jax.random.split(jax.random.fold_in(key, 1))
        # stored at scan_rows (the rows past n are padding the searches mask with n_valid), so that
        # the Pallas scan reads the codes in place instead of padding a copy of them on every search
        x = jax.random.randint(kx, (scan_rows(args.n), args.dim), -127, 128, jnp.int32).astype(jnp.int8)
        x_scale = jax.random.uniform(ks_, (x.shape[0],), jnp.float32, 0.5, 1.5)
        searches = {}
        for q in qs:
            kq = jax.random.fold_in(key, 1000 + q)
            q_codes = jax.random.randint(kq, (q, args.dim), -127, 128, jnp.int32).astype(jnp.int8)
            searches[q] = _int8_searches(q_codes, x, jnp.ones((q,), jnp.float32), x_scale, args.n)
        # Per query and corpus code: one multiply-add per dimension (2 ops).
        rows += _cells("int8", searches, qs, ks, blocks, selects, splits, args.n * args.dim, 2 * args.n * args.dim,
                       args.repeats, ceilings)
        del x, searches

    device = report.device_description()
    for row in rows:
        row.update(device=device, n=args.n, **ceilings)
    records = report.finish(args, "kernels", SECTION, rows, started)
    bad = [r for r in rows if r.get("rows_differing_from_xla")]
    failed = [r for r in rows if r["error"]]
    result = dict(bench="kernels", device=device, n=args.n, bits=args.bits, dim=args.dim, **ceilings,
                  all_match_xla=not bad and not failed, rows=records)
    if bad or failed:
        raise report.BenchFailed(f"{len(failed)} cells failed and {len(bad)} differ from the XLA twin", result)
    return result


if __name__ == "__main__":  # `python -m embedjax.bench.kernels` runs without the CLI's optional imports
    import json

    _parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(_parser)
    print(json.dumps(run(_parser.parse_args())))

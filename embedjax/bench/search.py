"""``python -m embedjax bench search``: XLA search paths vs FAISS on CPU, same data, same run.

Measures queries/s for
  * Hamming top-k over N x bits binary codes: embedjax XLA twin (row-major codes, and the
    word-major corpus of ``kernels.hamming.word_major``: path ``hamming-words``; the two-pass
    selection under the bare name, others suffixed, e.g. ``hamming-running``) vs FAISS
    ``IndexBinaryFlat`` and ``faiss.knn_hamming``;
  * inner-product top-k over N x dim float32: XLA vs ``IndexFlatIP``;
  * int8 top-k over N x dim codes: XLA int8 kernel vs ``IndexScalarQuantizer`` (SQ8);
for query batches and k values given on the command line, the ratio to FAISS,
the achieved corpus bytes/s against the machine's memory bandwidth (a large
numpy copy timed in the same run), and the compiled temporary memory of the
default (two-pass) XLA Hamming search (Q x N / 32 tile maxima plus one chunk of scores).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from embedjax.bench import report

SECTION = "Search: XLA paths vs FAISS on CPU"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=1_000_000, help="corpus vectors")
    parser.add_argument("--bits", type=int, default=1024, help="binary code length")
    parser.add_argument("--dim", type=int, default=384, help="float/int8 dimension")
    parser.add_argument("--queries", default="1,64,512", help="comma-separated query batch sizes")
    parser.add_argument("--k", default="10,100", help="comma-separated k values")
    parser.add_argument("--chunk-size", type=int, default=32768, help="XLA corpus chunk (rows)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per cell (best is kept)")
    parser.add_argument("--paths", default="hamming,float,int8", help="which searches to run")
    parser.add_argument("--selects", default="two_pass,running",
                        help="Hamming top-k selections to time (kernels.two_pass_topk.SELECTIONS)")
    parser.add_argument("--bandwidth-mib", type=int, default=512, help="buffer size of the copy-bandwidth ceiling")
    report.add_arguments(parser)


def _best_time(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def memory_bandwidth_gbs(nbytes: int = 1 << 29) -> float:
    """Copy bandwidth (bytes read + bytes written per second), best of 3, in GB/s."""
    src = np.ones(nbytes // 8, np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    return 2 * src.nbytes / _best_time(lambda: np.copyto(dst, src), 3) / 1e9


def _row(path, ref_name, q, k, n, corpus_bytes, t_ours, t_ref, bandwidth):
    return {
        "path": path, "reference": ref_name, "n": n, "queries": q, "k": k,
        "embedjax_qps": round(q / t_ours, 2), "faiss_qps": round(q / t_ref, 2),
        "ratio_vs_faiss": round(t_ref / t_ours, 3),
        "embedjax_GBps": round(corpus_bytes / t_ours / 1e9, 2),
        "fraction_of_copy_bw": round(corpus_bytes / t_ours / 1e9 / bandwidth, 3),
    }


def _hamming_cells(args, rng, qs, ks, bandwidth):
    import faiss
    import jax

    from embedjax.kernels.hamming import hamming_topk, hamming_topk_xla, word_major
    from embedjax.kernels.two_pass_topk import check_selection
    from embedjax.quant.binary import to_faiss_bytes

    words = args.bits // 32
    x = rng.integers(0, 2**32, size=(args.n, words), dtype=np.uint32)
    xj = jax.device_put(x)
    # The word-major corpus is built once, like an index (not timed); its NumPy twin is a plain
    # NumPy allocation, so the NumPy column pays what a caller holding such an array pays.
    layouts = {"hamming": (xj, x, "rows"),
               "hamming-words": (jax.block_until_ready(word_major(xj)), np.ascontiguousarray(x.T), "words")}
    # The default selection (XLA: two-pass) keeps the bare path name; the others are suffixed.
    selects = [check_selection(select) for select in args.selects.split(",")]
    paths = {(path if select == "two_pass" else f"{path}-{select}"): (*corpora, select)
             for path, corpora in layouts.items() for select in selects}
    x_bytes = to_faiss_bytes(x, args.bits)
    index = faiss.IndexBinaryFlat(args.bits)
    index.add(x_bytes)
    rows, memory = [], {}
    for q in qs:
        qc = rng.integers(0, 2**32, size=(q, words), dtype=np.uint32)
        qb = to_faiss_bytes(qc, args.bits)
        qj = jax.device_put(qc)
        for k in ks:
            t_flat = _best_time(lambda: index.search(qb, k), args.repeats)
            t_knn = _best_time(lambda: faiss.knn_hamming(qb, x_bytes, k), args.repeats)
            d_ref, _ = index.search(qb, k)
            for path, (corpus, corpus_numpy, layout, select) in paths.items():
                run = lambda: jax.block_until_ready(hamming_topk_xla(qj, corpus, k, args.n, chunk_size=args.chunk_size,
                                                                     layout=layout, select=select))
                run()  # compile
                t_ours = _best_time(run, args.repeats)
                # The public search fed numpy arrays: what a caller pays who does not keep codes on the
                # device (`kernels.dispatch.device_array`: one device_put copy, none for 64-byte-aligned buffers).
                t_numpy = _best_time(
                    lambda: jax.block_until_ready(hamming_topk(qc, corpus_numpy, k, impl="xla", select=select,
                                                               chunk_size=args.chunk_size, layout=layout)),
                    args.repeats)
                for ref_name, t_ref in (("IndexBinaryFlat", t_flat), ("knn_hamming", t_knn)):
                    row = _row(path, ref_name, q, k, args.n, x.nbytes, t_ours, t_ref, bandwidth)
                    row.update(embedjax_numpy_qps=round(q / t_numpy, 2),
                               ratio_numpy_vs_faiss=round(t_ref / t_numpy, 3))
                    rows.append(row)
                d_ours, _ = run()
                if not np.array_equal(np.asarray(d_ours), d_ref):
                    raise AssertionError(f"embedjax ({layout}) and FAISS Hamming distances differ")
        compiled = hamming_topk_xla.lower(qj, xj, ks[0], args.n, chunk_size=args.chunk_size).compile()
        memory[q] = compiled.memory_analysis().temp_size_in_bytes
    return rows, memory


def _float_cells(args, rng, qs, ks, bandwidth, kind):
    import faiss
    import jax

    from embedjax.index.code_index import CodeIndex

    x = rng.standard_normal((args.n, args.dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    if kind == "float":
        ours = CodeIndex(kind="float32", dim=args.dim, codes=x)
        ref = faiss.IndexFlatIP(args.dim)
        ref_name, nbytes = "IndexFlatIP", x.nbytes
    else:
        ours = CodeIndex.build(x, "int8")
        ref = faiss.IndexScalarQuantizer(args.dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        ref.train(x)
        ref_name, nbytes = "IndexScalarQuantizer SQ8", ours.codes.nbytes
    ref.add(x)
    ours.codes = jax.device_put(ours.codes)
    rows = []
    for q in qs:
        qv = rng.standard_normal((q, args.dim)).astype(np.float32)
        qv /= np.linalg.norm(qv, axis=1, keepdims=True)
        for k in ks:
            run = lambda: jax.block_until_ready(ours.search(qv, k, impl="xla", chunk_size=args.chunk_size))
            run()
            t_ours = _best_time(run, args.repeats)
            t_ref = _best_time(lambda: ref.search(qv, k), args.repeats)
            rows.append(_row(kind, ref_name, q, k, args.n, nbytes, t_ours, t_ref, bandwidth))
    del x
    return rows


def run(args) -> dict:
    qs = [int(v) for v in args.queries.split(",")]
    ks = [int(v) for v in args.k.split(",")]
    if args.bits % 32:
        raise ValueError(f"--bits must be a multiple of 32; got {args.bits}")
    if max(ks) > args.n:
        raise ValueError(f"k={max(ks)} is larger than --n={args.n}")
    paths = args.paths.split(",")
    if unknown := set(paths) - {"hamming", "float", "int8"}:
        raise ValueError(f"--paths may name hamming, float and int8; got {sorted(unknown)}")
    rng = np.random.default_rng(0)
    started = report.start(args)
    bandwidth = memory_bandwidth_gbs(args.bandwidth_mib << 20)
    device = report.device_description()
    rows, memory = [], {}
    if "hamming" in paths:
        hamming_rows, memory = _hamming_cells(args, rng, qs, ks, bandwidth)
        rows += hamming_rows
    for kind in ("float", "int8"):
        if kind in paths:
            rows += _float_cells(args, rng, qs, ks, bandwidth, kind)
    for row in rows:
        row.update(device=device, copy_bw_GBps=round(bandwidth, 2), chunk_size=args.chunk_size)
    records = report.finish(args, "search", SECTION, rows, started)
    summary = {
        "bench": "search", "device": device, "copy_bw_GBps": round(bandwidth, 2), "n": args.n,
        "hamming_temp_bytes_by_queries": memory,
        "rows": records,
    }
    at64 = [r for r in rows if r["path"] == "hamming" and r["queries"] == 64 and r["reference"] == "knn_hamming"]
    if at64:
        summary["hamming_ratio_vs_knn_hamming_at_64_queries"] = {r["k"]: r["ratio_vs_faiss"] for r in at64}
    return summary


if __name__ == "__main__":
    import json

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    print(json.dumps(run(parser.parse_args())))

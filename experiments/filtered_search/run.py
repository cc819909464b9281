"""Filtered search on MiniLM embeddings: recall@10 vs queries/s per strategy and selectivity, an IVF nprobe
sweep, and FAISS (IndexFlatIP / IndexIVFFlat with an ID selector) on the same data, machine and run.

    python -m embedjax filtered-benchmark --out experiments/filtered_search/dataset   # once (artifacts)
    python experiments/filtered_search/run.py --size smoke        # ~1 h on the loaded 2-core CPU
    python experiments/filtered_search/run.py --size full         # every workload, more repeats (idle machine)
    python experiments/filtered_search/run.py --report            # README tables + plots from results.json

Systems (all 666 queries of a workload per call; embedjax takes per-query filters in one
call, FAISS applies one selector per call, so its queries are grouped by identical filter):

* embedjax exhaustive: ``CodeIndex`` float32 and binary + float32 rescoring (x4), each with
  the in / pre / post / auto filter strategies;
* embedjax IVF: ``IVFIndex`` (nlist 128, spherical k-means) float32 and binary + rescoring,
  filter strategy "in" (the mask inside the probed lists) and "auto", nprobe swept;
* FAISS: ``IndexFlatIP`` and ``IndexIVFFlat`` (nlist 128, inner product) with
  ``IDSelectorBitmap`` in ``SearchParameters``, nprobe swept.

Timing: for every configuration embedjax and FAISS runs alternate (one warm-up each, then
``repeats`` interleaved timed runs), the median is kept, and the 1-minute load average is
recorded beside it (on 2 cores a load near 2 means the run had the machine to itself; read
rows with a higher load as provisional). Recall figures do not depend on load.

Recall@10 (``data.filtered_benchmark.recall_at_k``): a returned row counts when its exact
score reaches the exact filtered 10th score (ties count either way); every returned row
is checked to pass its query's filter (a violation aborts the run).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
K = 10
NLIST = 128
SIZES = {
    "smoke": dict(workloads=("none", "source_same", "tenant_1pct", "tenant_10pct", "tenant_50pct", "range_1pct",
                            "tenant_1pct_and_range_10pct"),
                  nprobe=(1, 2, 4, 8, 16, 32, 128), repeats=3),
    "full": dict(workloads=None, nprobe=(1, 2, 4, 8, 16, 32, 64, 128), repeats=7),
}


def _commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()
    return out.stdout.strip() + ("+dirty" if dirty else "")


def interleaved_medians(runs: dict, repeats: int) -> dict:
    """Median seconds of each callable, timed in alternation (warm-up first), with the load average."""
    for fn in runs.values():
        fn()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    load = os.getloadavg()[0]
    return {name: (float(np.median(t)), load) for name, t in times.items()}


class FaissRunner:
    """FAISS search of a workload: one call per distinct filter, with an IDSelectorBitmap."""

    def __init__(self, index, masks_qn, nprobe=None):
        import faiss

        self.faiss, self.index, self.nprobe = faiss, index, nprobe
        keys = np.packbits(masks_qn, axis=1, bitorder="little")
        uniq, self.group = np.unique(keys, axis=0, return_inverse=True)
        self.group = self.group.reshape(-1)
        self.bitmaps = [np.ascontiguousarray(u) for u in uniq]  # kept alive: the selectors point into them
        self.all_pass = masks_qn.all()
        self.selectors = [faiss.IDSelectorBitmap(masks_qn.shape[1], faiss.swig_ptr(b)) for b in self.bitmaps]

    def params(self, sel):
        if self.nprobe is None:
            return self.faiss.SearchParameters(sel=sel)
        return self.faiss.SearchParametersIVF(sel=sel, nprobe=self.nprobe)

    def __call__(self, q):
        ids = np.full((q.shape[0], K), -1, np.int64)
        if self.all_pass:
            params = None if self.nprobe is None else self.faiss.SearchParametersIVF(nprobe=self.nprobe)
            return self.index.search(q, K, params=params)[1]
        for g, sel in enumerate(self.selectors):
            rows = np.flatnonzero(self.group == g)
            ids[rows] = self.index.search(q[rows], K, params=self.params(sel))[1]
        return ids


def measure(args) -> dict:
    import faiss

    import embedjax
    from embedjax.data import filtered_benchmark as fb
    from embedjax.index import CodeIndex
    from embedjax.index.ivf import IVFIndex

    size = SIZES[args.size]
    bench = fb.load(args.dataset)
    docs, queries = fb.load_embeddings(bench, args.data_dir, args.cache_dir)
    workloads = args.workloads or size["workloads"] or tuple(bench.manifest["workloads"])
    unknown = sorted(set(workloads) - set(bench.manifest["workloads"]))
    if unknown:
        raise ValueError(f"unknown workloads {unknown}; the dataset has {sorted(bench.manifest['workloads'])}")
    repeats = args.repeats or size["repeats"]
    faiss.omp_set_num_threads(os.cpu_count())
    print(f"building indexes ({docs.shape[0]} x {docs.shape[1]})", file=sys.stderr, flush=True)
    flat = {"float32": CodeIndex.build(docs, "float32"), "binary+rescore": CodeIndex.build(docs, "binary",
                                                                                           rescore="float32")}
    ivf = {"float32": IVFIndex.build(docs, NLIST, "float32", seed=0),
           "binary+rescore": IVFIndex.build(docs, NLIST, "binary", rescore="float32", seed=0)}
    faiss_flat = faiss.IndexFlatIP(docs.shape[1])
    faiss_flat.add(docs)
    quantizer = faiss.IndexFlatIP(docs.shape[1])
    faiss_ivf = faiss.IndexIVFFlat(quantizer, docs.shape[1], NLIST, faiss.METRIC_INNER_PRODUCT)
    faiss_ivf.train(docs)
    faiss_ivf.add(docs)
    rows = []

    def record(system, index, strategy, workload, nprobe, ids, seconds, load, masks, sel):
        ids = np.asarray(ids)
        found = ids[:, :K]
        fails = (found >= 0) & ~np.take_along_axis(masks, np.maximum(found, 0), 1)
        if fails.any():
            raise AssertionError(f"{system} {index} {strategy} {workload}: {int(fails.sum())} returned rows fail "
                                 "their filter")
        recall = fb.recall_at_k(found, bench.gt_ids[workload], bench.gt_scores[workload], queries, docs, K)
        row = {"system": system, "index": index, "strategy": strategy, "workload": workload,
               "selectivity_pct": round(100 * sel, 3), "nprobe": nprobe,
               "recall@10": round(float(np.nanmean(recall)), 4), "queries_per_s": round(queries.shape[0] / seconds, 2),
               "seconds": round(seconds, 4), "load_1min": round(load, 2)}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    for workload in workloads:
        flt = bench.filters[workload]
        masks = bench.masks(workload)
        sel = float(masks.mean())
        none = workload == "none"
        f_kw = {} if none else {"filter": flt}
        results = {}

        def run(key, fn):
            def call():  # np.asarray: the call ends when the search has (JAX dispatches asynchronously)
                results[key] = np.asarray(fn())
            return call

        # Exhaustive: embedjax strategies and FAISS flat, interleaved.
        runs = {("faiss", "flat", "selector"): run("faiss_flat", lambda: FaissRunner(faiss_flat, masks)(queries))}
        for kind, index in flat.items():
            for strategy in (("in",) if none else ("in", "pre", "post", "auto")):
                runs[("embedjax", f"flat {kind}", strategy)] = run(
                    (kind, strategy), lambda index=index, strategy=strategy: index.search(
                        queries, K, filter_strategy=strategy, **f_kw)[1])
        timed = interleaved_medians(runs, repeats)
        for (system, index_name, strategy), (seconds, load) in timed.items():
            key = "faiss_flat" if system == "faiss" else (index_name.split(" ", 1)[1], strategy)
            record(system, index_name, strategy if not none else "none", workload, None, results[key], seconds, load,
                   masks, sel)

        # IVF: nprobe sweep, embedjax "in" / "auto" and FAISS IVFFlat with the selector, interleaved per nprobe.
        for nprobe in size["nprobe"]:
            runner = FaissRunner(faiss_ivf, masks, nprobe=nprobe)
            runs = {("faiss", "ivf float32", "selector"): run("faiss_ivf", lambda: runner(queries))}
            for kind, index in ivf.items():
                for strategy in (("in",) if none else ("in", "auto")):
                    runs[("embedjax", f"ivf {kind}", strategy)] = run(
                        (kind, strategy), lambda index=index, strategy=strategy: index.search(
                            queries, K, nprobe=nprobe, filter_strategy=strategy, **f_kw)[1])
            timed = interleaved_medians(runs, repeats)
            for (system, index_name, strategy), (seconds, load) in timed.items():
                key = "faiss_ivf" if system == "faiss" else (index_name.split(" ", 1)[1], strategy)
                record(system, index_name, strategy if not none else "none", workload, nprobe, results[key], seconds,
                       load, masks, sel)

    return {
        "command": " ".join(["python", "experiments/filtered_search/run.py"] + (args.argv or [])),
        "commit": _commit(), "size": args.size, "repeats": repeats, "k": K, "nlist": NLIST,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": __import__("jax").__version__,
                    "faiss": faiss.__version__, "embedjax": embedjax.__version__,
                    "note": "rates are comparable where each row's load_1min is near the core count (an idle machine)"},
        "dataset": {"documents": int(docs.shape[0]), "queries": int(queries.shape[0]),
                    "embeddings_sha256": bench.manifest["embeddings_sha256"]},
        "ivf": {kind: {"blocks": int(index.block_ids.shape[0]), "block_rows": int(index.block_ids.shape[1]),
                       "padding_fraction": round(index.padding_fraction(), 4)}
                for kind, index in ivf.items()},
        "rows": rows,
        "matched_recall": matched_recall(rows), "best_at_recall": best_at_recall(rows),
    }


RECALL_TARGETS = (0.8, 0.9, 0.95, 0.99)


def fastest_reaching(rows, workload: str, target: float, group, eligible=lambda r: True) -> dict:
    """``{group(row): index}``: per group, the index of the fastest eligible row of ``workload`` whose
    recall@10 reaches ``target`` (the earlier row on a tie)."""
    best = {}
    for i, r in enumerate(rows):
        if r["workload"] != workload or r["recall@10"] < target or not eligible(r):
            continue
        key = group(r)
        if key not in best or r["queries_per_s"] > rows[best[key]]["queries_per_s"]:
            best[key] = i
    return best


def matched_recall(rows, targets=RECALL_TARGETS) -> list:
    """Per workload and target: the fastest configuration of each IVF system reaching the target recall, and the
    ratio of embedjax's rate to FAISS IVFFlat's (both measured in the same run)."""
    out = []
    for workload in sorted({r["workload"] for r in rows}):
        for target in targets:
            best = {key: rows[i] for key, i in fastest_reaching(
                rows, workload, target, group=lambda r: (r["system"], r["index"], r["strategy"]),
                eligible=lambda r: r["nprobe"] is not None).items()}
            # FAISS's row is "selector" under a filter, "none" on the unfiltered workload
            faiss_row = best.get(("faiss", "ivf float32", "selector")) or best.get(("faiss", "ivf float32", "none"))
            for (system, index, strategy), r in sorted(best.items()):
                if system != "embedjax":
                    continue
                out.append({"workload": workload, "target_recall": target, "index": index, "strategy": strategy,
                            "nprobe": r["nprobe"], "recall@10": r["recall@10"], "queries_per_s": r["queries_per_s"],
                            "faiss_nprobe": None if faiss_row is None else faiss_row["nprobe"],
                            "faiss_recall@10": None if faiss_row is None else faiss_row["recall@10"],
                            "faiss_queries_per_s": None if faiss_row is None else faiss_row["queries_per_s"],
                            "ratio_vs_faiss": None if faiss_row is None else
                            round(r["queries_per_s"] / faiss_row["queries_per_s"], 3),
                            "load_1min": r["load_1min"]})
    return out


def best_at_recall(rows, targets=RECALL_TARGETS) -> list:
    """Per workload and target: each library's fastest configuration of any kind (exhaustive or IVF, any
    strategy and nprobe) reaching the target recall@10, and the ratio of their rates: the question a
    user with this corpus asks ("which library answers fastest at this recall?")."""
    def entry(i):
        r = rows[i]
        configuration = f"{r['index']} {r['strategy']}" + ("" if r["nprobe"] is None else f" nprobe {r['nprobe']}")
        return {"row": i, "configuration": configuration, "recall@10": r["recall@10"],
                "queries_per_s": r["queries_per_s"], "load_1min": r["load_1min"]}

    out = []
    for workload in sorted({r["workload"] for r in rows}):
        for target in targets:
            best = fastest_reaching(rows, workload, target, group=lambda r: r["system"])
            if {"embedjax", "faiss"} <= set(best):
                e, f = entry(best["embedjax"]), entry(best["faiss"])
                out.append({"workload": workload, "target_recall": target, "embedjax": e, "faiss": f,
                            "ratio_vs_faiss": round(e["queries_per_s"] / f["queries_per_s"], 3)})
    return out


def from_log(args) -> dict:
    """results.json from the rows a measuring run printed to stderr (one JSON object per line), for a run that
    was stopped before it wrote results.json: the rows of every workload it finished, the rest listed missing."""
    size = SIZES[args.size]
    lines = [line for path in args.from_log for line in pathlib.Path(path).read_text().splitlines()]
    rows = [json.loads(line) for line in lines if line.startswith('{"system"')]
    if not rows:
        raise ValueError(f"{args.from_log} holds no result rows (lines starting with {{\"system\"); pass the stderr "
                         "of a measuring run")
    planned = size["workloads"] or sorted({r["workload"] for r in rows})
    per_workload = 3 + 3 * len(size["nprobe"])  # rows of the unfiltered workload: flat faiss + 2, ivf 3 per nprobe
    expected = {w: per_workload if w == "none" else 9 + 5 * len(size["nprobe"]) for w in planned}
    finished = [w for w in planned if sum(r["workload"] == w for r in rows) == expected[w]]
    rows = [r for r in rows if r["workload"] in finished]
    import jax
    return {
        "command": " ".join(["python", "experiments/filtered_search/run.py"] + args.argv),
        "measured_by": args.measured_by, "commit": _commit(), "size": args.size, "repeats": args.repeats, "k": K,
        "nlist": NLIST, "complete": len(finished) == len(planned), "workloads": finished,
        "workloads_missing": [w for w in planned if w not in finished],
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__,
                    "note": "rates are comparable where each row's load_1min is near the core count (an idle machine)"},
        "rows": rows, "matched_recall": matched_recall(rows), "best_at_recall": best_at_recall(rows),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="smoke")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--dataset", default=str(HERE / "dataset"))
    parser.add_argument("--data-dir", default=os.environ.get("EMBEDJAX_DATA_DIR", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", default=str(HERE / "results.json"))
    parser.add_argument("--report", action="store_true", help="only regenerate tables and plots from --out")
    parser.add_argument("--workloads", nargs="+", default=None,
                        help="measure only these workloads (e.g. the ones a stopped run did not finish)")
    parser.add_argument("--from-log", nargs="+", default=None,
                        help="build --out from the rows stopped measuring runs printed to stderr (finished workloads; "
                             "several logs: their rows together)")
    parser.add_argument("--measured-by", default=None, help="with --from-log: the command that measured the rows")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    out = pathlib.Path(args.out)
    if args.from_log:
        result = from_log(args)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        os.replace(tmp, out)
    elif not args.report:
        result = measure(args)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        os.replace(tmp, out)
    from report import write_report  # experiments/filtered_search/report.py

    summary = write_report(json.loads(out.read_text()), out.parent)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

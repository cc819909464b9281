"""Multi-vector retrieval experiment (issue 13): MiniLM-ColBERT vs single-vector MiniLM trained the
same way, full MaxSim vs MUVERA FDE candidates + exact re-ranking, CRISP in training and its
post-hoc baselines, recall of FDE candidates against the single-vector heuristic, index bytes.

    python experiments/multivector/run.py --scale smoke   # trains 3 models, evaluates (CPU: ~1.5 h idle)
    python experiments/multivector/run.py --scale full    # accelerator sizes (configs/multivector.py ,full)
    python experiments/multivector/run.py --scale check   # tiny end-to-end run (the runner's test)

Trained runs are skipped when their summary exists (runs/multivector/<variant>). Writes
results.json (every method x evaluation set: metrics, bytes per document, paired permutation
test against full MaxSim), curve.json (recall@100 of the candidates vs their number) and
recall_curve.png here (``--out`` for elsewhere).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "configs"))

SCALES = {
    "smoke": dict(eval_sets="scifact:test,nfcorpus:test,msmarco", muvera=((10, 4, 8), (20, 5, 16), (20, 5, 32)),
                  counts=(10, 20, 50, 100, 200, 500, 1000), rerank=100, crisp_q=8, crisp_d=32, tail_keep=32,
                  every=2, max_docs=0, max_queries=0),
    "full": dict(eval_sets="scifact:test,nfcorpus:test,msmarco", muvera=((10, 4, 8), (20, 5, 16), (20, 5, 32),
                                                                          (40, 6, 16)),
                 counts=(10, 20, 50, 100, 200, 500, 1000, 2000), rerank=100, crisp_q=8, crisp_d=32, tail_keep=32,
                 every=2, max_docs=0, max_queries=0),
    "check": dict(eval_sets="scifact:test", muvera=((2, 2, 8),), counts=(5, 10, 20), rerank=10, crisp_q=2,
                  crisp_d=4, tail_keep=4, every=2, max_docs=60, max_queries=8),
}
VARIANTS = {"smoke": ("colbert", "single", "crisp"), "full": ("colbert", "single", "crisp"), "check": ("check",)}
K_VALUES = (10, 100)


def trained_export(variant: str, scale: str, runs: pathlib.Path) -> str:
    """The export folder of a trained variant: trained now unless its summary says completed; an
    interrupted run resumes from its last checkpoint (the loop restores it), so sittings add up."""
    import multivector as configs

    from embedjax.train.loop import train

    workdir = runs / variant
    summary_path = workdir / "summary.json"
    if not summary_path.is_file() or json.loads(summary_path.read_text()).get("status") != "completed":
        arg = variant if scale in ("smoke", "check") else f"{variant},full"
        train(configs.get_config(arg), workdir)
    summary = json.loads(summary_path.read_text())
    if summary.get("status") != "completed":
        raise RuntimeError(f"{workdir} did not complete ({summary.get('status')}); rerun to resume it")
    return summary["export"]


def load_eval_set(spec, max_docs: int, max_queries: int):
    """(name, sorted doc ids, doc texts, judged query ids, query texts, qrels) of one BEIR set; docs
    in the library's tie order (`eval.metrics.tie_order`)."""
    from embedjax.data.builders import resolve_source
    from embedjax.data.readers import read_beir
    from embedjax.eval.metrics import tie_order
    from embedjax.eval.retrieval import document_text

    corpus, queries, qrels = read_beir(resolve_source(spec.path), split=spec.split)
    judged = [q for q in queries if any(g > 0 for g in qrels.get(q, {}).values())]
    if max_queries:
        judged = judged[:max_queries]
    doc_ids = list(corpus)
    if max_docs:  # keep the judged documents, then fill up (check scale only)
        relevant = {d for q in judged for d, g in qrels[q].items() if g > 0 and d in corpus}
        doc_ids = sorted(relevant) + [d for d in doc_ids if d not in relevant][: max(0, max_docs - len(relevant))]
    doc_ids = [doc_ids[j] for j in tie_order(doc_ids)]
    return (spec.name, doc_ids, [document_text(corpus[d]) for d in doc_ids], judged, [queries[q] for q in judged],
            {q: qrels[q] for q in judged})


def run_metrics(ids_qk, scores_qk, judged, doc_ids, qrels) -> dict:
    from embedjax.eval.metrics import retrieval_metrics

    run = {q: {doc_ids[j]: float(s) for s, j in zip(scores_qk[i], ids_qk[i]) if j >= 0} for i, q in enumerate(judged)}
    return retrieval_metrics(run, qrels, K_VALUES, per_query=True)


def single_token_heuristic(q_tok, q_mask, d_tok, d_mask, depth: int, chunk: int = 64):
    """The single-vector heuristic's candidate order [Q, depth]: documents by their best single
    (query token, document token) similarity, ties to the smaller index."""
    import jax.numpy as jnp

    best = []
    for start in range(0, len(d_tok), chunk):
        sims = jnp.einsum("qad,nbd->qnab", q_tok, d_tok[start:start + chunk])
        sims = jnp.where(q_mask[:, None, :, None] & d_mask[None, start:start + chunk, None, :], sims, -jnp.inf)
        best.append(np.asarray(jnp.max(sims, axis=(2, 3))))
    scores = np.concatenate(best, axis=1)
    return np.argsort(-scores, axis=1, kind="stable")[:, :depth]


def recall_at_100(candidates_qn, exact_ids_q100, counts) -> dict:
    exact = [set(row[row >= 0].tolist()) for row in exact_ids_q100]
    return {int(n): float(np.mean([len(e & set(c[:n].tolist())) / max(len(e), 1)
                                   for e, c in zip(exact, candidates_qn)])) for n in counts}


def evaluate_set(spec, encoders: dict, s: dict) -> tuple[list[dict], dict]:
    """Every method on one evaluation set: rows (metrics, bytes, per-query nDCG@10) and the curves."""
    from embedjax.eval.retrieval import search
    from embedjax.multivector import MultiVectorIndex, cluster_tokens, k_spacing, tail_prune
    from embedjax.multivector.evaluation import maxsim_search

    name, doc_ids, docs, judged, queries, qrels = load_eval_set(spec, s["max_docs"], s["max_queries"])
    depth = min(100, len(doc_ids))
    rows, curves = [], {}

    def add(method, ids, scores, bytes_per_doc, **extra):
        m = run_metrics(ids, scores, judged, doc_ids, qrels)
        per_query = m.pop("per_query")["ndcg@10"]
        rows.append({"eval_set": name, "method": method, **m, "bytes_per_doc": float(bytes_per_doc),
                     "per_query_ndcg@10": [per_query[q] for q in judged], **extra})

    colbert = encoders.get("colbert") or encoders["check"]
    q_tok, q_mask = colbert.encode_query(queries, show_progress=True)
    d_tok, d_mask = colbert.encode_document(docs, show_progress=True)
    dim = d_tok.shape[2]
    tokens_per_doc = float(d_mask.sum(1).mean())
    scores, exact_ids = maxsim_search(q_tok, q_mask, d_tok, d_mask, depth)
    add("ColBERT, full MaxSim", exact_ids, scores, tokens_per_doc * dim * 4, tokens_per_doc=tokens_per_doc)
    if "single" in encoders:
        q_emb = encoders["single"].encode(queries, show_progress=True)
        d_emb = encoders["single"].encode(docs, show_progress=True)
        scores, ids = search(q_emb, d_emb, depth)
        add("single vector", ids, scores, d_emb.shape[1] * 4)
    top = max(s["counts"])
    curves["single-vector heuristic"] = recall_at_100(
        single_token_heuristic(q_tok, q_mask, d_tok, d_mask, min(top, len(doc_ids))), exact_ids, s["counts"])
    for reps, k_sim, d_proj in s["muvera"]:
        label = f"MUVERA ({reps}, {k_sim}, {d_proj})"
        index = MultiVectorIndex.build(d_tok, d_mask, reps=reps, k_sim=k_sim, d_proj=d_proj, quantization="int8")
        candidates = min(s["rerank"], len(doc_ids))
        scores, ids = index.search(q_tok, q_mask, depth, candidates=max(candidates, depth))
        sizes = index.nbytes_per_document()
        add(f"{label} int8 + MaxSim re-rank of {candidates}", ids, scores, sizes["fde"] + sizes["tokens"],
            fde_bytes=sizes["fde"])
        curves[label] = recall_at_100(index.candidates(q_tok, q_mask, min(top, len(doc_ids))), exact_ids, s["counts"])
    if "crisp" in encoders:
        cq, cqm = encoders["crisp"].encode_query(queries, show_progress=True)
        cd, cdm = encoders["crisp"].encode_document(docs, show_progress=True)
        scores, ids = maxsim_search(cq, cqm, cd, cdm, depth)
        add("CRISP (trained)", ids, scores, float(cdm.sum(1).mean()) * dim * 4)
    pq, pqm = cluster_tokens(q_tok, q_mask, s["crisp_q"])
    pd, pdm = cluster_tokens(d_tok, d_mask, s["crisp_d"])
    pq, pqm, pd, pdm = (np.asarray(a) for a in (pq, pqm, pd, pdm))
    scores, ids = maxsim_search(pq, pqm, pd, pdm, depth)
    add(f"clustered after training ({s['crisp_q']}, {s['crisp_d']})", ids, scores, float(pdm.sum(1).mean()) * dim * 4)
    for label, mask in ((f"tail pruning (first {s['tail_keep']})", tail_prune(d_mask, s["tail_keep"])),
                        (f"k-spacing (every {s['every']})", k_spacing(d_mask, s["every"]))):
        mask = np.asarray(mask)
        scores, ids = maxsim_search(q_tok, q_mask, d_tok, mask, depth)
        add(label, ids, scores, float(mask.sum(1).mean()) * dim * 4)
    return rows, curves


def add_significance(rows: list[dict]) -> None:
    """Paired permutation test of each method's per-query nDCG@10 against full MaxSim (same set)."""
    from embedjax.eval.significance import paired_permutation_test

    base = {r["eval_set"]: r for r in rows if r["method"] == "ColBERT, full MaxSim"}
    for r in rows:
        if r["method"] == "ColBERT, full MaxSim":
            continue
        test = paired_permutation_test(base[r["eval_set"]]["per_query_ndcg@10"], r["per_query_ndcg@10"])
        r["delta_vs_maxsim"] = test["mean_difference"]  # method - full MaxSim, nDCG@10 points
        r["p_vs_maxsim"] = test["p_value"]


def plot(curves: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(curves)
    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 4), squeeze=False)
    for ax, name in zip(axes[0], sets):
        for label, curve in curves[name].items():
            ax.plot(list(map(int, curve)), list(curve.values()), marker="o", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("candidates")
        ax.set_ylabel("recall@100 of exact MaxSim")
        ax.set_title(name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_tables(out: pathlib.Path) -> pathlib.Path:
    """``table.md`` from the committed artifacts ``results.json`` and ``curve.json`` (the README's
    tables are copied from it, so every figure links the part of the artifact that holds it)."""
    results = json.loads((out / "results.json").read_text())
    curves = json.loads((out / "curve.json").read_text())["curves"]
    lines = ["| set | method | nDCG@10 | recall@100 | nDCG@10 vs full MaxSim (p) | bytes / document | artifact |",
             "|---|---|---:|---:|---:|---:|---|"]
    for i, r in enumerate(results["rows"]):
        delta = "—" if "delta_vs_maxsim" not in r else f"{r['delta_vs_maxsim']:+.2f} (p {r['p_vs_maxsim']:.3f})"
        lines.append(f"| {r['eval_set']} | {r['method']} | {r['ndcg@10']:.2f} | {r['recall@100']:.2f} | {delta} | "
                     f"{r['bytes_per_doc']:,.0f} | [json](results.json#/rows/{i}) |")
    counts = sorted({int(n) for per_set in curves.values() for c in per_set.values() for n in c})
    lines += ["", "Recall of the exact MaxSim top-100 among the first N candidates:", "",
              "| set | first stage | " + " | ".join(f"N = {n}" for n in counts) + " | artifact |",
              "|---|---|" + "---:|" * len(counts) + "---|"]
    for name, per_set in curves.items():
        for label, curve in per_set.items():
            cells = " | ".join(f"{curve[str(n)]:.3f}" if str(n) in curve else "" for n in counts)
            lines.append(f"| {name} | {label} | {cells} | [json](curve.json#/curves/{name}) |")
    path = out / "table.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None) -> None:
    from embedjax.data.splits import parse_eval_sets
    from embedjax.encoder import Encoder
    from embedjax.provenance import write_artifact

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="smoke")
    parser.add_argument("--runs", default="runs/multivector", help="training workdirs (skipped when finished)")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent), help="where the artifacts go")
    parser.add_argument("--tables-only", action="store_true",
                        help="only rewrite table.md and the plot from the artifacts already in --out")
    args = parser.parse_args(argv)
    s = SCALES[args.scale]
    runs, out = pathlib.Path(args.runs) / args.scale, pathlib.Path(args.out)
    if args.tables_only:
        plot(json.loads((out / "curve.json").read_text())["curves"], out / "recall_curve.png")
        print(json.dumps({"table": str(write_tables(out))}))
        return
    encoders = {v: Encoder.from_pretrained(trained_export(v, args.scale, runs)) for v in VARIANTS[args.scale]}
    rows, curves = [], {}
    for spec in parse_eval_sets(s["eval_sets"]):
        set_rows, curves[spec.name] = evaluate_set(spec, encoders, s)
        rows += set_rows
    add_significance(rows)
    write_artifact(out / "results.json", {"scale": args.scale, "settings": s, "rows": rows})
    write_artifact(out / "curve.json", {"scale": args.scale, "curves": curves})
    plot(curves, out / "recall_curve.png")
    print(json.dumps({"rows": len(rows), "results": str(out / "results.json"), "table": str(write_tables(out))}))


if __name__ == "__main__":
    main()

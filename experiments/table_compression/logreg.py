"""Sanity rows: scikit-learn logistic regression on the same features the tables see.

For each dataset, one-hot encodes the rows the ``hash`` method reads (`embedjax.tables.build("hash",
...).indices`: direct rows for fields that fit, documented hash buckets for the others) at each budget,
plus the full one-hot ids (budget 1), fits ``LogisticRegression`` on the training split and scores the
test split. Writes ``logreg.json``.

    EMBEDJAX_DATA_DIR=../shared/data python experiments/table_compression/logreg.py \\
        --out experiments/table_compression/logreg.json
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

BUDGETS = (1.0, 0.1, 0.01, 0.001)
DATASETS = ("movielens", "frappe")
C = 1.0  # inverse L2 strength: scikit-learn's default, not tuned


def one_hot_rows(method, ids_bf) -> "scipy.sparse.csr_matrix":  # noqa: F821
    """[N, rows of the table] with a 1 at every row an example reads."""
    import scipy.sparse

    idx = np.asarray(method.indices(ids_bf)["embedding"]).reshape(len(ids_bf), -1)
    rows = method.row_tables()[0].rows
    data = np.ones(idx.size, np.float32)
    matrix = scipy.sparse.csr_matrix((data, (np.repeat(np.arange(len(ids_bf)), idx.shape[1]), idx.reshape(-1))),
                                     shape=(len(ids_bf), rows))
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
    from sklearn.linear_model import LogisticRegression

    from embedjax.ctr import metrics
    from embedjax.data.ctr import load_ctr
    from embedjax.tables import BudgetTooSmall, build

    rows = []
    for dataset in DATASETS:
        data = load_ctr(dataset)
        for budget in BUDGETS:
            try:
                method = build("full" if budget == 1.0 else "hash", data.vocab_sizes, 16, budget)
            except BudgetTooSmall as err:
                rows.append({"dataset": dataset, "budget": budget, "features": None, "infeasible": str(err)})
                continue
            x_train, x_test = one_hot_rows(method, data.train["ids"]), one_hot_rows(method, data.test["ids"])
            model = LogisticRegression(C=C, max_iter=2000, solver="lbfgs").fit(x_train, data.train["label"])
            prob = model.predict_proba(x_test)[:, 1]
            row = {"dataset": dataset, "budget": budget, "features": int(x_train.shape[1]),
                   "hashed_fields": sum(not d for d in method.direct_fields()),
                   "test_auc": metrics.auc(data.test["label"], prob),
                   "test_logloss": metrics.log_loss(data.test["label"], prob)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    from embedjax.provenance import write_artifact

    write_artifact(args.out, {"C": C, "rows": rows})


if __name__ == "__main__":
    main()

"""Report of the table-compression sweep: per method and budget, AUC and log loss over 3 seeds, paired
tests against the full table, Unified Embedding's multiplexing against per-field hashing, the best
method per budget, the Pareto front, and the methods a budget is too small for.

    python experiments/table_compression/report.py --runs runs/table_compression \\
        --out experiments/table_compression

Reads ``RUNS/<dataset>/<run>/{summary.json, sweep_run.json, predictions.npz}`` (made by
``python -m embedjax sweep --config configs/ctr_tables.py:all,<dataset>``) and the sanity rows in
``OUT/logreg.json``; writes ``OUT/results.json`` (every figure the README shows, with its command),
``OUT/pareto.png``, and rewrites the README's tables between their ``<!-- report:... -->`` markers.

Paired tests use the same evaluation examples for both systems:
- AUC: `embedjax.eval.significance.paired_bootstrap_auc` on the 3 seeds of each (difference of the
  seed-mean AUCs; examples resampled, the same resample for every seed and system);
- log loss: `paired_permutation_test` on each example's log loss averaged over the 3 seeds.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]
DATASETS = ("movielens", "frappe")
BASELINE = ("full", 1.0)
UE_PAIRS = (("hash", "multiplex"), ("multiprobe", "multiplex"))


def _config_module():
    from embedjax.train.config import load_config_module

    module, _, _ = load_config_module(str(REPO / "configs" / "ctr_tables.py"), prefix="embedjax_report")
    return module


def variant_of(overrides: dict, variants: dict) -> str:
    """The family in configs/ctr_tables.py whose table overrides the run has (and no others)."""
    table = {k: v for k, v in overrides.items() if k.startswith("table.") and k != "table.budget"}
    for name, spec in variants.items():
        if table == spec:
            return name
    raise ValueError(f"run overrides {overrides} match no family of configs/ctr_tables.py")


def load_groups(root: pathlib.Path, variants: dict) -> dict:
    """{(variant, budget): [run, ...] sorted by seed}; each run has its predictions loaded."""
    from embedjax.results import load_runs

    groups: dict = {}
    for run in load_runs(root):
        if run["summary"].get("status") != "completed":
            continue
        key = (variant_of(run["overrides"], variants), float(run["overrides"]["table.budget"]))
        with np.load(run["workdir"] / "predictions.npz") as stored:
            run["prob"], run["label"], run["source_row"] = stored["prob"], stored["label"], stored["source_row"]
        groups.setdefault(key, []).append(run)
    for members in groups.values():
        members.sort(key=lambda r: r["overrides"].get("seed", 0))
    return groups


def _per_example_loss(members) -> np.ndarray:
    from embedjax.ctr.metrics import per_example_log_loss

    return np.mean([per_example_log_loss(r["label"], r["prob"]) for r in members], axis=0)


def paired(members_a, members_b, samples: int) -> dict:
    """AUC (bootstrap) and log loss (permutation) of b against a on the same examples."""
    from embedjax.eval.significance import paired_bootstrap_auc, paired_permutation_test

    for r in members_a[1:] + members_b:
        if not np.array_equal(r["source_row"], members_a[0]["source_row"]):
            raise ValueError(f"run {r['name']} was evaluated on other examples than {members_a[0]['name']}")
    labels = members_a[0]["label"]
    auc = paired_bootstrap_auc(labels, np.stack([r["prob"] for r in members_a]),
                               np.stack([r["prob"] for r in members_b]), num_samples=samples, seed=0)
    ll = paired_permutation_test(_per_example_loss(members_a), _per_example_loss(members_b), num_samples=samples,
                                 seed=0)
    return {"auc_difference": auc["mean_difference"], "auc_ci": [auc["ci_low"], auc["ci_high"]],
            "auc_p": auc["p_value"], "logloss_difference": ll["mean_difference"],
            "logloss_ci": [ll["ci_low"], ll["ci_high"]], "logloss_p": ll["p_value"],
            "seeds": [len(members_a), len(members_b)], "examples": auc["num_queries"]}


def group_row(dataset: str, variant: str, budget: float, members: list) -> dict:
    from embedjax.ctr.metrics import auc, log_loss
    from embedjax.results import mean_std

    aucs = [auc(r["label"], r["prob"]) for r in members]
    losses = [log_loss(r["label"], r["prob"]) for r in members]
    memory = [r["summary"]["memory"] for r in members]
    serve = [m.get("serve_bytes_realised", m["serve_bytes"]) / m["full_bytes"] for m in memory]
    auc_mean, auc_std = mean_std(aucs)
    ll_mean, ll_std = mean_std(losses)
    return {"dataset": dataset, "variant": variant, "budget": budget, "seeds": [r["overrides"].get("seed") for r in members],
            "auc_mean": auc_mean, "auc_std": auc_std, "logloss_mean": ll_mean, "logloss_std": ll_std,
            "serve_fraction": float(np.max(serve)), "serve_bytes": int(max(m.get("serve_bytes_realised", m["serve_bytes"])
                                                                          for m in memory)),
            "train_bytes": int(memory[0]["train_bytes"]), "train_fraction": memory[0]["train_bytes"] / memory[0]["full_bytes"],
            "full_bytes": int(memory[0]["full_bytes"]), "dim": members[0]["summary"]["table"]["dim"],
            "train_seconds_mean": float(np.mean([r["summary"]["train_seconds"] for r in members])),
            "runs": [r["name"] for r in members]}


def pareto_front(rows: list[dict]) -> set[int]:
    """Indices of rows no other row beats on both serving memory (<=) and mean AUC (>=), one strictly."""
    front = set()
    for i, a in enumerate(rows):
        dominated = any((b["serve_fraction"] <= a["serve_fraction"] and b["auc_mean"] >= a["auc_mean"])
                        and (b["serve_fraction"] < a["serve_fraction"] or b["auc_mean"] > a["auc_mean"])
                        for j, b in enumerate(rows) if j != i)
        if not dominated:
            front.add(i)
    return front


def infeasible_rows(dataset: str, variants: dict, budgets, present: set, vocab_sizes, dim: int):
    """-> (budgets a family cannot meet, with the smallest it can; feasible ones with no finished runs)."""
    from embedjax.ctr.config import check_table_options, default_config
    from embedjax.tables import BudgetTooSmall, build

    module = _config_module()
    out, missing = [], []
    for variant, spec in variants.items():
        if variant == "full":
            continue
        for budget in budgets:
            if (variant, budget) in present:
                continue
            c = default_config()
            for key, value in {**spec, "table.budget": budget}.items():
                module._set(c, key, value)
            try:
                build(c.table.method, vocab_sizes, dim, budget, **check_table_options(c))
                missing.append({"dataset": dataset, "variant": variant, "budget": budget})
            except BudgetTooSmall as err:
                reason = str(err)
                smallest = float(reason.split("budget >= ")[1].split(")")[0])
                out.append({"dataset": dataset, "variant": variant, "budget": budget, "smallest_budget": smallest,
                            "reason": reason})
    return out, missing


def analyse(runs_root: pathlib.Path, samples: int) -> dict:
    from tqdm.auto import tqdm

    module = _config_module()
    variants = module.VARIANTS
    rows, comparisons, best, infeasible, missing = [], [], [], [], []
    for dataset in DATASETS:
        groups = load_groups(runs_root / dataset, variants)
        if BASELINE not in groups:
            raise FileNotFoundError(f"{runs_root / dataset} has no completed full-table runs (the baseline)")
        base = groups[BASELINE]
        order = [BASELINE] + sorted((k for k in groups if k != BASELINE),
                                    key=lambda k: (-k[1], list(variants).index(k[0])))
        start = len(rows)
        for key in tqdm(order, desc=f"{dataset}: paired tests against the full table", file=sys.stderr):
            row = group_row(dataset, key[0], key[1], groups[key])
            if key != BASELINE:
                row.update(paired(base, groups[key], samples))
            rows.append(row)
        for i in pareto_front(rows[start:]):
            rows[start + i]["pareto"] = True
        for key in order:
            rows[start + order.index(key)].setdefault("pareto", False)
        for budget in module.BUDGETS:
            for a, b in UE_PAIRS:
                if (a, budget) in groups and (b, budget) in groups:
                    comparisons.append({"dataset": dataset, "budget": budget, "a": a, "b": b,
                                        **paired(groups[(a, budget)], groups[(b, budget)], samples)})
            at_budget = sorted(((k, r) for k, r in zip(order, rows[start:]) if k[1] == budget),
                               key=lambda kr: -kr[1]["auc_mean"])
            if len(at_budget) >= 2:
                (k1, r1), (k2, r2) = at_budget[0], at_budget[1]
                best.append({"dataset": dataset, "budget": budget, "best": k1[0], "best_auc": r1["auc_mean"],
                             "runner_up": k2[0], "runner_up_auc": r2["auc_mean"],
                             **paired(groups[k2], groups[k1], samples)})
        summary = base[0]["summary"]
        too_small, not_run = infeasible_rows(dataset, variants, module.BUDGETS, set(groups), summary["vocab_sizes"],
                                             summary["table"]["dim"])
        infeasible += too_small
        missing += not_run
    return {"rows": rows, "comparisons": comparisons, "best": best, "infeasible": infeasible, "missing": missing}


# ---------------------------------------------------------------- presentation


def _f(x, digits=4):
    return f"{x:.{digits}f}"


def _p(p):
    return f"{p:.2g}" if p >= 0.001 else f"{p:.1e}"


def _signed(x, digits=4):
    return f"{x:+.{digits}f}"


def rows_table(result: dict, dataset: str) -> str:
    lines = ["| method | budget | serving memory / full | AUC (mean ± std) | ΔAUC vs full [95% CI] | p | "
             "log loss (mean ± std) | Δ log loss [95% CI] | p | Pareto | artifact |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|:-:|---|"]
    for i, r in enumerate(result["rows"]):
        if r["dataset"] != dataset:
            continue
        link = f"[json](results.json#/rows/{i})"
        if "auc_difference" in r:
            test = (f"{_signed(r['auc_difference'])} [{_signed(r['auc_ci'][0])}, {_signed(r['auc_ci'][1])}] | "
                    f"{_p(r['auc_p'])} | {_f(r['logloss_mean'])} ± {_f(r['logloss_std'])} | "
                    f"{_signed(r['logloss_difference'])} [{_signed(r['logloss_ci'][0])}, {_signed(r['logloss_ci'][1])}]"
                    f" | {_p(r['logloss_p'])}")
        else:
            test = f"- | - | {_f(r['logloss_mean'])} ± {_f(r['logloss_std'])} | - | -"
        lines.append(f"| {r['variant']} | {r['budget']:g} | {r['serve_fraction']:.3g} | "
                     f"{_f(r['auc_mean'])} ± {_f(r['auc_std'])} | {test} | {'yes' if r['pareto'] else ''} | {link} |")
    return "\n".join(lines)


def comparisons_table(result: dict) -> str:
    lines = ["| dataset | budget | per-field table -> multiplexed | AUC per-field | ΔAUC [95% CI] | p | "
             "Δ log loss | p | artifact |", "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    base = {(r["dataset"], r["variant"], r["budget"]): r for r in result["rows"]}
    for i, c in enumerate(result["comparisons"]):
        a_auc = base[(c["dataset"], c["a"], c["budget"])]["auc_mean"]
        c["auc_a"] = a_auc
        lines.append(f"| {c['dataset']} | {c['budget']:g} | {c['a']} -> {c['b']} | {_f(a_auc)} | "
                     f"{_signed(c['auc_difference'])} [{_signed(c['auc_ci'][0])}, {_signed(c['auc_ci'][1])}] | "
                     f"{_p(c['auc_p'])} | {_signed(c['logloss_difference'])} | {_p(c['logloss_p'])} | "
                     f"[json](results.json#/comparisons/{i}) |")
    return "\n".join(lines)


def best_table(result: dict) -> str:
    lines = ["| dataset | budget | best (AUC) | runner-up (AUC) | ΔAUC [95% CI] | p | artifact |",
             "|---|---:|---|---|---:|---:|---|"]
    for i, b in enumerate(result["best"]):
        lines.append(f"| {b['dataset']} | {b['budget']:g} | {b['best']} ({_f(b['best_auc'])}) | {b['runner_up']} "
                     f"({_f(b['runner_up_auc'])}) | {_signed(b['auc_difference'])} [{_signed(b['auc_ci'][0])}, "
                     f"{_signed(b['auc_ci'][1])}] | {_p(b['auc_p'])} | [json](results.json#/best/{i}) |")
    return "\n".join(lines)


def infeasible_table(result: dict) -> str:
    lines = ["| dataset | method | budget | smallest budget it can meet | artifact |", "|---|---|---:|---:|---|"]
    for i, r in enumerate(result["infeasible"]):
        smallest = f"{r['smallest_budget']:.3g}"
        lines.append(f"| {r['dataset']} | {r['variant']} | {r['budget']:g} | {smallest} | "
                     f"[json](results.json#/infeasible/{i}) |")
    return "\n".join(lines)


def logreg_table(logreg: dict, result: dict) -> str:
    full = {r["dataset"]: r for r in result["rows"] if (r["variant"], r["budget"]) == BASELINE}
    lines = ["| dataset | budget | features (hashed fields) | logistic regression AUC | log loss | artifact |",
             "|---|---:|---:|---:|---:|---|"]
    for i, r in enumerate(logreg["rows"]):
        if r.get("features") is None:
            continue
        lines.append(f"| {r['dataset']} | {r['budget']:g} | {r['features']} ({r['hashed_fields']}) | "
                     f"{_f(r['test_auc'])} | {_f(r['test_logloss'])} | [json](logreg.json#/rows/{i}) |")
    del full
    return "\n".join(lines)


def tuning_table(tuning: dict) -> str:
    lines = ["| dataset | row-table learning rate | epochs | validation AUC | validation log loss | artifact |",
             "|---|---:|---:|---:|---:|---|"]
    for i, r in enumerate(tuning["runs"]):
        lines.append(f"| {r['dataset']} | {r['sparse_learning_rate']:g} | {r['epochs']} | {_f(r['validation_auc'])} | "
                     f"{_f(r['validation_logloss'])} | [json](tuning.json#/runs/{i}) |")
    return "\n".join(lines)


def pareto_plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DATASETS), figsize=(6.2 * len(DATASETS), 4.6))
    for ax, dataset in zip(np.atleast_1d(axes), DATASETS):
        rows = [r for r in result["rows"] if r["dataset"] == dataset]
        names = list(dict.fromkeys(r["variant"] for r in rows))
        cmap = plt.get_cmap("tab20")
        for k, name in enumerate(names):
            pts = sorted((r["serve_fraction"], r["auc_mean"], r["auc_std"]) for r in rows if r["variant"] == name)
            x, y, e = zip(*pts)
            marker = "*" if name == "full" else "o"
            ax.errorbar(x, y, yerr=e, marker=marker, ms=11 if name == "full" else 5, lw=1, capsize=2,
                        color=cmap(k % 20), label=name)
        front = sorted((r["serve_fraction"], r["auc_mean"]) for r in rows if r["pareto"])
        ax.plot(*zip(*front), color="black", lw=2.2, alpha=0.35, zorder=0, label="Pareto front")
        ax.set_xscale("log")
        ax.set_xlabel("serving memory / full table (log)")
        ax.set_ylabel("test AUC (mean ± std, 3 seeds)")
        ax.set_title(f"{dataset}: AUC vs memory budget")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[-1].legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replace_block(text: str, name: str, body: str) -> str:
    start, end = f"<!-- report:{name} -->", f"<!-- /report:{name} -->"
    if start not in text or end not in text:
        raise ValueError(f"README has no {start} ... {end} block")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", default="runs/table_compression")
    parser.add_argument("--out", default="experiments/table_compression")
    parser.add_argument("--samples", type=int, default=1000, help="bootstrap / permutation samples per test")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from embedjax.provenance import write_artifact

    out = pathlib.Path(args.out)
    runs_commit = pathlib.Path(args.runs, "COMMIT")
    result = {"samples": args.samples,
              "runs_commit": runs_commit.read_text().strip() if runs_commit.is_file() else None,
              **analyse(pathlib.Path(args.runs), args.samples)}
    logreg = json.loads((out / "logreg.json").read_text())
    readme = out / "README.md"
    text = readme.read_text()
    for dataset in DATASETS:
        text = replace_block(text, f"rows-{dataset}", rows_table(result, dataset))
    text = replace_block(text, "multiplexing", comparisons_table(result))
    text = replace_block(text, "best", best_table(result))
    text = replace_block(text, "infeasible", infeasible_table(result))
    text = replace_block(text, "logreg", logreg_table(logreg, result))
    text = replace_block(text, "tuning", tuning_table(json.loads((out / "tuning.json").read_text())))
    write_artifact(out / "results.json", result)
    pareto_plot(result, out / "pareto.png")
    tmp = out / ".README.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, readme)
    if result["missing"]:
        print(f"warning: {len(result['missing'])} feasible (family, budget) pairs have no finished runs: "
              f"{result['missing']}", file=sys.stderr)
    print(json.dumps({"command": "report", "rows": len(result["rows"]), "comparisons": len(result["comparisons"]),
                      "missing": len(result["missing"]),
                      "results": str(out / "results.json"), "plot": str(out / "pareto.png")}))


if __name__ == "__main__":
    main()

"""``python -m embedjax results ROOT``: one table of a sweep's runs, mean +- std over seeds, and paired tests.

Reads every run folder under ROOT (``ROOT/<run>/summary.json``; the run's overrides
from ``sweep_run.json`` written by `embedjax.sweep`, else from the differences between
the runs' ``config.json``), groups runs that differ only in ``seed``, and reports:

- ``results.md`` / ``results.csv``: per group, every selected metric as mean +- std
  (sample std, ddof=1) over its seeds;
- ``significance.md`` / ``significance.csv``: per ablation axis (a set of override keys
  that always change together), each non-baseline value against the baseline value
  (the value in the sweep's first run) with every other axis held fixed: a paired
  test on per-query scores (each query's score averaged over seeds first), with the
  p-value, Cohen's d_z effect size and a 95% bootstrap interval of the difference
  (`embedjax.eval.significance`).

Per-query scores come from ``ROOT/<run>/per_query.json`` =
``{"<set>/<metric>": {query_id: score x100}}`` (``"<set>/dim=<d>/<metric>"`` for a
Matryoshka truncation) and from the run's own final evaluation
(``evals/step_<N>.per_query.json``, written by the train loop). When a run lacks the
requested keys, they are computed from the run's exported model (``summary["export"]``)
on the BEIR sets (``--beir scifact:test,msmarco``, default: the run's ``eval.beir``) and
cached into ``per_query.json``. A run is never scored on data it trained on: the leak
check of `embedjax.data.splits` runs against each run's ``data.train`` first (unless that
run set ``data.allow_eval_overlap``).

`before_after` tests a single training run's final evaluation against its evaluation at
step 0 (the model it started from), query by query.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import pathlib
from typing import Mapping, Sequence

import numpy as np

PER_QUERY_FILE = "per_query.json"
SEED_KEY = "seed"
NOT_AXES = {"distributed.coordinator", "distributed.num_processes", "distributed.process_id", "export.dir"}


# ---------------------------------------------------------------- reading runs


def _flatten(tree: Mapping, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return out


def _freeze(value):
    return tuple(_freeze(v) for v in value) if isinstance(value, (list, tuple)) else value


def load_runs(root: str | os.PathLike) -> list[dict]:
    """Run folders under ``root`` with a summary, in sweep order (``sweep.json``), else by name.

    Each run: ``{"name", "workdir", "summary", "config" (flat), "overrides"}``.
    """
    root = pathlib.Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"results folder {root} does not exist; pass the --workdir of the sweep")
    runs = []
    for summary_path in sorted(root.glob("*/summary.json")):
        workdir = summary_path.parent
        summary = json.loads(summary_path.read_text())
        config_path = workdir / "config.json"
        config = _flatten(json.loads(config_path.read_text())) if config_path.is_file() else {}
        record = workdir / "sweep_run.json"
        overrides = json.loads(record.read_text())["overrides"] if record.is_file() else None
        runs.append({"name": workdir.name, "workdir": workdir, "summary": summary, "config": config,
                     "overrides": overrides})
    if not runs:
        raise FileNotFoundError(f"no run under {root} has a summary.json; run the sweep first "
                                "(python -m embedjax sweep --config FILE --workdir ROOT)")
    manifest = root / "sweep.json"
    if manifest.is_file():
        order = {r["name"]: i for i, r in enumerate(json.loads(manifest.read_text())["runs"])}
        runs.sort(key=lambda r: (order.get(r["name"], len(order)), r["name"]))
    if any(r["overrides"] is None for r in runs):
        _infer_overrides(runs)
    for run in runs:
        run["overrides"] = {k: _freeze(v) for k, v in run["overrides"].items()}
    return runs


def _infer_overrides(runs: list[dict]) -> None:
    """Overrides of runs not made by the sweep: the config keys whose values differ between runs."""
    keys = sorted({k for r in runs for k in r["config"]} - NOT_AXES)
    varying = [k for k in keys if len({repr(r["config"].get(k)) for r in runs}) > 1]
    for run in runs:
        run["overrides"] = {k: run["config"].get(k) for k in varying}


def infer_axes(runs: Sequence[Mapping]) -> list[tuple[str, ...]]:
    """Ablation axes: override keys (except ``seed``) that vary, keys that always change together merged.

    Two keys are one axis when they split the runs into the same groups (e.g. zipped dims and weights).
    """
    keys = []
    for run in runs:
        keys += [k for k in run["overrides"] if k != SEED_KEY and k not in keys]
    partitions: dict = {}
    for key in keys:
        values = [repr(run["overrides"].get(key)) for run in runs]
        if len(set(values)) < 2:
            continue
        labels: dict = {}
        signature = tuple(labels.setdefault(v, len(labels)) for v in values)
        partitions.setdefault(signature, []).append(key)
    return [tuple(group) for group in partitions.values()]


def group_key(run: Mapping, axes: Sequence[tuple[str, ...]]) -> tuple:
    """The run's value on every axis (its configuration without the seed)."""
    return tuple(tuple(run["overrides"].get(k) for k in axis) for axis in axes)


def format_axis_value(value: tuple) -> str:
    def one(v):
        if isinstance(v, tuple):
            return "(" + ",".join(one(x) for x in v) + ")" if v else "()"
        return str(v)

    return "/".join(one(v) for v in value)


def axis_label(axis: tuple[str, ...]) -> str:
    return "+".join(axis)


# ---------------------------------------------------------------- per-query scores


def _read_json(path: pathlib.Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _read_per_query(workdir: pathlib.Path, final_step: int | None = None) -> dict:
    """``per_query.json``, over the per-query scores of the run's evaluation at ``final_step`` (if any)."""
    evaluated = _read_json(workdir / "evals" / f"step_{final_step}.per_query.json") if final_step is not None else {}
    return {**evaluated, **_read_json(workdir / PER_QUERY_FILE)}


BASE_SETTING = (None, None)  # full dimension, float32 search


def per_query_key(set_name: str, metric: str, dims: int | None, quantization: str | None = None) -> str:
    """``SET/[dim=D/][q=QUANT/]METRIC``: where a per-query score table is stored."""
    parts = [set_name] + ([f"dim={dims}"] if dims is not None else []) + ([f"q={quantization}"] if quantization else [])
    return "/".join(parts + [metric])


def evaluation_settings(dims_list: Sequence[int | None], quantizations: Sequence[str | None]) -> list[tuple]:
    """Every (dims, quantization) pair scored at evaluation; the first is `BASE_SETTING`."""
    return [(d, q) for d in dims_list for q in quantizations]


def score_run(run: Mapping, beir: str, settings: Sequence[tuple], split: str = "test") -> dict:
    """Per-query retrieval metrics of the run's exported model on a BEIR set (cached in per_query.json)."""
    from embedjax.data.builders import resolve_source
    from embedjax.data.readers import read_beir
    from embedjax.eval.retrieval import document_text, retrieval_from_embeddings
    from embedjax.encoder import Encoder

    export = run["summary"].get("export")
    if not export or not pathlib.Path(export).is_dir():
        raise FileNotFoundError(
            f"run {run['name']} has no per-query scores and no exported model to compute them from "
            f"(summary 'export' = {export!r}); train with export.enabled=True, or write {PER_QUERY_FILE}")
    folder = resolve_source(beir)
    set_name = f"{pathlib.Path(beir).name}-{split}"
    corpus, queries, qrels = read_beir(folder, split=split)
    judged = [q for q in queries if any(g > 0 for g in qrels.get(q, {}).values())]
    doc_ids = list(corpus)
    encoder = Encoder.from_pretrained(export)
    q_emb = encoder.encode([queries[q] for q in judged], batch_size=256)
    d_emb = encoder.encode([document_text(corpus[d]) for d in doc_ids], batch_size=256)
    scores = _read_per_query(run["workdir"])
    for dims, quantization in settings:
        metrics = retrieval_from_embeddings(q_emb, d_emb, judged, doc_ids, qrels, (1, 2, 10, 100), dims=dims,
                                            quantization=quantization, per_query=True)
        for metric, table in metrics["per_query"].items():
            scores[per_query_key(set_name, metric, dims, quantization)] = table
    path = run["workdir"] / PER_QUERY_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(scores))
    os.replace(tmp, path)
    return scores


def check_run_disjoint(run: Mapping, eval_sets: Sequence) -> None:
    """Refuse to score a run on a BEIR set it trained on (`embedjax.data.splits`), unless the run allowed it."""
    from embedjax.data.splits import EvaluationLeakError, find_overlaps, parse_train_sources

    train = run["config"].get("data.train")
    if not train or run["config"].get("data.allow_eval_overlap"):
        return
    overlaps = find_overlaps(parse_train_sources(train), [(f"--beir {e.path}:{e.split}", e.ref) for e in eval_sets])
    if overlaps:
        raise EvaluationLeakError(f"run {run['name']} would be scored on data it trained on: " + "; ".join(overlaps)
                                  + ". Score it on other sets (--beir), or retrain on a training split")


def ensure_per_query(runs: list[dict], beir: str | None, settings: Sequence[tuple], metric: str,
                     split: str | None = None, compute: bool = True) -> list[str]:
    """Load (and, where missing, compute) each run's per-query scores; -> the keys every run has for ``metric``.

    ``beir``: sets in the ``eval.beir`` grammar (default: each run's own ``eval.beir``); ``split``: the split of
    entries that name none (default: the folder's only split).
    """
    from embedjax.data.splits import parse_eval_sets

    for run in runs:
        run["per_query"] = _read_per_query(run["workdir"], run["summary"].get("step"))
        eval_sets = parse_eval_sets(beir or run["config"].get("eval.beir") or "", split,
                                    where="--beir" if beir else f"{run['name']} eval.beir")
        check_run_disjoint(run, eval_sets)
        for entry in eval_sets:
            wanted = [per_query_key(entry.name, metric, d, q) for d, q in settings]
            if compute and not all(k in run["per_query"] for k in wanted):
                run["per_query"].update(score_run(run, entry.path, settings, entry.split))
    suffix = "/" + metric
    common = None
    for run in runs:
        keys = {k for k in run["per_query"] if k.endswith(suffix)}
        common = keys if common is None else common & keys
    return sorted(common or [])


# ---------------------------------------------------------------- tables


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1; NaN for a single value)."""
    x = np.asarray(values, dtype=np.float64)
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else float("nan")


def summary_metrics(run: Mapping, patterns: Sequence[str]) -> dict[str, float]:
    """Scalar metrics of a run: final loss, the summary's evaluations, and means of per-query scores."""
    out = {}
    if isinstance(run["summary"].get("final_loss"), (int, float)):
        out["final_loss"] = float(run["summary"]["final_loss"])
    for key, value in (run["summary"].get("eval_after") or {}).items():
        out[key] = float(value)
    for key, table in (run.get("per_query") or {}).items():
        out[key] = float(np.mean(list(table.values())))
    return {k: v for k, v in out.items() if k == "final_loss" or k.rsplit("/", 1)[-1] in patterns}


def results_table(runs: Sequence[Mapping], axes: Sequence[tuple[str, ...]], patterns: Sequence[str]) -> list[dict]:
    """One row per configuration: axis values, seeds, and ``{metric: (mean, std)}``."""
    groups = group_runs(runs, axes)
    rows = []
    for key, members in groups.items():
        per_metric: dict = {}
        for run in members:
            for metric, value in summary_metrics(run, patterns).items():
                per_metric.setdefault(metric, []).append(value)
        rows.append({
            "axes": {axis_label(a): format_axis_value(v) for a, v in zip(axes, key)},
            "seeds": [run["overrides"].get(SEED_KEY, run["config"].get(SEED_KEY)) for run in members],
            "runs": [run["name"] for run in members],
            "metrics": {m: (*mean_std(v), len(v)) for m, v in per_metric.items()},
        })
    return rows


def group_runs(runs: Sequence[Mapping], axes: Sequence[tuple[str, ...]]) -> dict[tuple, list]:
    """Runs by configuration (their axis values; seeds of one configuration share a group), in run order."""
    groups: dict = {}
    for run in runs:
        groups.setdefault(group_key(run, axes), []).append(run)
    return groups


def seed_averaged_scores(members: Sequence[Mapping], key: str) -> dict[str, float]:
    """Per-query score averaged over the group's seeds (queries every seed scored)."""
    tables = [run["per_query"][key] for run in members]
    queries = set(tables[0])
    for table in tables[1:]:
        queries &= set(table)
    return {q: float(np.mean([t[q] for t in tables])) for q in sorted(queries)}


def paired_test_fn(test: str):
    """The paired test named ``test``: "permutation" or "bootstrap" (anything else is an error)."""
    from embedjax.eval.significance import paired_bootstrap_test, paired_permutation_test

    if test not in ("permutation", "bootstrap"):
        raise ValueError(f"test={test!r}: use 'permutation' or 'bootstrap'")
    return paired_permutation_test if test == "permutation" else paired_bootstrap_test


def paired_test(run_test, members_a: Sequence[Mapping], key_a: str, members_b: Sequence[Mapping], key_b: str, *,
                num_samples: int, seed: int) -> dict:
    """``run_test`` on seed-averaged per-query scores (group a under key_a vs group b under key_b)
    over the queries both scored."""
    a = seed_averaged_scores(members_a, key_a)
    b = seed_averaged_scores(members_b, key_b)
    shared = sorted(set(a) & set(b))
    return run_test([a[q] for q in shared], [b[q] for q in shared], num_samples=num_samples, seed=seed)


def significance_table(runs: Sequence[Mapping], axes: Sequence[tuple[str, ...]], keys: Sequence[str], *,
                       test: str = "permutation", num_samples: int = 10_000, seed: int = 0) -> list[dict]:
    """Per axis and per non-baseline value: a paired test against the baseline value, other axes fixed."""
    run_test = paired_test_fn(test)
    groups = group_runs(runs, axes)
    baseline = group_key(runs[0], axes)
    rows = []
    for i, axis in enumerate(axes):
        for key_b, members_b in groups.items():
            if key_b[i] == baseline[i]:
                continue
            key_a = key_b[:i] + (baseline[i],) + key_b[i + 1:]
            if key_a not in groups:
                continue
            context = {axis_label(a): format_axis_value(v) for j, (a, v) in enumerate(zip(axes, key_b)) if j != i}
            for score_key in keys:
                result = paired_test(run_test, groups[key_a], score_key, members_b, score_key,
                                     num_samples=num_samples, seed=seed)
                rows.append({"axis": axis_label(axis), "baseline": format_axis_value(baseline[i]),
                             "value": format_axis_value(key_b[i]), "context": context, "score": score_key,
                             "seeds_a": len(groups[key_a]), "seeds_b": len(members_b), "test": test, **result})
    return rows


def base_key(score_key: str) -> str:
    """The full-dimension float32 key of the same set and metric: ``SET/dim=8/q=int8/M`` -> ``SET/M``."""
    parts = score_key.split("/")
    return "/".join([parts[0]] + [p for p in parts[1:] if not p.startswith(("dim=", "q="))])


def evaluation_significance_table(runs: Sequence[Mapping], axes: Sequence[tuple[str, ...]], keys: Sequence[str], *,
                                  test: str = "permutation", num_samples: int = 10_000, seed: int = 0) -> list[dict]:
    """Per configuration and per compressed/truncated evaluation setting: a paired test against the same
    models searched at full dimension in float32 (what the compression costs, query by query)."""
    run_test = paired_test_fn(test)
    rows = []
    for key, members in group_runs(runs, axes).items():
        context = {axis_label(a): format_axis_value(v) for a, v in zip(axes, key)}
        for score_key in keys:
            reference = base_key(score_key)
            if reference == score_key or reference not in keys:
                continue
            result = paired_test(run_test, members, reference, members, score_key, num_samples=num_samples,
                                 seed=seed)
            setting = "/".join(p for p in score_key.split("/")[1:-1])
            rows.append({"axis": "evaluation", "baseline": "float32, full dim", "value": setting, "context": context,
                         "score": reference, "seeds_a": len(members), "seeds_b": len(members), "test": test, **result})
    return rows


def before_after(workdir: str | os.PathLike, metric: str = "ndcg@10", *, test: str = "permutation",
                 num_samples: int = 10_000, seed: int = 0) -> list[dict]:
    """Per BEIR set: a paired test of a training run's final evaluation against its step-0 evaluation.

    Reads the train loop's ``evals/step_0.per_query.json`` (the starting model; ``eval.at_start=True``)
    and ``evals/step_<final>.per_query.json``; the queries both scored are paired. Each row: ``set``,
    ``score`` (the per-query key), ``step_before``, ``step_after`` and the test's fields (``mean_a`` =
    before, ``mean_b`` = after, ``mean_difference``, ``p_value``, ``ci_low``, ``ci_high``, ...).
    """
    workdir = pathlib.Path(workdir)
    summary = _read_json(workdir / "summary.json")
    if "step" not in summary:
        raise FileNotFoundError(f"{workdir} holds no summary.json of a finished run")
    paths = [workdir / "evals" / f"step_{step}.per_query.json" for step in (0, summary["step"])]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} missing: before/after tests need the run's per-query "
                                "evaluations at step 0 (eval.at_start=True) and at its final step (eval.beir set)")
    before, after = (json.loads(p.read_text()) for p in paths)
    run_test = paired_test_fn(test)
    rows = []
    for key in sorted(k for k in before if k.endswith("/" + metric) and k in after):
        shared = sorted(set(before[key]) & set(after[key]))
        result = run_test([before[key][q] for q in shared], [after[key][q] for q in shared],
                          num_samples=num_samples, seed=seed)
        rows.append({"set": key[: -len(metric) - 1], "score": key, "step_before": 0, "step_after": summary["step"],
                     "test": test, **result})
    return rows


def _cell(mean: float, std: float) -> str:
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def results_markdown(rows: Sequence[Mapping]) -> tuple[str, list[str], list[list[str]]]:
    """-> (Markdown table, CSV header, CSV rows) of `results_table` rows."""
    axis_names = list(rows[0]["axes"]) if rows else []
    metrics = sorted({m for r in rows for m in r["metrics"]}, key=lambda m: (m != "final_loss", m))
    md = ["| " + " | ".join(axis_names + ["seeds"] + metrics) + " |",
          "|" + "---|" * (len(axis_names) + 1 + len(metrics))]
    header = axis_names + ["seeds", "runs"] + [f"{m}{s}" for m in metrics for s in ("_mean", "_std", "_n")]
    csv_rows = []
    for r in rows:
        cells = [r["axes"][a] for a in axis_names] + [str(len(r["seeds"]))]
        cells += [_cell(*r["metrics"][m][:2]) if m in r["metrics"] else "" for m in metrics]
        md.append("| " + " | ".join(cells) + " |")
        row = [r["axes"][a] for a in axis_names] + [str(len(r["seeds"])), ";".join(r["runs"])]
        for m in metrics:
            row += [repr(x) for x in r["metrics"][m]] if m in r["metrics"] else ["", "", ""]
        csv_rows.append(row)
    return "\n".join(md), header, csv_rows


SIG_COLUMNS = ("axis", "baseline", "value", "context", "score", "mean_a", "mean_b", "mean_difference",
               "effect_size", "p_value", "ci_low", "ci_high", "num_queries", "seeds_a", "seeds_b", "test")


def significance_markdown(rows: Sequence[Mapping]) -> tuple[str, list[str], list[list[str]]]:
    md = ["| axis | baseline -> value | held fixed | score | baseline | value | diff [95% CI] | d_z | p | queries |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    csv_rows = []
    for r in rows:
        context = ", ".join(f"{k}={v}" for k, v in r["context"].items()) or "-"
        stars = "**" if r["p_value"] < 0.01 else "*" if r["p_value"] < 0.05 else ""
        md.append(f"| {r['axis']} | {r['baseline']} -> {r['value']} | {context} | {r['score']} | "
                  f"{r['mean_a']:.2f} | {r['mean_b']:.2f} | {r['mean_difference']:+.2f} "
                  f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}] | {r['effect_size']:.3f} | "
                  f"{r['p_value']:.4g}{stars} | {r['num_queries']} |")
        csv_rows.append([context if c == "context" else str(r[c]) for c in SIG_COLUMNS])
    return "\n".join(md), list(SIG_COLUMNS), csv_rows


def _write_csv(path: pathlib.Path, header, rows) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, path)


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", help="the sweep's --workdir (one folder per run)")
    parser.add_argument("--metrics", default="ndcg@10,recall@2,recall@10,spearman_cosine",
                        help="comma-separated metric names (the part after the last '/') shown in the table; "
                             "final_loss always")
    parser.add_argument("--test_metric", default="ndcg@10", help="per-query metric of the significance tests")
    parser.add_argument("--beir", default=None,
                        help="BEIR sets scored per query from each run's export, 'folder[:split],...' "
                             "(default: the runs' eval.beir)")
    parser.add_argument("--split", default=None,
                        help="split of --beir entries that name none (default: the folder's only split)")
    parser.add_argument("--dims", default="", help="comma-separated Matryoshka truncations also scored, e.g. 8,16")
    parser.add_argument("--quantization", default="",
                        help="comma-separated compressed searches also scored (each at every --dims), e.g. "
                             "int8,binary+rescore; each is tested against float32 search of the same models")
    parser.add_argument("--test", default="permutation", choices=("permutation", "bootstrap"))
    parser.add_argument("--samples", type=int, default=10_000, help="permutation / bootstrap samples")
    parser.add_argument("--no_score", action="store_true", help="use stored per-query scores only; compute none")
    parser.add_argument("--out", default=None, help="folder for results.{md,csv} and significance.{md,csv} "
                                                    "(default: ROOT)")


def _parse_dims(text: str) -> list[int | None]:
    dims: list[int | None] = [None]
    for part in filter(None, (p.strip() for p in text.split(","))):
        if not part.isdigit() or int(part) < 1:
            raise ValueError(f"--dims {text!r}: give positive integers separated by commas, e.g. 8,16")
        dims.append(int(part))
    return dims


def _parse_quantizations(text: str) -> list[str | None]:
    """'int8,binary+rescore' -> [None (float32), 'int8', 'binary+rescore']; unknown names are errors."""
    from embedjax.index import check_quantization

    out: list[str | None] = [None]
    for part in filter(None, (p.strip() for p in text.split(","))):
        if part in ("float", "float32", "none"):
            continue
        try:
            check_quantization(part)
        except ValueError as err:
            raise ValueError(f"--quantization: {err}") from None
        out.append(part)
    return out


def main(args) -> dict:
    root = pathlib.Path(args.root)
    out_dir = pathlib.Path(args.out) if args.out else root
    runs = load_runs(root)
    axes = infer_axes(runs)
    settings = evaluation_settings(_parse_dims(args.dims), _parse_quantizations(getattr(args, "quantization", "")))
    patterns = [p.strip() for p in args.metrics.split(",") if p.strip()]
    keys = ensure_per_query(runs, args.beir, settings, args.test_metric, args.split, compute=not args.no_score)
    rows = results_table(runs, axes, patterns)
    sig_rows = significance_table(runs, axes, keys, test=args.test, num_samples=args.samples) if keys else []
    sig_rows += evaluation_significance_table(runs, axes, keys, test=args.test, num_samples=args.samples)
    res_md, res_header, res_csv = results_markdown(rows)
    sig_md, sig_header, sig_csv = significance_markdown(sig_rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(out_dir / "results.csv", res_header, res_csv)
    _write_csv(out_dir / "significance.csv", sig_header, sig_csv)
    axes_text = ", ".join(axis_label(a) for a in axes) or "none (all runs share one configuration)"
    note = (f"Ablation axes: {axes_text}. Baseline: {runs[0]['name']}. Mean ± sample std over seeds; paired "
            f"{args.test} tests ({args.samples} samples) on per-query {args.test_metric} averaged over seeds "
            f"(* p < 0.05, ** p < 0.01); d_z = mean/std of the per-query differences.")
    if not keys:
        note += (f" No per-query {args.test_metric} scores: no significance tests (pass --beir, or let the runs "
                 f"write {PER_QUERY_FILE}).")
    text = f"## Results: {root}\n\n{res_md}\n\n## Paired tests against the baseline\n\n{sig_md}\n\n{note}\n"
    (out_dir / "results.md").write_text(text)
    print(text, flush=True)
    return {"command": "results", "root": str(root), "runs": len(runs), "configurations": len(rows),
            "axes": [axis_label(a) for a in axes], "baseline": runs[0]["name"],
            "results_csv": str(out_dir / "results.csv"), "significance_csv": str(out_dir / "significance.csv"),
            "results_md": str(out_dir / "results.md"),
            "tests": [{k: r[k] for k in ("axis", "value", "context", "score", "mean_difference", "effect_size",
                                          "p_value")} for r in sig_rows]}

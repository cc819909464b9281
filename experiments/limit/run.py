"""LIMIT free-embedding sweep: the largest n whose every top-2 pair is realisable, per dimension d.

Sweep (resumable: a (seed, d) already in the results file is skipped; every search gallops and
then bisects to a bracket of 1, so each seed's critical n has its first failure at n + 1):
    python experiments/limit/run.py sweep --dims 4-20,24,28 --seeds 0,1,2 --results experiments/limit/results.json

Report (per-seed critical n, mean and spread, cubic fit of the seed mean, Markdown table with
artifact links, summary.json, PNG plot; the plot needs matplotlib):
    python experiments/limit/run.py report --results experiments/limit/results.json

Step-budget check (a few n at one d with more patience; one JSON artifact):
    python experiments/limit/run.py patience --d 20 --n 110,116 --patience 5000 --max_steps 20000

The optimisation itself is `embedjax.eval.limit`; this file only chooses where
each search starts, keeps the time budget and writes the outputs.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import platform
import sys
import time

import numpy as np

from embedjax import provenance
from embedjax.eval import limit

HERE = pathlib.Path(__file__).resolve().parent

# Weller et al. (2025), free-embedding experiment (k = 2, d = 4..45), cubic fit of the
# critical n, as recalled from the paper (its extrapolations 512 -> ~500k,
# 1024 -> ~4M documents follow from these coefficients): lowest power first.
PAPER_CUBIC = (-10.5322, 4.0309, 0.0520, 0.0037)


def parse_dims(text: str) -> list[int]:
    """'4-32' -> 4..32, '4-32:2' -> every second, '4,8,16' -> those."""
    dims: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            span, _, step = part.partition(":")
            lo, hi = (int(v) for v in span.split("-"))
            dims.extend(range(lo, hi + 1, int(step) if step else 1))
        elif part:
            dims.append(int(part))
    if not dims or min(dims) < 1:
        raise ValueError(f"--dims must name positive dimensions, e.g. 4-32; got {text!r}")
    return sorted(set(dims))


def next_start(done: dict[int, dict], d: int, other_seeds: list[int] | None = None) -> int:
    """Where to start the search at d: just below the expected critical n.

    If other seeds already searched this d, one below the smallest critical n they found.
    Otherwise, with 5 or more solved dimensions, a quadratic fitted to them (the critical n is
    convex in d) is evaluated at d; before that, the last critical n plus the median of the last
    increments per dimension. Below, because a run that solves stops early while a failed run
    spends its whole step budget. The start only changes which n are tried, not the result.
    """
    if other_seeds:
        return max(min(other_seeds) - 1, 3)
    prev = sorted(x for x in done if x < d)
    if not prev:
        return d + 1
    ns = [done[x]["critical_n"] for x in prev]
    if len(prev) >= 5:
        coeffs = np.polynomial.polynomial.polyfit(prev, ns, 2)
        predicted = float(np.polynomial.polynomial.polyval(d, coeffs))
        return max(int(math.floor(predicted)) - 1, ns[-1], 3)
    if len(prev) == 1:
        return ns[-1] + 1
    slopes = [(ns[i + 1] - ns[i]) / (prev[i + 1] - prev[i]) for i in range(len(prev) - 1)][-3:]
    return max(ns[-1] + int(float(np.median(slopes)) * (d - prev[-1])), 3)


def _git_commit() -> str:
    return provenance.git_commit() + ("+dirty" if provenance.git_dirty() else "")


def _command() -> str:
    return provenance.command_line()


def _write_json_atomic(path: pathlib.Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def _trial_record(t) -> dict:
    return {key: getattr(t, key) for key in
            ("n", "solved", "seed", "steps", "total_steps", "unsolved", "num_queries", "final_loss", "seconds")}


def _optimizer_settings(args) -> dict:
    return {"k": 2, "learning_rate": args.learning_rate, "temperature": args.temperature, "max_steps": args.max_steps,
            "patience": args.patience, "check_every": args.check_every, "restarts": args.restarts}


def sweep(args) -> None:
    path = pathlib.Path(args.results)
    settings = _optimizer_settings(args)
    if path.exists():
        data = json.loads(path.read_text())
        if data["settings"] != settings:
            raise SystemExit(
                f"{path} was made with settings {data['settings']}, not {settings}: pass the same flags or a new --results file"
            )
    else:
        data = {"settings": settings, "machine": platform.processor() or platform.machine(), "seeds": {}}
    data.setdefault("commands", [])
    if _command() not in data["commands"]:
        data["commands"].append(_command())
    data["command"] = data["commands"][0]
    started = time.perf_counter()
    seeds = [int(v) for v in args.seeds.split(",")]
    # Dimension-major: every seed of a d before the next d, so a stopped sweep leaves whole dimensions.
    for d in parse_dims(args.dims):
        for seed in seeds:
            per_seed = data["seeds"].setdefault(str(seed), {"dims": {}})["dims"]
            if str(d) in per_seed:
                continue
            if time.perf_counter() - started > args.time_budget_s:
                print(f"time budget of {args.time_budget_s:.0f}s spent; stopping before d={d} seed={seed}", flush=True)
                return
            done = {int(x): v for x, v in per_seed.items()}
            others = [v["dims"][str(d)]["critical_n"] for s, v in data["seeds"].items()
                      if s != str(seed) and str(d) in v["dims"]]
            t0 = time.perf_counter()
            result = limit.find_critical_n(
                d,
                k=2,
                n_start=next_start(done, d, others),
                learning_rate=args.learning_rate,
                temperature=args.temperature,
                max_steps=args.max_steps,
                patience=args.patience,
                check_every=args.check_every,
                restarts=args.restarts,
                seed=seed,
                initial_step=args.initial_step,
                resolution=1,
            )
            per_seed[str(d)] = {
                "critical_n": result.critical_n,
                "first_failure": result.first_failure,
                "resolution": 1,
                "seconds": time.perf_counter() - t0,
                "commit": _git_commit(),
                "trials": [_trial_record(t) for t in result.trials],
            }
            data["seeds"][str(seed)]["dims"] = {k: per_seed[k] for k in sorted(per_seed, key=int)}
            _write_json_atomic(path, data)
            tried = ", ".join(f"{t.n}{'+' if t.solved else '-'}" for t in result.trials)
            print(f"d={d:3d} seed={seed} critical n={result.critical_n:4d} first failure={result.first_failure} "
                  f"({per_seed[str(d)]['seconds']:.0f}s; tried {tried})", flush=True)


def seed_table(data: dict) -> dict[int, dict[int, dict]]:
    """{d: {seed: that seed's search}} over the dimensions every listed seed finished."""
    table: dict[int, dict[int, dict]] = {}
    for seed, block in data["seeds"].items():
        for d, row in block["dims"].items():
            table.setdefault(int(d), {})[int(seed)] = row
    return dict(sorted(table.items()))


def summarize(data: dict, min_seeds: int) -> dict:
    """Per-d statistics over seeds, the cubic fit of the seed means and its extrapolations."""
    rows = []
    for d, by_seed in seed_table(data).items():
        crit = np.array([by_seed[s]["critical_n"] for s in sorted(by_seed)], dtype=np.float64)
        rows.append({
            "d": d,
            "seeds": sorted(by_seed),
            "critical_n_per_seed": [int(c) for c in crit],
            "first_failure_per_seed": [by_seed[s]["first_failure"] for s in sorted(by_seed)],
            "critical_n_mean": float(crit.mean()),
            "critical_n_std": float(crit.std(ddof=1)) if crit.size > 1 else 0.0,
            "critical_n_max": int(crit.max()),
            "runs": int(sum(len(by_seed[s]["trials"]) for s in by_seed)),
            "seconds": float(sum(by_seed[s]["seconds"] for s in by_seed)),
            "queries_at_max": math.comb(int(crit.max()), 2),
            "paper_cubic_at_d": float(np.polynomial.polynomial.polyval(d, PAPER_CUBIC)),
            "in_fit": len(by_seed) >= min_seeds,
        })
    dims = [r["d"] for r in rows if r["in_fit"]]
    coeffs, r2 = limit.fit_polynomial(dims, [r["critical_n_mean"] for r in rows if r["in_fit"]], degree=3)
    coeffs_max, r2_max = limit.fit_polynomial(dims, [r["critical_n_max"] for r in rows if r["in_fit"]], degree=3)
    polyval = np.polynomial.polynomial.polyval
    extrap = [{"d": d, "ours": float(polyval(d, coeffs)), "ours_best_seed": float(polyval(d, coeffs_max)),
               "paper": float(polyval(d, PAPER_CUBIC))} for d in (64, 128, 512, 1024, 4096)]
    return {"rows": rows, "cubic_fit_of_mean": {"coefficients": coeffs.tolist(), "r2": r2, "dims": dims},
            "cubic_fit_of_max": {"coefficients": coeffs_max.tolist(), "r2": r2_max, "dims": dims},
            "paper_cubic": list(PAPER_CUBIC), "extrapolation": extrap, "settings": data["settings"],
            "sweep_commands": data.get("commands", [])}


def markdown(summary: dict, artifact: str) -> str:
    lines = [
        "| d | seeds | critical n per seed | mean ± std | max | runs | seconds | paper's cubic at d | artifact |",
        "|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for i, r in enumerate(summary["rows"]):
        per_seed = ", ".join(str(c) for c in r["critical_n_per_seed"])
        seeds = ", ".join(str(x) for x in r["seeds"]) + ("" if r["in_fit"] else " (not in the fit)")
        lines.append(f"| {r['d']} | {seeds} | {per_seed} | {r['critical_n_mean']:.1f} ± {r['critical_n_std']:.1f} | "
                     f"{r['critical_n_max']} | {r['runs']} | {r['seconds']:.0f} | {r['paper_cubic_at_d']:.1f} | "
                     f"[json]({artifact}#/rows/{i}) |")
    fit = summary["cubic_fit_of_mean"]
    fmt = lambda c: " + ".join(f"{v:.4g}·d^{i}" if i else f"{v:.4g}" for i, v in enumerate(c))  # noqa: E731
    lines += [
        "",
        f"Cubic fit of the seed means (d = {fit['dims'][0]}..{fit['dims'][-1]}): n(d) = {fmt(fit['coefficients'])}, "
        f"r² = {fit['r2']:.4f}",
        f"Cubic fit of the best seed per d: n(d) = {fmt(summary['cubic_fit_of_max']['coefficients'])}, "
        f"r² = {summary['cubic_fit_of_max']['r2']:.4f}",
        f"Paper's cubic fit: n(d) = {fmt(summary['paper_cubic'])}",
        "",
        "| d | ours extrapolated (seed mean) | ours (best seed) | paper extrapolated | artifact |",
        "|---:|---:|---:|---:|---|",
        *[f"| {e['d']} | {e['ours']:,.0f} | {e['ours_best_seed']:,.0f} | {e['paper']:,.0f} | "
          f"[json]({artifact}#/extrapolation/{i}) |" for i, e in enumerate(summary["extrapolation"])],
    ]
    return "\n".join(lines)


def report(args) -> None:
    data = json.loads(pathlib.Path(args.results).read_text())
    summary = summarize(data, args.min_seeds)
    out = pathlib.Path(args.summary)
    provenance.write_artifact(out, summary)
    table = markdown(summary, out.name)
    (HERE / "table.md").write_text(table + "\n")
    print(table)
    if not args.no_plot:
        _plot(summary, pathlib.Path(args.plot))
    print(json.dumps({"summary": str(out), "dims": summary["cubic_fit_of_mean"]["dims"],
                      "r2": summary["cubic_fit_of_mean"]["r2"]}))


def patience_check(args) -> None:
    """Given n at one d with a larger step budget, then (--bisect) bisection between the largest
    solved and the smallest failed n: how much does the budget move the boundary?"""
    runs = []

    def attempt(n: int) -> bool:
        t = limit.optimize_free_embeddings(n, args.d, learning_rate=args.learning_rate, temperature=args.temperature,
                                           max_steps=args.max_steps, patience=args.patience,
                                           check_every=args.check_every, seed=args.seed)
        runs.append(_trial_record(t))
        print(f"d={args.d} n={n} solved={t.solved} steps={t.steps} unsolved={t.unsolved} ({t.seconds:.0f}s)",
              flush=True)
        return t.solved

    for n in (int(v) for v in args.n.split(",")):
        attempt(n)
    if args.bisect:
        lo = max((r["n"] for r in runs if r["solved"]), default=None)
        hi = min((r["n"] for r in runs if not r["solved"]), default=None)
        if lo is None or hi is None or lo > hi:
            raise SystemExit(f"--bisect needs a solved n below a failed n; got solved {lo}, failed {hi}")
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if attempt(mid) else (lo, mid)
    out = pathlib.Path(args.out)
    solved = [r["n"] for r in runs if r["solved"]]
    failed = [r["n"] for r in runs if not r["solved"]]
    provenance.write_artifact(out, {"d": args.d, "settings": _optimizer_settings(args) | {"seed": args.seed},
                                    "largest_solved": max(solved, default=None),
                                    "smallest_failed": min(failed, default=None), "runs": runs})
    print(json.dumps({"out": str(out), "runs": [(r["n"], r["solved"], r["unsolved"]) for r in runs]}))


def _plot(summary: dict, path: pathlib.Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise SystemExit(f"the plot needs matplotlib ({err}); install it or pass --no_plot") from err
    rows = summary["rows"]
    dims = np.array([r["d"] for r in rows], dtype=np.float64)
    coeffs = summary["cubic_fit_of_mean"]["coefficients"]
    grid = np.linspace(dims.min(), dims.max(), 200)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    fitted = [r for r in rows if r["in_fit"]]
    ax.errorbar([r["d"] for r in fitted], [r["critical_n_mean"] for r in fitted],
                yerr=[r["critical_n_std"] for r in fitted], fmt="o", ms=4, label="critical n, mean ± std over seeds")
    others = [r for r in rows if not r["in_fit"]]
    if others:
        ax.plot([r["d"] for r in others], [r["critical_n_mean"] for r in others], "o", mfc="none", color="C0",
                label="fewer seeds (not in the fit)")
    for r in rows:
        ax.plot([r["d"]] * len(r["critical_n_per_seed"]), r["critical_n_per_seed"], "_", color="0.25", ms=7,
                label="each seed" if r is rows[0] else None)
    ax.plot(grid, np.polynomial.polynomial.polyval(grid, coeffs), "-", label="cubic fit of the means")
    ax.plot(grid, np.polynomial.polynomial.polyval(grid, PAPER_CUBIC), "--", label="cubic fit (Weller et al. 2025)")
    ax.set_xlabel("embedding dimension d")
    ax.set_ylabel("largest n with every top-2 pair realised")
    ax.set_title("LIMIT free-embedding experiment (k = 2)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _add_optimizer_arguments(p) -> None:
    p.add_argument("--learning_rate", type=float, default=0.01)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--max_steps", type=int, default=5000)
    p.add_argument("--patience", type=int, default=1000)
    p.add_argument("--check_every", type=int, default=50)
    p.add_argument("--restarts", type=int, default=1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sweep", help="find the critical n for each (seed, d) (resumable)")
    s.add_argument("--dims", default="4-32")
    s.add_argument("--seeds", default="0,1,2")
    s.add_argument("--results", default=str(HERE / "results.json"))
    _add_optimizer_arguments(s)
    s.add_argument("--time_budget_s", type=float, default=float("inf"), help="start no new search after this many seconds")
    s.add_argument("--initial_step", type=int, default=1, help="first gallop step")
    r = sub.add_parser("report", help="summary.json, table.md and the plot from a results file")
    r.add_argument("--results", default=str(HERE / "results.json"))
    r.add_argument("--summary", default=str(HERE / "summary.json"))
    r.add_argument("--plot", default=str(HERE / "critical_n.png"))
    r.add_argument("--min_seeds", type=int, default=3, help="fit only dimensions with at least this many seeds")
    r.add_argument("--no_plot", action="store_true")
    c = sub.add_parser("patience", help="a few n at one d with a larger step budget")
    c.add_argument("--d", type=int, default=20)
    c.add_argument("--n", default="110,116")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", default=str(HERE / "patience_d20.json"))
    c.add_argument("--bisect", action="store_true", help="then bisect between the largest solved and smallest failed n")
    _add_optimizer_arguments(c)
    c.set_defaults(max_steps=20000, patience=5000)
    args = parser.parse_args(argv)
    {"sweep": sweep, "report": report, "patience": patience_check}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

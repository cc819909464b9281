"""LIMIT free-embedding sweep: the largest n whose every top-2 pair is realisable, per dimension d.

Sweep (resumable: dimensions already in the results file are skipped):
    python experiments/limit/run.py sweep --dims 4-32 --results experiments/limit/results.json

Report (cubic fit, Markdown table, PNG plot; the plot needs matplotlib):
    python experiments/limit/run.py report --results experiments/limit/results.json

The optimisation itself is `embedjax.eval.limit`; this file only chooses where
each search starts, keeps the time budget and writes the outputs.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import platform
import subprocess
import sys
import time

import numpy as np

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


def next_start(done: dict[int, dict], d: int) -> int:
    """Where to start the search at d: just below what the dimensions solved so far predict.

    With 5 or more solved dimensions, a quadratic fitted to them (the critical n is
    convex in d) is evaluated at d; before that, the last critical n plus the median
    of the last increments per dimension. One below the prediction, because a run
    that solves stops early while a failed run spends its whole step budget.
    """
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
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def sweep(args) -> None:
    path = pathlib.Path(args.results)
    settings = {
        "k": 2,
        "learning_rate": args.learning_rate,
        "temperature": args.temperature,
        "max_steps": args.max_steps,
        "patience": args.patience,
        "check_every": args.check_every,
        "restarts": args.restarts,
        "seed": args.seed,
    }
    if path.exists():
        data = json.loads(path.read_text())
        if data["settings"] != settings:
            raise SystemExit(
                f"{path} was made with settings {data['settings']}, not {settings}: pass the same flags or a new --results file"
            )
    else:
        data = {"settings": settings, "machine": platform.processor() or platform.machine(), "dims": {}}
    done = {int(d): v for d, v in data["dims"].items()}
    started = time.perf_counter()
    for d in parse_dims(args.dims):
        if d in done:
            continue
        if time.perf_counter() - started > args.time_budget_s:
            print(f"time budget of {args.time_budget_s:.0f}s spent; stopping before d={d}", flush=True)
            break
        t0 = time.perf_counter()
        result = limit.find_critical_n(
            d,
            k=2,
            n_start=next_start(done, d),
            learning_rate=args.learning_rate,
            temperature=args.temperature,
            max_steps=args.max_steps,
            patience=args.patience,
            check_every=args.check_every,
            restarts=args.restarts,
            seed=args.seed,
            initial_step=args.initial_step,
            resolution=args.resolution,
        )
        trials = [
            {key: getattr(t, key) for key in ("n", "solved", "seed", "steps", "total_steps", "unsolved", "num_queries", "final_loss", "seconds")}
            for t in result.trials
        ]
        done[d] = {
            "critical_n": result.critical_n,
            "first_failure": result.first_failure,
            "resolution": args.resolution,
            "seconds": time.perf_counter() - t0,
            "commit": _git_commit(),
            "trials": trials,
        }
        data["dims"] = {str(k): done[k] for k in sorted(done)}
        path.write_text(json.dumps(data, indent=1))
        tried = ", ".join(f"{t['n']}{'+' if t['solved'] else '-'}" for t in trials)
        print(f"d={d:3d} critical n={result.critical_n:4d} first failure={result.first_failure} "
              f"({done[d]['seconds']:.0f}s; tried {tried})", flush=True)


def report(args) -> None:
    data = json.loads(pathlib.Path(args.results).read_text())
    dims = sorted(int(d) for d in data["dims"])
    crit = np.array([data["dims"][str(d)]["critical_n"] for d in dims], dtype=np.float64)
    coeffs, r2 = limit.fit_polynomial(dims, crit, degree=3)
    paper = np.polynomial.polynomial.polyval(np.array(dims, dtype=np.float64), PAPER_CUBIC)

    lines = [
        "| d | critical n (ours) | first failed n | queries C(n,2) | runs | seconds | paper fit at d |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for d, p in zip(dims, paper):
        row = data["dims"][str(d)]
        n = row["critical_n"]
        lines.append(
            f"| {d} | {n} | {row['first_failure']} | {math.comb(n, 2)} | {len(row['trials'])} | {row['seconds']:.0f} | {p:.1f} |"
        )
    fmt = lambda c: " + ".join(f"{v:.4g}·d^{i}" if i else f"{v:.4g}" for i, v in enumerate(c))  # noqa: E731
    extrap = {d: float(np.polynomial.polynomial.polyval(d, coeffs)) for d in (64, 128, 512, 1024, 4096)}
    paper_extrap = {d: float(np.polynomial.polynomial.polyval(d, PAPER_CUBIC)) for d in extrap}
    lines += [
        "",
        f"Cubic fit (ours, d = {dims[0]}..{dims[-1]}): n(d) = {fmt(coeffs)}, r² = {r2:.4f}",
        f"Paper's cubic fit: n(d) = {fmt(PAPER_CUBIC)}",
        "",
        "| d | ours extrapolated | paper extrapolated |",
        "|---:|---:|---:|",
        *[f"| {d} | {extrap[d]:,.0f} | {paper_extrap[d]:,.0f} |" for d in extrap],
    ]
    table = "\n".join(lines)
    (HERE / "table.md").write_text(table + "\n")
    print(table)
    summary = {"dims": dims, "critical_n": crit.astype(int).tolist(), "cubic": coeffs.tolist(), "r2": r2}
    if not args.no_plot:
        plot_path = pathlib.Path(args.plot)
        _plot(dims, crit, coeffs, plot_path)
        summary["plot"] = str(plot_path)
    print(json.dumps(summary))


def _plot(dims, crit, coeffs, path: pathlib.Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise SystemExit(f"the plot needs matplotlib ({err}); install it or pass --no_plot") from err
    grid = np.linspace(min(dims), max(dims), 200)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(dims, crit, "o", label="critical n (free embeddings, ours)")
    ax.plot(grid, np.polynomial.polynomial.polyval(grid, coeffs), "-", label="cubic fit (ours)")
    ax.plot(grid, np.polynomial.polynomial.polyval(grid, PAPER_CUBIC), "--", label="cubic fit (Weller et al. 2025)")
    ax.set_xlabel("embedding dimension d")
    ax.set_ylabel("largest n with every top-2 pair realised")
    ax.set_title("LIMIT free-embedding experiment (k = 2)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sweep", help="find the critical n for each d (resumable)")
    s.add_argument("--dims", default="4-32")
    s.add_argument("--results", default=str(HERE / "results.json"))
    s.add_argument("--learning_rate", type=float, default=0.01)
    s.add_argument("--temperature", type=float, default=0.1)
    s.add_argument("--max_steps", type=int, default=5000)
    s.add_argument("--patience", type=int, default=1000)
    s.add_argument("--check_every", type=int, default=50)
    s.add_argument("--restarts", type=int, default=1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--time_budget_s", type=float, default=float("inf"), help="start no new d after this many seconds")
    s.add_argument("--initial_step", type=int, default=1, help="first gallop step (coarse search for large d)")
    s.add_argument("--resolution", type=int, default=1,
                   help="stop bisecting at this bracket width: critical n is then a lower bound within it")
    r = sub.add_parser("report", help="fit, table and plot from a results file")
    r.add_argument("--results", default=str(HERE / "results.json"))
    r.add_argument("--plot", default=str(HERE / "critical_n.png"))
    r.add_argument("--no_plot", action="store_true")
    args = parser.parse_args(argv)
    {"sweep": sweep, "report": report}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

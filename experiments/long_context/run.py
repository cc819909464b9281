"""Long context without retraining: every position-extension method for MiniLM (512 learned
positions) and every RoPE scaling type for SmolLM2-135M (RoPE, trained on 8,192 tokens), scored on
LongEmbed-style passkey (and, at full size, needle and QMSum) retrieval across document lengths;
plus the compiled memory of encoding one input against its length, per attention implementation.

    python experiments/long_context/run.py --workdir runs/long_context/smoke            # CPU
    python experiments/long_context/run.py --scale full --workdir runs/long_context/full  # an accelerator

Each (model, method, task, length) evaluation is stored under WORKDIR/evals as JSON (per-query
nDCG@1 included) and skipped when present, so an interrupted run resumes. Writes
``results.json`` (the artifact), ``table.md``, ``ndcg_vs_length.png`` and
``memory_vs_length.png`` beside this file (``--out-dir``).

Scales (MiniLM ~22 MFLOP per token forward plus ~9 kFLOP x L per token of attention; SmolLM2
~270 MFLOP per token plus ~70 kFLOP x L; 2 loaded CPU cores give ~10-15 GFLOP/s):

- ``smoke``: passkey only; 8 candidates and 8 queries per length (LongEmbed: 100 and 50);
  MiniLM at 256 ... 8192 tokens (~9 TFLOP per extended method, 6 of them at 8192), SmolLM2 at
  256 ... 4096 (~30 TFLOP per method, 18 of them at 4096; inside its trained context: the CPU run
  measures what each scaling costs where none is needed; going past 8k is the full run's). About
  an hour on 2 idle cores; compilation adds ~30-60 s per model, method and length.
- ``check``: a few documents at two lengths; checks the runner end to end in minutes.
- ``full``: LongEmbed's sizes: passkey and needle at 256 ... 32768 tokens with 100 candidates
  and 50 queries, and QMSum (whole test split, transcripts up to ~24k words, truncated at the
  method's max length), for both models.

Methods are set for the scale's longest length ``Lmax``: MiniLM ``truncate`` (the baseline: the
plain 512-row table, longer documents cut at 512 tokens), ``interpolate`` / ``grouped`` /
``recurrent`` / ``pcw`` with ``max_length = Lmax``; SmolLM2 ``none`` (the baseline), ``linear``,
``ntk`` and ``yarn`` with factor 4 (8,192 x 4 = 32,768, the full run's longest length) and
``self_extend`` with group 8 and window 256 (supports 8 x (8192 - 256 + 32) tokens). Paired
permutation tests (per query, pooled over the lengths past the baseline's reach) compare each
method with its model's baseline.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import pathlib
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

import embedjax as ej  # noqa: E402
from embedjax import provenance  # noqa: E402
from embedjax.eval import longembed, significance  # noqa: E402

MINILM, SMOLLM = "all-MiniLM-L6-v2", "SmolLM2-135M-Instruct"
MINILM_TRAINED, SMOLLM_TRAINED = 512, 8192
ROPE_FACTOR = 4


@dataclasses.dataclass(frozen=True)
class Scale:
    tasks: tuple  # synthetic tasks ("passkey", "needle"), each at every length
    qmsum: bool
    minilm_lengths: tuple
    smollm_lengths: tuple
    candidates: int
    queries: int
    memory_lengths: tuple  # one-input compiled memory (compile only, nothing runs)
    batch_size: int


SCALES = {
    "smoke": Scale(tasks=("passkey",), qmsum=False, minilm_lengths=(256, 512, 1024, 2048, 4096, 8192),
                   smollm_lengths=(256, 512, 1024, 2048, 4096), candidates=8, queries=8,
                   memory_lengths=(1024, 2048, 4096, 8192, 16384, 32768), batch_size=2),
    # seconds: checks the runner end to end (not a result)
    "check": Scale(tasks=("passkey",), qmsum=False, minilm_lengths=(256, 1024), smollm_lengths=(256,),
                   candidates=3, queries=2, memory_lengths=(512, 1024), batch_size=2),
    "full": Scale(tasks=("passkey", "needle"), qmsum=True, minilm_lengths=longembed.LENGTHS,
                  smollm_lengths=longembed.LENGTHS, candidates=100, queries=50,
                  memory_lengths=(1024, 2048, 4096, 8192, 16384, 32768), batch_size=8),
}


def minilm_methods(longest: int) -> dict:
    """name -> from_pretrained options; the baseline first."""
    methods = {"truncate": {"max_length": MINILM_TRAINED}}
    for kind in ("interpolate", "grouped", "recurrent", "pcw"):
        methods[kind] = {"max_length": longest, "position_extension": {"type": kind, "max_length": longest}}
    return methods


def smollm_methods(longest: int) -> dict:
    methods = {"none": {"max_length": longest}}
    for kind in ("linear", "ntk", "yarn"):
        methods[kind] = {"max_length": longest, "rope_scaling": {"type": kind, "factor": float(ROPE_FACTOR)}}
    methods["self_extend"] = {"max_length": longest,
                              "rope_scaling": {"type": "self_extend", "group_size": 8, "window": 256}}
    return methods


def options_digest(options: dict) -> str:
    """A short stable digest of ``from_pretrained`` options, for cache file names."""
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:10]


def _write_json(path: pathlib.Path, record: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=float) + "\n")
    os.replace(tmp, path)


def evaluate_model(model: str, methods: dict, lengths: tuple, scale: Scale, workdir: pathlib.Path,
                   data_dir: pathlib.Path) -> list[dict]:
    """One record per (method, task, length): nDCG@1 x100 and its per-query values."""
    from tqdm.auto import tqdm

    evals = workdir / "evals"
    evals.mkdir(parents=True, exist_ok=True)
    records = []
    for method, options in methods.items():
        encoder = None
        jobs = [(task, length) for task in scale.tasks for length in lengths]
        if scale.qmsum:
            jobs.append(("qmsum", None))
        for task_name, length in tqdm(jobs, desc=f"{model} {method}", unit="set"):
            # The options are in the name: a method set for another longest length (interpolation to
            # 8192 rather than 4096, say) is another model and must not be read back from the cache.
            path = evals / f"{model}-{method}-{options_digest(options)}-{task_name}-{length or 'natural'}.json"
            if path.exists():
                records.append(json.loads(path.read_text()))
                continue
            if encoder is None:
                encoder = ej.Encoder.from_pretrained(model, **options)
            if task_name == "qmsum":
                task = longembed.qmsum_task(data_dir)
            else:
                # Built with the evaluated model's tokenizer: an L-token document fills an L-token input.
                counter = longembed.token_counter(encoder.tokenizer)  # counts without truncating
                task = longembed.synthetic_task(task_name, length, counter, data_dir=data_dir,
                                                num_candidates=scale.candidates, num_queries=scale.queries, seed=0)
            result = longembed.evaluate(encoder, task, k_values=(1, 10), batch_size=scale.batch_size, per_query=True)
            record = {"model": model, "method": method, "options": options, "task": task_name, "length": length,
                      "ndcg@1": result["ndcg@1"], "ndcg@10": result["ndcg@10"], "num_queries": result["num_queries"],
                      "per_query_ndcg@1": result["per_query"]["ndcg@1"], "seed": 0}
            _write_json(path, record)
            records.append(record)
    return records


def paired_tests(records: list[dict], baseline: str, reach: int) -> list[dict]:
    """Each method against the baseline on the same queries, pooled over the lengths past ``reach``
    (QMSum's natural-length documents always count)."""
    by_key = {(r["model"], r["method"], r["task"], r["length"]): r for r in records}
    out = []
    for model, method, task in dict.fromkeys((r["model"], r["method"], r["task"]) for r in records):
        if method == baseline:
            continue
        a, b = [], []
        for length in sorted({r["length"] or 0 for r in records if r["task"] == task}):
            length = length or None
            if length is not None and length <= reach:
                continue
            ours, base = by_key.get((model, method, task, length)), by_key.get((model, baseline, task, length))
            if ours is None or base is None:
                continue
            for qid, value in ours["per_query_ndcg@1"].items():
                a.append(value)
                b.append(base["per_query_ndcg@1"][qid])
        if a:
            test = significance.paired_permutation_test(a, b, seed=0)
            out.append({"model": model, "method": method, "baseline": baseline, "task": task,
                        "lengths_past": reach, "pairs": len(a), "mean_method": float(np.mean(a)),
                        "mean_baseline": float(np.mean(b)), "p_value": test["p_value"]})
    return out


def memory_rows(lengths: tuple) -> list[dict]:
    """Compiled temporaries of embedding one input, per model, attention implementation and length."""
    from tqdm.auto import tqdm

    from embedjax.bench.long_context import compiled_temp_bytes
    from embedjax.models.pretrained import resolve_model_dir

    longest = max(lengths)
    setups = [(MINILM, {"position_extension": {"type": "interpolate", "max_length": longest}}),
              (SMOLLM, {"rope_scaling": {"type": "linear", "factor": float(ROPE_FACTOR)}})]
    rows = []
    for model, options in setups:
        folder = resolve_model_dir(model)
        for impl in ("chunked", "explicit"):
            for length in tqdm(lengths, desc=f"compile {model} {impl}", unit="length"):
                measured = compiled_temp_bytes(folder, length, impl=impl, options=options)
                rows.append({"model": model, "impl": impl, "length": length,
                             "temp_mib": measured["temp_bytes"] / 2 ** 20})
    return rows


def ndcg_rows(records: list[dict]) -> list[dict]:
    """One row per (model, method, task): nDCG@1 at each length (the README table's artifact part)."""
    rows = {}
    for r in records:
        row = rows.setdefault((r["model"], r["method"], r["task"]),
                              {"model": r["model"], "method": r["method"], "task": r["task"], "ndcg@1": {}})
        row["ndcg@1"][str(r["length"] or "natural")] = r["ndcg@1"]
    return list(rows.values())


def memory_table_rows(memory: list[dict], ratio_from: int = 4096) -> list[dict]:
    """One row per (model, impl): compiled MiB at each length and the growth from ``ratio_from``."""
    rows = {}
    for m in memory:
        row = rows.setdefault((m["model"], m["impl"]), {"model": m["model"], "impl": m["impl"], "temp_mib": {}})
        row["temp_mib"][str(m["length"])] = m["temp_mib"]
    for row in rows.values():
        longest = max(row["temp_mib"], key=int)
        if str(ratio_from) in row["temp_mib"]:
            row[f"growth_{ratio_from}_to_{longest}"] = row["temp_mib"][longest] / row["temp_mib"][str(ratio_from)]
    return list(rows.values())


def tables(summary: dict, artifact: str = "results.json") -> str:
    """The README's tables, every row linking the part of ``artifact`` that holds its figures."""
    rows, tests, memory = summary["ndcg_rows"], summary["paired_tests"], summary["memory_rows"]
    lengths = sorted({k for row in rows for k in row["ndcg@1"]}, key=lambda k: (k == "natural", int(k) if k.isdigit() else 0))
    lines = ["nDCG@1 (x100) by document length (tokens):", "",
             "| model | method | task | " + " | ".join(lengths) + " | artifact |",
             "|---|---|---|" + "---:|" * len(lengths) + "---|"]
    for i, row in enumerate(rows):
        cells = [f"{row['ndcg@1'][k]:.1f}" if k in row["ndcg@1"] else "" for k in lengths]
        lines.append(f"| {row['model']} | {row['method']} | {row['task']} | " + " | ".join(cells)
                     + f" | [json]({artifact}#/ndcg_rows/{i}) |")
    lines += ["", "Paired permutation tests against each model's baseline (per query; MiniLM: lengths past 512 "
              "pooled; SmolLM2: every length):", "",
              "| model | method | task | pairs | method nDCG@1 | baseline nDCG@1 | p | artifact |",
              "|---|---|---|---:|---:|---:|---:|---|"]
    for i, t in enumerate(tests):
        lines.append(f"| {t['model']} | {t['method']} | {t['task']} | {t['pairs']} | {t['mean_method']:.1f} | "
                     f"{t['mean_baseline']:.1f} | {t['p_value']:.2g} | [json]({artifact}#/paired_tests/{i}) |")
    if memory:
        mem_lengths = sorted({k for row in memory for k in row["temp_mib"]}, key=int)
        growth = [k for k in memory[0] if k.startswith("growth_")]
        header = mem_lengths + [g.replace("_", " ") for g in growth]
        lines += ["", "Compiled temporaries (MiB) of embedding one input, float32:", "",
                  "| model | impl | " + " | ".join(header) + " | artifact |",
                  "|---|---|" + "---:|" * len(header) + "---|"]
        for i, row in enumerate(memory):
            cells = [f"{row['temp_mib'][k]:.1f}" for k in mem_lengths] + [f"{row[g]:.2f}" for g in growth if g in row]
            lines.append(f"| {row['model']} | {row['impl']} | " + " | ".join(cells) + f" | [json]({artifact}#/memory_rows/{i}) |")
    return "\n".join(lines) + "\n"


def plots(records: list[dict], memory: list[dict], out_dir: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in records})
    tasks = sorted({r["task"] for r in records if r["length"] is not None})
    fig, axes = plt.subplots(len(tasks), len(models), figsize=(5.5 * len(models), 3.8 * len(tasks)), squeeze=False)
    for i, task in enumerate(tasks):
        for j, model in enumerate(models):
            ax = axes[i][j]
            methods = list(dict.fromkeys(r["method"] for r in records if r["model"] == model))
            for k, method in enumerate(methods):
                pts = sorted((r["length"], r["ndcg@1"]) for r in records
                             if (r["model"], r["method"], r["task"]) == (model, method, task))
                # methods often tie: distinct markers and a small horizontal offset keep each visible
                shift = 2 ** (0.04 * (k - (len(methods) - 1) / 2))
                ax.plot([x * shift for x, _ in pts], [y for _, y in pts], marker="osD^vP*"[k % 7], alpha=0.8,
                        label=method)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{model}: {task}")
            ax.set_xlabel("document length (tokens)")
            ax.set_ylabel("nDCG@1")
            ax.set_ylim(-5, 105)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "ndcg_vs_length.png", dpi=80)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for model in dict.fromkeys(r["model"] for r in memory):
        for impl in ("chunked", "explicit"):
            pts = [(r["length"], r["temp_mib"]) for r in memory if (r["model"], r["impl"]) == (model, impl)]
            ax.plot(*zip(*pts), marker="o", linestyle="-" if impl == "chunked" else "--", label=f"{model} {impl}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("input length (tokens)")
    ax.set_ylabel("compiled temporaries (MiB)")
    ax.set_title("One input, float32, CPU compile")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "memory_vs_length.png", dpi=80)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="smoke")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out-dir", default=str(HERE))
    parser.add_argument("--models", default=f"{MINILM},{SMOLLM}")
    parser.add_argument("--skip-memory", action="store_true", help="leave out the compiled-memory sweep")
    args = parser.parse_args(argv)
    scale = SCALES[args.scale]
    workdir, out_dir = pathlib.Path(args.workdir), pathlib.Path(args.out_dir)
    data_dir = pathlib.Path(os.environ.get("EMBEDJAX_DATA_DIR", REPO.parent / "shared" / "data"))
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - {MINILM, SMOLLM})
    if unknown:
        raise ValueError(f"--models {unknown}: this experiment runs {MINILM} and {SMOLLM}")

    memory = []
    memory_path = workdir / "memory.json"
    if not args.skip_memory:
        workdir.mkdir(parents=True, exist_ok=True)
        if memory_path.exists():
            memory = json.loads(memory_path.read_text())
        else:
            memory = memory_rows(scale.memory_lengths)
            _write_json(memory_path, memory)
    records, tests = [], []
    if MINILM in models:
        minilm = evaluate_model(MINILM, minilm_methods(max(scale.minilm_lengths)), scale.minilm_lengths, scale,
                                workdir, data_dir)
        records += minilm
        tests += paired_tests(minilm, "truncate", MINILM_TRAINED)
    if SMOLLM in models:
        smollm = evaluate_model(SMOLLM, smollm_methods(max(scale.smollm_lengths)), scale.smollm_lengths, scale,
                                workdir, data_dir)
        records += smollm
        # Inside the trained context every length counts: the test asks whether scaling costs anything.
        tests += paired_tests(smollm, "none", 0)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"scale": args.scale, "scale_settings": dataclasses.asdict(scale), "ndcg_rows": ndcg_rows(records),
               "paired_tests": tests, "memory_rows": memory_table_rows(memory), "records": records, "memory": memory,
               "command": "python experiments/long_context/run.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    provenance.write_artifact(out_dir / "results.json", summary)
    (out_dir / "table.md").write_text(tables(summary))
    plots(records, memory, out_dir)
    brief = {"records": len(records), "tests": len(tests), "results": str(out_dir / "results.json")}
    print(json.dumps(brief))
    return brief


if __name__ == "__main__":
    main()

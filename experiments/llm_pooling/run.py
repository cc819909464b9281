"""Evaluation and report of the pooling x attention experiment (configs/llm_pooling.py).

    python experiments/llm_pooling/run.py evaluate --sweep runs/llm_pooling [--sets stsb,msmarco] [--full]
    python experiments/llm_pooling/run.py report

``evaluate`` scores the reference models (all-MiniLM-L6-v2; untrained SmolLM2-135M-Instruct with
last-token and mean pooling, causal and bidirectional) and every finished training run of the
sweep (its export: LoRA merged, head included) on STS-B test and the msmarco subset with
documents truncated at 128 tokens, and writes one artifact per cell,
``experiments/llm_pooling/cells/<cell>.json``, holding the per-pair similarities and per-query
nDCG@10 that the paired tests need. Sets already in a cell's artifact are skipped, so the
command resumes; each set is evaluated for every available cell before the next set starts
(STS-B is cheap, msmarco is most of the cost). ``--full`` adds SciFact and NFCorpus test.

``report`` reads the cell artifacts and writes ``results.json`` (mean +- std over seeds, paired
tests against causal + last token and against the untrained model of the same pooling, the
NV-Embed ordering verdict), ``table.md`` and ``pooling.png``. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # this checkout's embedjax, not whichever one is installed
CELLS = HERE / "cells"
CONFIG = "configs/llm_pooling.py"
MAX_LENGTH = 128  # documents (and every text) truncated at 128 tokens, as the issue fixes it
NDCG = "ndcg@10"
STSB_TEST_PAIRS = 1379
BASELINE = ("trained", "causal", "last token")
# The grid's other questions, each a paired test of b against a: does bidirectional attention help
# a given pooler, and does LLM2Vec's MNTP stage help bidirectional mean pooling?
CONTRASTS = [(f"bidirectional attention, {p}", ("trained", "causal", p), ("trained", "bidirectional", p))
             for p in ("last token", "mean", "latent attention")] + [
    ("MNTP before contrastive (LLM2Vec)", ("trained", "bidirectional", "mean"),
     ("trained", "bidirectional", "mean + MNTP"))]
# NV-Embed-v1 Table (MTEB-56): the ordering the experiment checks.
NV_EMBED_ORDER = [("bidirectional", "latent attention"), ("bidirectional", "mean"), ("bidirectional", "last token"),
                  ("causal", "last token")]
NV_EMBED_SCORES = {("bidirectional", "latent attention"): 69.32, ("bidirectional", "mean"): 68.97,
                   ("bidirectional", "last token"): 67.85, ("causal", "last token"): 66.50}
REFERENCES = {  # cell name -> (model, pooling, attention)
    "ref-minilm": ("all-MiniLM-L6-v2", None, None),
    "ref-smollm2-causal-lasttoken": ("SmolLM2-135M-Instruct", "lasttoken", "causal"),
    "ref-smollm2-causal-mean": ("SmolLM2-135M-Instruct", "mean", "causal"),
    "ref-smollm2-bidirectional-mean": ("SmolLM2-135M-Instruct", "mean", "bidirectional"),
    "ref-smollm2-bidirectional-lasttoken": ("SmolLM2-135M-Instruct", "lasttoken", "bidirectional"),
}
POOLER_LABELS = {"lasttoken": "last token", "mean": "mean"}


def _write(path: pathlib.Path, payload: dict) -> None:
    """Atomic JSON with provenance (commit, dirty flag, load, versions, command)."""
    from embedjax.provenance import write_artifact

    write_artifact(path, payload)


# ---------------------------------------------------------------- cells

def trained_cell(run: dict) -> dict:
    """Labels of a sweep run: attention, pooler, MNTP, seed."""
    o = run["overrides"]
    if o.get("train.objective") == "mntp":
        return {}  # the MNTP stage is not a cell: its chained contrastive run is
    pooler = "latent attention" if o.get("model.head.type") == "latent_attention" else POOLER_LABELS[o["model.pooling"]]
    mntp = "mntp" in str(o.get("model.path", ""))
    return {"kind": "trained", "attention": o["model.config.attention"], "pooler": pooler, "mntp": mntp,
            "seed": int(o.get("seed", 0)), "run": run["name"]}


def cell_name(cell: dict) -> str:
    if cell["kind"] == "reference":
        return cell["name"]
    pooler = cell["pooler"].replace(" ", "")
    return f"{cell['attention']}-{pooler}{'-mntp' if cell['mntp'] else ''}-seed{cell['seed']}"


def available_cells(sweep: pathlib.Path) -> list[tuple[dict, object]]:
    """(cell, model source) for the references and every finished run of the sweep, references first."""
    from embedjax.sweep import MANIFEST, run_status

    cells = [({"kind": "reference", "name": name, "model": model, "pooler": POOLER_LABELS.get(pooling, "(folder)"),
               "attention": attention}, (model, pooling, attention)) for name, (model, pooling, attention)
             in REFERENCES.items()]
    manifest = sweep / MANIFEST
    if manifest.is_file():
        for run in json.loads(manifest.read_text())["runs"]:
            cell = trained_cell(run)
            workdir = sweep / run["name"]
            if cell and run_status(str(workdir)) == "finished" and (workdir / "export" / "config.json").is_file():
                cells.append((cell, workdir / "export"))
    return cells


# Padded lengths: four compiled shapes per model instead of the default ladder's twelve (a compile
# costs minutes on a loaded CPU; padding never changes an embedding).
BUCKETS = (16, 32, 64, MAX_LENGTH)


def load_encoder(source):
    import embedjax as ej

    if isinstance(source, tuple):
        model, pooling, attention = source
        options = {} if pooling is None else {"pooling": pooling, "normalize": True, "attention": attention}
        encoder = ej.Encoder.from_pretrained(model, max_length=MAX_LENGTH, **options)
    else:
        encoder = ej.Encoder.from_pretrained(source, max_length=MAX_LENGTH)
    encoder.tokenizer.buckets = BUCKETS
    return encoder


def stsb_subset(num_pairs: int, total: int) -> list[int]:
    """Indices of the STS-B test pairs evaluated: all of them (``num_pairs`` 0), or a seed-0 random
    subset, sorted, the same for every cell (the paired tests need the same pairs)."""
    if num_pairs < 0:
        raise ValueError(f"--stsb-pairs {num_pairs}: use 0 (all {total} pairs) or a positive count")
    if num_pairs == 0 or num_pairs >= total:
        return list(range(total))
    return sorted(int(i) for i in np.random.default_rng(0).choice(total, size=num_pairs, replace=False))


def evaluate_set(encoder, name: str, stsb_pairs: int = 0) -> dict:
    """One evaluation set's scores, with what the paired tests need."""
    from embedjax.data.builders import resolve_source
    from embedjax.data.readers import read_beir, read_sts
    from embedjax.eval.retrieval import retrieval
    from embedjax.eval.sts import pair_similarities, sts_scores

    if name == "stsb":
        s1, s2, gold = read_sts(resolve_source("stsb/sts-test.csv"))
        pairs = stsb_subset(stsb_pairs, len(gold))
        s1, s2, gold = [s1[i] for i in pairs], [s2[i] for i in pairs], np.asarray(gold)[pairs]
        unique = list(dict.fromkeys([*s1, *s2]))
        emb = encoder.encode(unique, batch_size=32, show_progress=True)
        row = {s: i for i, s in enumerate(unique)}
        e1, e2 = emb[[row[s] for s in s1]], emb[[row[s] for s in s2]]
        scores = sts_scores(e1, e2, gold)
        cosine = pair_similarities(e1, e2)["cosine"]
        return {"spearman": scores["spearman_cosine"], "pearson": scores["pearson_cosine"], "pairs": pairs,
                "cosine": [round(float(x), 6) for x in cosine]}
    folder, split = {"msmarco": ("msmarco", "test"), "scifact": ("scifact", "test"),
                     "nfcorpus": ("nfcorpus", "test")}[name]
    corpus, queries, qrels = read_beir(resolve_source(folder), split=split)
    scores = retrieval(encoder, corpus, queries, qrels, k_values=(10, 100), batch_size=32, per_query=True,
                       show_progress=True)
    per_query = scores.pop("per_query")
    return {NDCG: scores[NDCG], "recall@100": scores["recall@100"],
            "per_query_ndcg@10": {q: round(float(v), 4) for q, v in sorted(per_query[NDCG].items())}}


def run_summary(export: pathlib.Path) -> dict:
    workdir = export.parent
    summary = json.loads((workdir / "summary.json").read_text())
    config = json.loads((workdir / "config.json").read_text())
    keep = {k: summary.get(k) for k in ("status", "step", "num_steps", "final_loss", "train_pairs_per_s")}
    train = config["train"]
    keep["settings"] = {"batch_size": train["batch_size"], "num_steps": train["num_steps"],
                        "learning_rate": config["optim"]["learning_rate"], "max_length": config["model"]["max_length"],
                        "lora": config["model"]["lora"], "head": config["model"]["head"],
                        "objective": train["objective"], "loss": train["loss"], "ring": train["ring"],
                        "num_negatives": config["data"]["num_negatives"], "model_path": config["model"]["path"]}
    return keep


def evaluate(args) -> dict:
    sweep = pathlib.Path(args.sweep)
    sets = [s for s in args.sets.split(",") if s] + (["scifact", "nfcorpus"] if args.full else [])
    CELLS.mkdir(exist_ok=True)
    done = []
    refs = [r for r in args.refs.split(",") if r] if args.refs else list(REFERENCES)
    unknown = sorted(set(refs) - set(REFERENCES))
    if unknown:
        raise ValueError(f"--refs {unknown}: not reference cells; choose from {sorted(REFERENCES)}")
    available = available_cells(sweep)
    only = [c for c in args.cells.split(",") if c]
    missing = sorted(set(only) - {cell_name(cell) for cell, _ in available})
    if missing:
        raise ValueError(f"--cells {missing}: not available; choose from {[cell_name(c) for c, _ in available]} "
                         "(a trained cell is available once its run has finished and exported)")
    for name in sets:
        for cell, source in available:
            if cell["kind"] == "reference" and cell["name"] not in refs and not only:
                continue
            if only and cell_name(cell) not in only:
                continue
            path = CELLS / f"{cell_name(cell)}.json"
            record = json.loads(path.read_text()) if path.is_file() else {"cell": cell, "sets": {}}
            training = run_summary(source) if cell["kind"] == "trained" else None
            if training is not None and record.get("training") != training:
                record = {"cell": cell, "sets": {}}  # the run was retrained: its old scores are stale
            if name in record["sets"] and (name != "stsb" or _covers(record["sets"][name], args.stsb_pairs)):
                continue
            print(f"# {cell_name(cell)}: {name}", file=sys.stderr, flush=True)
            encoder = load_encoder(source)
            record["sets"][name] = evaluate_set(encoder, name, args.stsb_pairs)
            record["cell"] = cell
            record["max_length"] = MAX_LENGTH
            if training is not None:
                record["training"] = training
            _write(path, record)
            done.append(f"{cell_name(cell)}:{name}")
    return {"command": "evaluate", "evaluated": done}


def _covers(stsb: dict, num_pairs: int) -> bool:
    """An STS-B record holds every pair the requested subset needs (a full-set record covers any)."""
    have = set(stsb.get("pairs", range(len(stsb["cosine"]))))
    return set(stsb_subset(num_pairs, STSB_TEST_PAIRS)) <= have


# ---------------------------------------------------------------- report

def load_cells() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(CELLS.glob("*.json"))]


def group_key(cell: dict) -> tuple:
    if cell["kind"] == "reference":
        return ("reference", cell["name"])
    return ("trained", cell["attention"], cell["pooler"] + (" + MNTP" if cell["mntp"] else ""))


def report(args) -> dict:
    from embedjax.data.builders import resolve_source
    from embedjax.data.readers import read_sts
    from embedjax.eval.significance import paired_bootstrap_correlation_test, paired_permutation_test

    _, _, gold = read_sts(resolve_source("stsb/sts-test.csv"))
    groups: dict[tuple, list[dict]] = {}
    for record in load_cells():
        groups.setdefault(group_key(record["cell"]), []).append(record)

    # Every row is scored on the same STS-B pairs: those of the smallest subset any cell evaluated
    # (a cell evaluated on all pairs, e.g. a cheap reference, is restricted to them).
    subsets = [m["sets"]["stsb"].get("pairs", list(range(len(gold)))) for g in groups.values() for m in g
               if "stsb" in m["sets"]]
    pairs = min(subsets, key=len) if subsets else list(range(len(gold)))
    gold = np.asarray(gold)[pairs]

    def sts_cosines(member):
        stsb = member["sets"]["stsb"]
        where = {p: i for i, p in enumerate(stsb.get("pairs", range(len(stsb["cosine"]))))}
        missing = [p for p in pairs if p not in where]
        if missing:
            raise ValueError(f"{cell_name(member['cell'])}: STS-B pairs {missing[:5]}... not evaluated; re-run "
                             "evaluate with the same --stsb-pairs for every cell")
        return np.asarray(stsb["cosine"])[[where[p] for p in pairs]]

    def sts_rows(members):
        return [sts_cosines(m) for m in members if "stsb" in m["sets"]]

    def spearman(member):
        from scipy.stats import spearmanr

        return 100.0 * float(spearmanr(sts_cosines(member), gold).statistic)

    def msmarco_scores(members):
        tables = [m["sets"]["msmarco"]["per_query_ndcg@10"] for m in members if "msmarco" in m["sets"]]
        if not tables:
            return None
        queries = sorted(tables[0])
        return np.mean([[t[q] for q in queries] for t in tables], axis=0)

    def compare(members_a, members_b) -> dict:
        out = {}
        a, b = sts_rows(members_a), sts_rows(members_b)
        if a and b:
            out["stsb"] = paired_bootstrap_correlation_test(a, b, gold, num_samples=args.samples, seed=0)
        ma, mb = msmarco_scores(members_a), msmarco_scores(members_b)
        if ma is not None and mb is not None:
            out["msmarco"] = paired_permutation_test(ma, mb, num_samples=args.samples, seed=0)
        return out

    baseline = groups.get(BASELINE, [])
    rows = []
    for key in sorted(groups, key=_row_order):
        members = groups[key]
        row = {"group": list(key), "label": _label(key), "seeds": sorted(m["cell"].get("seed", 0) for m in members)}
        for name, metric in (("stsb", "spearman"), ("msmarco", NDCG)):
            values = [spearman(m) if name == "stsb" else m["sets"][name][metric] for m in members
                      if name in m["sets"]]
            if values:
                row[f"{name}_mean"] = float(np.mean(values))
                row[f"{name}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
                row[f"{name}_n"] = len(values)
        row["cells"] = [f"cells/{cell_name(m['cell'])}.json" for m in members]
        if key != BASELINE and baseline and key[0] == "trained":
            row["vs_causal_last_token"] = compare(baseline, members)
        if key[0] == "trained":
            untrained = _untrained_reference(key)
            if untrained in groups:
                row["untrained"] = untrained[1]
                row["vs_untrained"] = compare(groups[untrained], members)
        rows.append(row)
    verdict = _ordering_verdict(rows)
    # Each adjacent step of NV-Embed's ordering as a paired test (the better cell in NV-Embed as b):
    # a ranking of means alone says nothing about noise.
    verdict["adjacent_tests"] = [
        {"a": f"{lo[0]}, {lo[1]}", "b": f"{hi[0]}, {hi[1]}",
         **compare(groups[("trained", *lo)], groups[("trained", *hi)])}
        for hi, lo in zip(NV_EMBED_ORDER, NV_EMBED_ORDER[1:]) if ("trained", *hi) in groups and ("trained", *lo) in groups]
    contrasts = [{"a": f"{a[1]}, {a[2]}", "b": f"{b[1]}, {b[2]}", "question": question,
                  **compare(groups[a], groups[b])}
                 for question, a, b in CONTRASTS if a in groups and b in groups]
    payload = {"rows": rows, "nv_embed_ordering": verdict, "contrasts": contrasts, "samples": args.samples,
               "stsb_pairs": len(pairs),
               "note": f"STS-B: Spearman x100 of cosine (paired bootstrap over {len(pairs)} of the 1,379 test pairs, "
                       "statistic = mean over "
                       "seeds); msmarco: nDCG@10 x100 on the 43 judged queries (paired permutation test on the "
                       "seed-averaged per-query scores); every text truncated at 128 tokens."}
    _write(HERE / "results.json", payload)
    (HERE / "table.md").write_text(markdown_table(rows) + "\n" + ordering_table(verdict["adjacent_tests"]) + "\n"
                                   + contrast_table(contrasts))
    plot(rows, HERE / "pooling.png")
    return {"command": "report", "rows": len(rows), "verdict": verdict.get("holds")}


def _label(key) -> str:
    if key[0] == "reference":
        model, pooling, attention = REFERENCES[key[1]]
        return model if pooling is None else f"{model} untrained, {attention}, {POOLER_LABELS[pooling]}"
    return f"SmolLM2 + LoRA, {key[1]}, {key[2]}"


def _row_order(key):
    if key[0] == "reference":
        return (0, list(REFERENCES).index(key[1]), "")
    pooler_rank = {"last token": 0, "mean": 1, "latent attention": 2, "mean + MNTP": 3}
    return (1, ("causal", "bidirectional").index(key[1]), pooler_rank.get(key[2], 9))


def _untrained_reference(key) -> tuple:
    pooler = {"last token": "lasttoken", "mean": "mean", "latent attention": "mean", "mean + MNTP": "mean"}[key[2]]
    return ("reference", f"ref-smollm2-{key[1]}-{pooler}")


def _ordering_verdict(rows) -> dict:
    """Does latent+bidir > mean+bidir > last+bidir > last+causal hold here (STS-B and msmarco)?"""
    by_cell = {(r["group"][1], r["group"][2]): r for r in rows if r["group"][0] == "trained"}
    out = {"nv_embed_mteb56": {f"{a}, {p}": s for (a, p), s in NV_EMBED_SCORES.items()}}
    holds = {}
    for name in ("stsb", "msmarco"):
        values = [by_cell.get(c, {}).get(f"{name}_mean") for c in NV_EMBED_ORDER]
        if any(v is None for v in values):
            holds[name] = None
            out[name] = "not all four cells measured"
            continue
        ranked = sorted(NV_EMBED_ORDER, key=lambda c: -by_cell[c][f"{name}_mean"])
        holds[name] = ranked == NV_EMBED_ORDER
        out[name] = {"ours_ranked": [f"{a}, {p}" for a, p in ranked],
                     "means": {f"{a}, {p}": by_cell[(a, p)][f"{name}_mean"] for a, p in NV_EMBED_ORDER}}
    out["holds"] = holds
    return out


def _fmt(row, name) -> str:
    if f"{name}_mean" not in row:
        return "-"
    if row[f"{name}_n"] > 1:
        return f"{row[f'{name}_mean']:.2f} +- {row[f'{name}_std']:.2f}"
    return f"{row[f'{name}_mean']:.2f}"


def _p(row, test, name) -> str:
    result = row.get(test, {}).get(name)
    if not result:
        return "-"
    delta = result["mean_difference"]
    return f"{delta:+.2f} (p={result['p_value']:.4f})"


def markdown_table(rows) -> str:
    lines = ["| model | seeds | STS-B test Spearman | msmarco nDCG@10 | vs causal + last token: STS-B | msmarco "
             "| vs untrained (same pooling): STS-B | msmarco | artifact |",
             "|---|---|---|---|---|---|---|---|---|"]
    for i, row in enumerate(rows):
        seeds = ",".join(str(s) for s in row["seeds"]) if row["group"][0] == "trained" else "-"
        lines.append(f"| {row['label']} | {seeds} | {_fmt(row, 'stsb')} | {_fmt(row, 'msmarco')} | "
                     f"{_p(row, 'vs_causal_last_token', 'stsb')} | {_p(row, 'vs_causal_last_token', 'msmarco')} | "
                     f"{_p(row, 'vs_untrained', 'stsb')} | {_p(row, 'vs_untrained', 'msmarco')} | "
                     f"[json](results.json#/rows/{i}) |")
    return "\n".join(lines) + "\n"


def _test_cells(test) -> str:
    """A paired test's table cells: STS-B difference | 95% CI | p | msmarco difference | p
    ("-" for a set not measured in both cells)."""
    sts, ms = test.get("stsb"), test.get("msmarco")
    sts_cells = (f"{sts['mean_difference']:+.2f} | [{sts['ci_low']:.2f}, {sts['ci_high']:.2f}] | "
                 f"{sts['p_value']:.4f}") if sts else "- | - | -"
    ms_cells = f"{ms['mean_difference']:+.2f} | {ms['p_value']:.4f}" if ms else "- | -"
    return f"{sts_cells} | {ms_cells}"


def ordering_table(tests) -> str:
    """NV-Embed's ordering, one adjacent step per line: the paired difference (better in NV-Embed
    minus worse) with its 95% interval and p, per set measured for both cells."""
    lines = ["| step of the ordering (better in NV-Embed first) | STS-B difference | 95% CI | p "
             "| msmarco difference | p | artifact |", "|---|---|---|---|---|---|---|"]
    for i, t in enumerate(tests):
        lines.append(f"| {t['b']} over {t['a']} | {_test_cells(t)} | "
                     f"[json](results.json#/nv_embed_ordering/adjacent_tests/{i}) |")
    return "\n".join(lines) + "\n"


def contrast_table(contrasts) -> str:
    """The grid's other paired questions (`CONTRASTS`): b minus a, per set measured for both."""
    lines = ["| question | b over a | STS-B difference | 95% CI | p | msmarco difference | p | artifact |",
             "|---|---|---|---|---|---|---|---|"]
    for i, t in enumerate(contrasts):
        lines.append(f"| {t['question']} | {t['b']} over {t['a']} | {_test_cells(t)} | "
                     f"[json](results.json#/contrasts/{i}) |")
    return "\n".join(lines) + "\n"


def plot(rows, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, (name, title) in zip(axes, (("stsb", "STS-B test, Spearman x100"), ("msmarco", "msmarco, nDCG@10 x100"))):
        shown = [r for r in rows if f"{name}_mean" in r]
        labels = [r["label"].replace("SmolLM2 + LoRA, ", "").replace("SmolLM2-135M-Instruct ", "SmolLM2 ")
                  for r in shown]
        colors = ["#999999" if r["group"][0] == "reference" else "#1f77b4" if r["group"][1] == "causal" else "#d62728"
                  for r in shown]
        ax.barh(range(len(shown)), [r[f"{name}_mean"] for r in shown], xerr=[r[f"{name}_std"] for r in shown],
                color=colors)
        ax.set_yticks(range(len(shown)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(title)
    fig.suptitle("SmolLM2-135M-Instruct + LoRA r=16: pooling x attention (blue causal, red bidirectional, grey "
                 "references)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")  # the long row labels stay inside the image
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("evaluate")
    ev.add_argument("--sweep", default="runs/llm_pooling")
    ev.add_argument("--sets", default="stsb,msmarco")
    ev.add_argument("--full", action="store_true", help="also SciFact and NFCorpus test (the pod-scale evaluation)")
    ev.add_argument("--stsb-pairs", type=int, default=0,
                    help="evaluate a fixed seed-0 random subset of this many STS-B test pairs (0: all 1,379)")
    ev.add_argument("--refs", default="", help="comma-separated reference cells to evaluate (default: all)")
    ev.add_argument("--cells", default="", help="comma-separated cells (references or trained, e.g. "
                    "causal-lasttoken-seed0) to evaluate, for a costly set such as msmarco (default: all available)")
    rep = sub.add_parser("report")
    rep.add_argument("--samples", type=int, default=10_000)
    args = parser.parse_args(argv)
    return evaluate(args) if args.command == "evaluate" else report(args)


if __name__ == "__main__":
    print(json.dumps(main()))

"""Merging an STS parent with a retrieval parent: every method of `embedjax.merge` over a grid,
each merge evaluated once on STS-B test, scifact test and msmarco, with paired tests against
both parents.

    # the parents (each skips itself when finished)
    python -m embedjax train --config configs/stsb_cosent.py --workdir runs/merging/parents/stsb
    python -m embedjax train --config configs/merging_retrieval_parent.py --workdir runs/merging/parents/retrieval
    # merges, evaluations, artifacts (resumable: each grid point skips itself once evaluated)
    python experiments/merging/run.py --workdir runs/merging/smoke
    python experiments/merging/run.py --scale full --workdir runs/merging/full      # an accelerator

All merges start from all-MiniLM-L6-v2 (the base, theta_0) and the two parents' exports. Every
model is encoded at the scale's max length, its embeddings cached under WORKDIR/embeddings and its
scores (with per-query / per-pair values for the paired tests) under WORKDIR/evals; a model whose
weights hash matches a finished evaluation is not encoded again, and a grid point (method, value)
whose evaluation names the same method, setting and parents is not even merged again, so the
sweep spans sittings: stop it any time and rerun the same command. Writes ``results.json`` (the
artifact), ``table.md`` and ``tradeoff.png`` beside this file (``--out-dir``).

Scales (MiniLM costs ~22 MFLOP per token forward; 2 cores shared by ~7 agents gave ~6 GFLOP/s):

- ``smoke`` (~1.8 TFLOP, ~5 minutes per model on the loaded CPU; 10 models, ~1 h in all): 128
  tokens per text; a seeded random 500 of STS-B test's 1,379 pairs; scifact test's 300 queries
  against a 300-document sub-corpus (the 283 abstracts they judge relevant + 17 seeded random
  ones: the distractors are mostly other queries' relevant abstracts); the msmarco queries
  against a seeded random 200 of its 5,000 passages (qrels restricted to them). A grid per method:
  soup and SLERP at t in {0.25, 0.5, 0.75}, task arithmetic, TIES (density 0.2) and DARE (p 0.9)
  at lambda in {0.5, 1.0, 1.5}; Self Positioning 10 Adam steps on 4 + 4 probe
  batches of 8 pairs; greedy soup of (base, STS parent, retrieval parent) on 500 STS-B dev pairs
  + a 200-document nfcorpus dev sub-corpus.
- ``full``: 256 tokens, the whole STS-B test, scifact and msmarco corpora and nfcorpus dev, finer
  grids, longer Self Positioning.
- ``check``: minutes, tiny sets; a check of the code, not a result.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import pathlib
import sys
from typing import Callable

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

import embedjax as ej  # noqa: E402
from embedjax import merge, provenance  # noqa: E402
from embedjax.eval import significance  # noqa: E402
from embedjax.eval.embedding_cache import cached_encode, hash_params  # noqa: E402
from embedjax.eval.retrieval import document_text, retrieval_from_embeddings  # noqa: E402
from embedjax.eval.sts import pair_similarities, sts_scores  # noqa: E402

RETRIEVAL_SETS = ("scifact", "msmarco")
METRICS = ("stsb", "scifact", "msmarco")


@dataclasses.dataclass(frozen=True)
class Scale:
    sts_pairs: int | None  # None: all STS-B pairs of the split; else a seeded random N of them (test and dev)
    scifact_docs: int | None  # None: the whole corpus
    msmarco_docs: int | None
    heldout_docs: int | None  # nfcorpus dev sub-corpus of the greedy soup's held-out score
    heldout_relevant: int  # at most this many relevant documents in it (queries added while they fit)
    max_length: int  # tokens per text when a model is scored (all models alike)
    t_grid: tuple
    ta_lambdas: tuple
    ties: tuple  # (density, lambda) pairs
    dare: tuple  # (p, lambda) pairs
    sp_steps: int
    sp_batches: int  # probe batches per task
    sp_batch_size: int
    samples: int  # resamples of the paired tests


SCALES = {
    "smoke": Scale(sts_pairs=500, scifact_docs=300, msmarco_docs=200, heldout_docs=200, heldout_relevant=80,
                   max_length=128, t_grid=(0.25, 0.5, 0.75), ta_lambdas=(0.5, 1.0, 1.5),
                   ties=((0.2, 0.5), (0.2, 1.0), (0.2, 1.5)), dare=((0.9, 0.5), (0.9, 1.0), (0.9, 1.5)),
                   sp_steps=10, sp_batches=4, sp_batch_size=8, samples=10_000),
    "full": Scale(sts_pairs=None, scifact_docs=None, msmarco_docs=None, heldout_docs=None, heldout_relevant=10**9,
                  max_length=256,
                  t_grid=tuple(round(0.1 * i, 1) for i in range(1, 10)), ta_lambdas=(0.5, 0.75, 1.0, 1.25, 1.5),
                  ties=tuple((d, lam) for d in (0.2, 0.5) for lam in (0.5, 1.0, 1.5)),
                  dare=tuple((p, lam) for p in (0.5, 0.9) for lam in (0.5, 1.0)), sp_steps=200, sp_batches=64,
                  sp_batch_size=32, samples=10_000),
    # A minutes-long run of the whole pipeline on tiny sets: a check of the code, not a result.
    "check": Scale(sts_pairs=100, scifact_docs=300, msmarco_docs=100, heldout_docs=100, heldout_relevant=40,
                   max_length=128,
                   t_grid=(0.5,), ta_lambdas=(1.0,), ties=((0.2, 1.0),), dare=((0.9, 1.0),), sp_steps=2, sp_batches=2,
                   sp_batch_size=4, samples=200),
}


# ---------------------------------------------------------------- evaluation sets


def sample_corpus(corpus: dict, qrels: dict, size: int | None, seed: int, keep=()):
    """``(corpus, qrels)`` restricted to ``keep`` plus seeded random documents up to ``size``
    (None: unchanged); qrels keep only those documents and queries that still have a relevant one."""
    if size is None:
        return corpus, qrels
    keep = sorted(set(keep))
    if len(keep) > size:
        raise ValueError(f"{len(keep)} documents must be kept but the sub-corpus holds {size}")
    rest = sorted(set(corpus) - set(keep))
    rng = np.random.default_rng(seed)
    chosen = set(keep) | {rest[i] for i in rng.choice(len(rest), size - len(keep), replace=False)}
    sub = {d: corpus[d] for d in corpus if d in chosen}
    sub_qrels = {q: {d: g for d, g in docs.items() if d in chosen} for q, docs in qrels.items()}
    return sub, {q: docs for q, docs in sub_qrels.items() if any(g > 0 for g in docs.values())}


def sample_pairs(sts, size: int | None, seed: int):
    """``(s1, s2, gold)`` of a seeded random ``size`` of the pairs, in file order (None: all). The file is
    sorted by genre (captions, news, forums), so its first N pairs would be one genre."""
    s1, s2, gold = sts
    if size is None:
        return s1, s2, gold
    if size > len(s1):
        raise ValueError(f"{size} STS pairs requested but the split holds {len(s1)}")
    idx = np.sort(np.random.default_rng(seed).choice(len(s1), size, replace=False))
    return [s1[i] for i in idx], [s2[i] for i in idx], [gold[i] for i in idx]


def relevant_docs(qrels: dict) -> set:
    return {d for docs in qrels.values() for d, g in docs.items() if g > 0}


@dataclasses.dataclass
class RetrievalSet:
    name: str
    corpus: dict
    queries: dict
    qrels: dict

    @property
    def query_ids(self) -> list:
        return [q for q in sorted(self.qrels) if any(g > 0 for g in self.qrels[q].values())]

    def describe(self) -> dict:
        return {"documents": len(self.corpus), "queries": len(self.query_ids)}


def evaluation_sets(data: pathlib.Path, scale: Scale):
    s1, s2, gold = sample_pairs(ej.data.read_sts(data / "stsb" / "sts-test.csv"), scale.sts_pairs, seed=0)
    corpus, queries, qrels = ej.data.read_beir(data / "scifact", split="test")
    sub, sub_qrels = sample_corpus(corpus, qrels, scale.scifact_docs, seed=0, keep=relevant_docs(qrels))
    scifact = RetrievalSet("scifact", sub, queries, sub_qrels)
    corpus, queries, qrels = ej.data.read_beir(data / "msmarco")
    sub, sub_qrels = sample_corpus(corpus, qrels, scale.msmarco_docs, seed=0)
    msmarco = RetrievalSet("msmarco", sub, queries, sub_qrels)
    return (s1, s2, np.asarray(gold, np.float64)), [scifact, msmarco]


def heldout_sets(data: pathlib.Path, scale: Scale):
    """STS-B dev and an nfcorpus dev sub-corpus: the greedy soup's held-out data (never a test split)."""
    s1, s2, gold = sample_pairs(ej.data.read_sts(data / "stsb" / "sts-dev.csv"), scale.sts_pairs, seed=1)
    corpus, queries, qrels = ej.data.read_beir(data / "nfcorpus", split="dev")
    rng = np.random.default_rng(1)
    chosen, keep = {}, set()
    for q in [sorted(qrels)[i] for i in rng.permutation(len(qrels))]:
        docs = {d for d, g in qrels[q].items() if g > 0}
        if docs and len(keep | docs) <= scale.heldout_relevant:
            chosen[q], keep = qrels[q], keep | docs
    sub, sub_qrels = sample_corpus(corpus, chosen, scale.heldout_docs, seed=1, keep=keep)
    return (s1, s2, np.asarray(gold, np.float64)), RetrievalSet("nfcorpus-dev", sub, queries, sub_qrels)


# ---------------------------------------------------------------- scoring one model


def params_key(params) -> str:
    digest = hashlib.sha256()
    hash_params(digest, params)
    return digest.hexdigest()[:16]


def sts_eval(enc, sts, cache: pathlib.Path, name: str) -> dict:
    s1, s2, gold = sts
    unique = list(dict.fromkeys([*s1, *s2]))
    emb = cached_encode(enc, unique, cache, name=name)
    row = {s: i for i, s in enumerate(unique)}
    a, b = emb[[row[s] for s in s1]], emb[[row[s] for s in s2]]
    scores = sts_scores(a, b, gold)
    return {"spearman": scores["spearman_cosine"], "pearson": scores["pearson_cosine"],
            "cosine": pair_similarities(a, b)["cosine"].tolist()}


def retrieval_eval(enc, ret: RetrievalSet, cache: pathlib.Path) -> dict:
    qids, dids = ret.query_ids, list(ret.corpus)
    q = cached_encode(enc, [ret.queries[x] for x in qids], cache, name=f"{ret.name}-queries")
    d = cached_encode(enc, [document_text(ret.corpus[x]) for x in dids], cache, name=f"{ret.name}-corpus")
    m = retrieval_from_embeddings(q, d, qids, dids, ret.qrels, (10, 100), per_query=True)
    return {"ndcg@10": m["ndcg@10"], "recall@100": m["recall@100"],
            "per_query_ndcg@10": [m["per_query"]["ndcg@10"][x] for x in qids]}


def evaluate(enc, params, name: str, sts, retrieval_sets, workdir: pathlib.Path) -> dict:
    """Scores of one model, computed once: WORKDIR/evals/NAME.json is reused while the weights match."""
    key = params_key(params)
    path = workdir / "evals" / f"{slug(name)}.json"
    if path.is_file():
        record = json.loads(path.read_text())
        if record["params"] == key:
            return record
    enc.params = params
    cache = workdir / "embeddings"
    record = {"name": name, "params": key, "commit": provenance.git_commit(),
              "stsb": sts_eval(enc, sts, cache, "stsb-test")}
    for ret in retrieval_sets:
        record[ret.name] = retrieval_eval(enc, ret, cache)
    print(json.dumps({"evaluated": name, "stsb": record["stsb"]["spearman"],
                      **{r.name: record[r.name]["ndcg@10"] for r in retrieval_sets}}), flush=True)
    write_json(path, record)
    return record


def finished_point(workdir: pathlib.Path, name: str, merge_record: dict) -> dict | None:
    """The evaluation of grid point ``name`` when one exists for the same method, setting and input
    models (``merge_record``): the point then needs neither merging nor encoding."""
    path = workdir / "evals" / f"{slug(name)}.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if record.get("merge") == merge_record else None


def heldout_score(enc, params, sts, ret: RetrievalSet, workdir: pathlib.Path) -> dict:
    """Greedy soup's held-out score: mean of STS-B dev Spearman and nfcorpus dev nDCG@10 (cached)."""
    key = params_key(params)
    path = workdir / "heldout" / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    enc.params = params
    cache = workdir / "embeddings"
    sts_part = sts_eval(enc, sts, cache, "stsb-dev")["spearman"]
    ret_part = retrieval_eval(enc, ret, cache)["ndcg@10"]
    record = {"params": key, "stsb_dev_spearman": sts_part, "nfcorpus_dev_ndcg@10": ret_part,
              "score": 0.5 * (sts_part + ret_part)}
    write_json(path, record)
    return record


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._=-" else "_" for c in name)


def write_json(path: pathlib.Path, record) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, default=float))
    os.replace(tmp, path)


# ---------------------------------------------------------------- Self Positioning probe


def probe_batches(data: pathlib.Path, enc, scale: Scale):
    """Two balanced probe tasks from training splits only: STS-B train pairs (CoSENT) and
    retrieval pairs alternating scifact train and nfcorpus train batches (InfoNCE; distinct
    queries within a batch, one relevant document each)."""
    from embedjax.data.tokenization import Tokenizer

    short = Tokenizer.from_folder(enc.source, 64, needs=enc.family.tokenizer)
    long = Tokenizer.from_folder(enc.source, 128, needs=enc.family.tokenizer)
    rng = np.random.default_rng(2)
    n, b = scale.sp_batches, scale.sp_batch_size
    s1, s2, gold = ej.data.read_sts(data / "stsb" / "sts-train.csv")
    sts_batches = []
    for _ in range(n):
        idx = rng.choice(len(s1), b, replace=False)
        sts_batches.append({"a": short.pad(short.token_ids([s1[i] for i in idx]), length=64),
                            "b": short.pad(short.token_ids([s2[i] for i in idx]), length=64),
                            "score": np.asarray([gold[i] for i in idx], np.float32)})
    pools = {}
    for name in ("scifact", "nfcorpus"):
        corpus, queries, qrels = ej.data.read_beir(data / name, split="train")
        pools[name] = (corpus, queries, {q: sorted(d for d, g in docs.items() if g > 0) for q, docs in qrels.items()})
    retrieval_batches = []
    for i in range(n):
        corpus, queries, qrels = pools["scifact" if i % 2 == 0 else "nfcorpus"]
        qids = [q for q in sorted(qrels) if qrels[q]]
        chosen = [qids[j] for j in rng.choice(len(qids), b, replace=False)]
        docs = [qrels[q][rng.integers(len(qrels[q]))] for q in chosen]
        retrieval_batches.append({"q": short.pad(short.token_ids([queries[q] for q in chosen]), length=64),
                                  "d": long.pad(long.token_ids([document_text(corpus[d]) for d in docs]), length=128)})
    return [sts_batches, retrieval_batches]


def probe_losses(enc) -> list[Callable]:
    def sts_loss(params, batch):
        a = enc.embed_fn(params, batch["a"])
        b = enc.embed_fn(params, batch["b"])
        return ej.losses.cosent(a, b, batch["score"], scale=20.0)

    def retrieval_loss(params, batch):
        return ej.losses.infonce(enc.embed_fn(params, batch["q"]), enc.embed_fn(params, batch["d"]), temperature=0.05)

    return [sts_loss, retrieval_loss]


# ---------------------------------------------------------------- the merges


def merge_grid(scale: Scale, base, stsb, retr, stacked) -> list[tuple[str, str, dict, Callable]]:
    """(name, method, setting, build) for every grid merge; t and lambda weigh the retrieval parent."""
    out = []
    for t in scale.t_grid:
        out.append((f"soup t={t}", "soup", {"t": t}, lambda t=t: merge.soup([stsb, retr], [1 - t, t])))
    for t in scale.t_grid:
        out.append((f"slerp t={t}", "slerp", {"t": t}, lambda t=t: merge.slerp(stsb, retr, t, stacked=stacked)))
    for lam in scale.ta_lambdas:
        out.append((f"task_arithmetic lambda={lam}", "task_arithmetic", {"lambda": lam},
                    lambda lam=lam: merge.task_arithmetic(base, [stsb, retr], lam)))
    for density, lam in scale.ties:
        out.append((f"ties density={density} lambda={lam}", "ties", {"density": density, "lambda": lam},
                    lambda d=density, lam=lam: merge.ties(base, [stsb, retr], d, scale=lam, stacked=stacked)))
    for p, lam in scale.dare:
        out.append((f"dare p={p} lambda={lam}", "dare", {"p": p, "lambda": lam, "seed": 0},
                    lambda p=p, lam=lam: merge.dare(base, [stsb, retr], p, seed=0, lambdas=lam)))
    return out


def round_robin(grid: list) -> list:
    """The grid reordered one point per method in turn (each method's values in order), so that a
    sweep stopped part-way has points on every method's curve."""
    by_method: dict = {}
    for item in grid:
        by_method.setdefault(item[1], []).append(item)
    out, depth = [], max(len(v) for v in by_method.values())
    for i in range(depth):
        out += [items[i] for items in by_method.values() if i < len(items)]
    return out


def grid_value(setting: dict) -> float:
    """The swept value of a grid point: t for soup / SLERP, lambda for the others."""
    return setting["t"] if "t" in setting else setting["lambda"]


def paired_tests(record: dict, parent: dict, gold, samples: int, cache: pathlib.Path | None = None) -> dict:
    """Paired tests of ``record`` against ``parent`` on every set; kept in ``cache`` (a folder) by
    the two models' weight hashes, because the artifact is rewritten after every model and the
    STS bootstrap (10,000 rank correlations of 500 pairs) would otherwise be redone for every row."""
    path = cache / f"{record['params']}-vs-{parent['params']}-{samples}.json" if cache is not None else None
    if path is not None and path.is_file():
        return json.loads(path.read_text())
    out = {"stsb": significance.paired_bootstrap_correlation_test(
        parent["stsb"]["cosine"], record["stsb"]["cosine"], gold, num_samples=samples, seed=0)}
    for name in RETRIEVAL_SETS:
        out[name] = significance.paired_permutation_test(parent[name]["per_query_ndcg@10"],
                                                         record[name]["per_query_ndcg@10"], num_samples=samples, seed=0)
    tests = {k: {"difference": v["mean_difference"], "p_value": v["p_value"], "ci_low": v["ci_low"],
                 "ci_high": v["ci_high"]} for k, v in out.items()}
    if path is not None:
        write_json(path, tests)
    return tests


def row(name: str, method: str, setting: dict, record: dict, parents: dict, gold, samples: int,
        cache: pathlib.Path | None = None) -> dict:
    out = {"name": name, "method": method, "setting": setting, "params": record["params"],
           "stsb_spearman": record["stsb"]["spearman"],
           **{f"{s}_ndcg@10": record[s]["ndcg@10"] for s in RETRIEVAL_SETS},
           **{f"{s}_recall@100": record[s]["recall@100"] for s in RETRIEVAL_SETS},
           "tests": {}}
    for parent_name, parent in parents.items():
        if parent["params"] != record["params"]:
            out["tests"][f"vs_{parent_name}"] = paired_tests(record, parent, gold, samples, cache)
    return out


# ---------------------------------------------------------------- report


def fmt_test(test: dict | None) -> str:
    if test is None:
        return "—"
    return f"{test['difference']:+.2f} (p {test['p_value']:.3f})"


def table(rows: list[dict], artifact: str) -> str:
    lines = ["| model | STS-B test Spearman | vs S | vs R | scifact nDCG@10 | vs S | vs R | msmarco nDCG@10 | vs S | "
             "vs R | artifact |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for i, r in enumerate(rows):
        s, rp = r["tests"].get("vs_stsb_parent", {}), r["tests"].get("vs_retrieval_parent", {})
        cells = [r["name"]]
        for metric, value in (("stsb", r["stsb_spearman"]), ("scifact", r["scifact_ndcg@10"]),
                              ("msmarco", r["msmarco_ndcg@10"])):
            cells += [f"{value:.2f}", fmt_test(s.get(metric)), fmt_test(rp.get(metric))]
        lines.append("| " + " | ".join(cells) + f" | [json]({artifact}#/rows/{i}) |")
    return "\n".join(lines)


def plot(rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {r["name"]: r for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for ax, metric, label in zip(axes, ("scifact_ndcg@10", "msmarco_ndcg@10"),
                                 ("scifact test nDCG@10 (sub-corpus)", "msmarco nDCG@10 (sub-corpus)")):
        for method, marker in (("soup", "o"), ("slerp", "s"), ("task_arithmetic", "^"), ("ties", "D"),
                               ("dare", "v")):
            pts = sorted([r for r in rows if r["method"] == method], key=lambda r: grid_value(r["setting"]))
            if not pts:
                continue
            # soup / SLERP: a path from the STS parent (t = 0) to the retrieval parent (t = 1);
            # task arithmetic / TIES / DARE: a path from the base (lambda = 0) outwards.
            ends = ([by["stsb_parent"]], [by["retrieval_parent"]]) if method in ("soup", "slerp") else ([by["base"]], [])
            curve = [*ends[0], *pts, *ends[1]]
            line, = ax.plot([r["stsb_spearman"] for r in curve], [r[metric] for r in curve], marker=marker,
                            label=f"{method} ({'t' if method in ('soup', 'slerp') else 'lambda'})", alpha=0.8)
            for r in pts:
                ax.annotate(f"{grid_value(r['setting']):g}", (r["stsb_spearman"], r[metric]), fontsize=6,
                            color=line.get_color(), xytext=(3, 3), textcoords="offset points")
        for name, marker, color in (("base", "*", "black"), ("stsb_parent", "P", "tab:red"),
                                    ("retrieval_parent", "X", "tab:blue"), ("self_positioning", "h", "tab:green"),
                                    ("greedy_soup", "p", "tab:purple")):
            if name in by:
                ax.scatter(by[name]["stsb_spearman"], by[name][metric], marker=marker, s=140, color=color,
                           label=name, zorder=5)
        ax.set_xlabel("STS-B test Spearman x100")
        ax.set_ylabel(label + " x100")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle("Merging the STS-B parent with the retrieval parent (all-MiniLM-L6-v2 base)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------- main


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--scale", default="smoke", choices=sorted(SCALES))
    parser.add_argument("--stsb-parent", default="runs/merging/parents/stsb/export")
    parser.add_argument("--retrieval-parent", default="runs/merging/parents/retrieval/export")
    parser.add_argument("--data-dir", default=os.environ.get("EMBEDJAX_DATA_DIR", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--out-dir", default=str(HERE))
    parser.add_argument("--only", nargs="+", default=None, choices=["base", "stsb_parent"],
                        help="evaluate only these models (e.g. while the retrieval parent trains); no artifact")
    args = parser.parse_args(argv)
    scale = SCALES[args.scale]
    data, workdir, out_dir = pathlib.Path(args.data_dir), pathlib.Path(args.workdir), pathlib.Path(args.out_dir)

    from embedjax.merge_cli import check_same_model_kind, layer_stacking, read_model

    enc = ej.Encoder.from_pretrained("minilm", max_length=scale.max_length)
    sts, retrieval_sets = evaluation_sets(data, scale)
    gold = sts[2]
    if args.only:
        paths = {"base": "minilm", "stsb_parent": args.stsb_parent}
        for name in args.only:
            evaluate(enc, read_model(paths[name]).params, name, sts, retrieval_sets, workdir)
        print(json.dumps({"evaluated": args.only}))
        return
    folders = {"base": read_model("minilm"), "stsb_parent": read_model(args.stsb_parent),
               "retrieval_parent": read_model(args.retrieval_parent)}
    check_same_model_kind(list(folders.values()), list(folders))
    base, stsb, retr = (folders[k].params for k in ("base", "stsb_parent", "retrieval_parent"))
    stacked = layer_stacking(folders["base"])

    inputs = {k: params_key(folders[k].params) for k in ("base", "stsb_parent", "retrieval_parent")}
    records, models = {}, []  # models: (name, method, setting)
    extra = {"self_positioning_losses": None, "heldout_scores": None}
    grid = merge_grid(scale, base, stsb, retr, stacked)
    expected = 3 + len(grid) + 2  # + Self Positioning, greedy soup
    # the table's row order, grouped by method (the sweep itself runs the grid round robin)
    order = ["base", "stsb_parent", "retrieval_parent", *[g[0] for g in grid], "self_positioning", "greedy_soup"]

    def add(name, method, setting, record):
        records[name] = record
        models.append((name, method, setting))
        if "retrieval_parent" in records:  # the artifact after every model: a stopped run keeps its rows
            ranked = sorted(models, key=lambda m: order.index(m[0]))
            write_outputs(args, scale, folders, records, ranked, retrieval_sets, gold, extra, out_dir,
                          complete=len(models) == expected)

    def run(name, method, setting, params):
        add(name, method, setting, evaluate(enc, params, name, sts, retrieval_sets, workdir))

    def grid_point(name, method, setting, build):
        merge_record = {"method": method, "setting": setting, "inputs": inputs}
        done = finished_point(workdir, name, merge_record)
        if done is not None:
            print(json.dumps({"skipped": name, "reason": "evaluated in an earlier sitting"}), flush=True)
            add(name, method, setting, done)
            return
        record = {**evaluate(enc, build(), name, sts, retrieval_sets, workdir), "merge": merge_record}
        write_json(workdir / "evals" / f"{slug(name)}.json", record)
        add(name, method, setting, record)

    def self_positioning_point():
        """Lambdas learned on the training-split probe set, then evaluated like the rest."""
        sp_path = workdir / "self_positioning.json"
        if sp_path.is_file():
            sp = json.loads(sp_path.read_text())
        else:
            enc.params = base
            result = merge.self_positioning(base, [stsb, retr], probe_batches(data, enc, scale), probe_losses(enc),
                                            steps=scale.sp_steps, learning_rate=0.05, init=0.5, optimizer="adam",
                                            progress=True)
            sp = {"lambdas": result.lambdas.tolist(), "losses": result.losses.tolist()}
            write_json(sp_path, sp)
        extra["self_positioning_losses"] = sp["losses"]
        sp_setting = {"lambda_stsb": sp["lambdas"][0], "lambda_retrieval": sp["lambdas"][1], "steps": scale.sp_steps,
                      "optimizer": "adam", "learning_rate": 0.05, "init": 0.5,
                      "probe": f"{scale.sp_batches} + {scale.sp_batches} batches of {scale.sp_batch_size} pairs",
                      "probe_loss_first": sp["losses"][0], "probe_loss_last": sp["losses"][-1]}
        run("self_positioning", "self_positioning", sp_setting,
            merge.task_arithmetic(base, [stsb, retr], sp["lambdas"]))

    def greedy_soup_point():
        """Greedy soup over (base, STS parent, retrieval parent) on held-out data."""
        held_sts, held_ret = heldout_sets(data, scale)
        held = {}

        def score(params):
            record = heldout_score(enc, params, held_sts, held_ret, workdir)
            held[record["params"]] = record
            return record["score"]

        ingredients = ["base", "stsb_parent", "retrieval_parent"]
        greedy = merge.greedy_soup([folders[k].params for k in ingredients], score)
        greedy_setting = {"kept": [ingredients[i] for i in greedy.kept],
                          "heldout_scores": dict(zip(ingredients, greedy.scores)),
                          "soup_scores": list(greedy.soup_scores),
                          "heldout": {"stsb_dev_pairs": len(held_sts[0]), "nfcorpus_dev": held_ret.describe()}}
        extra["heldout_scores"] = list(held.values())
        run("greedy_soup", "greedy_soup", greedy_setting, greedy.params)

    # Run order: what earlier sittings evaluated first (cheap: their scores are on disk), so the
    # artifact holds every finished model early; then the new grid points, one method at a time.
    for name in ("base", "stsb_parent", "retrieval_parent"):
        run(name, name, {}, folders[name].params)
    points = round_robin(grid)
    earlier = [g for g in points if (workdir / "evals" / f"{slug(g[0])}.json").is_file()]
    for point in earlier:
        grid_point(*point)
    self_positioning_point()
    greedy_soup_point()
    for point in points:
        if point not in earlier:
            grid_point(*point)

    print(json.dumps({"out": str(out_dir / "results.json"), "models": len(models), "complete": len(models) == expected}))


def write_outputs(args, scale: Scale, folders: dict, records: dict, models: list, retrieval_sets, gold, extra: dict,
                  out_dir: pathlib.Path, *, complete: bool) -> None:
    """results.json (the artifact), table.md and tradeoff.png from the models evaluated so far."""
    parents = {"stsb_parent": records["stsb_parent"], "retrieval_parent": records["retrieval_parent"]}
    cache = pathlib.Path(args.workdir) / "tests"
    rows = [row(name, method, setting, records[name], parents, gold, scale.samples, cache)
            for name, method, setting in models]
    out_dir.mkdir(parents=True, exist_ok=True)
    artifact = out_dir / "results.json"
    parent_runs = {k: {"folder": str(folders[k].path)} for k in ("stsb_parent", "retrieval_parent")}
    for k in parent_runs:
        summary = folders[k].path.parent / "summary.json"
        if summary.is_file():
            s = json.loads(summary.read_text())
            parent_runs[k].update({"status": s.get("status"), "num_steps": s.get("num_steps"),
                                   "final_loss": s.get("final_loss")})
        info = folders[k].path / "export_info.json"  # a folder exported from a checkpoint (export_checkpoint.py)
        if info.is_file():
            parent_runs[k]["exported_from"] = json.loads(info.read_text())
    provenance.write_artifact(artifact, {
        "scale": args.scale, "settings": dataclasses.asdict(scale), "complete": complete,
        "evaluation": {"stsb": {"file": "stsb/sts-test.csv", "pairs": len(gold)},
                       **{r.name: r.describe() for r in retrieval_sets}, "max_length": scale.max_length,
                       "sub_corpora": "scifact: every abstract judged relevant to a test query + seeded random ones; "
                                      "msmarco: seeded random passages, qrels restricted to them (seed 0)"},
        "significance": f"vs each parent: STS-B by a paired bootstrap of the Spearman difference over pairs, "
                        f"scifact and msmarco by a paired permutation test of per-query nDCG@10; {scale.samples} "
                        "resamples, two-sided, uncorrected for the many comparisons",
        "parents": parent_runs, "eval_commits": sorted({records[n]["commit"] for n, _, _ in models}),
        **extra, "rows": rows})
    text = table(rows, artifact.name)
    (out_dir / "table.md").write_text(text + "\n")
    plot(rows, out_dir / "tradeoff.png")
    print(text, flush=True)


if __name__ == "__main__":
    main()

"""A filtered-search benchmark built from real transformer embeddings (issue 19).

    python -m embedjax filtered-benchmark --out experiments/filtered_search/dataset

One corpus of 13,816 documents (the scifact, nfcorpus and msmarco corpora of the
shared data, in that order, rows in file order) and 666 queries (the test-split
queries with a relevant judgement: scifact 300, nfcorpus 323, msmarco 43), all
embedded with all-MiniLM-L6-v2 (mean pooling, unit norm; documents as
``title + " " + text``).

Attributes of every document (``embedjax.index.attributes.Attributes``):

* real: ``source`` (categorical: scifact / nfcorpus / msmarco), ``length_bucket``
  (categorical, whitespace words of title + text: 0 = < 64, 1 = 64-159, 2 = 160-239,
  3 = >= 240; roughly quartiles), ``title_present`` (categorical 0/1; in this corpus
  it coincides with ``source != msmarco``: every scifact and nfcorpus document has a
  title, no msmarco passage has one);
* synthetic, with controlled selectivity: ``tenant_1pct`` / ``tenant_10pct`` /
  ``tenant_50pct`` (categorical with 100 / 10 / 2 values, balanced: every value owns
  N / values rows up to one, assigned by a seeded permutation, independent of the
  text) and ``timestamp`` (numeric, the ranks of a seeded permutation scaled to
  [0, 1)).

Workloads: one predicate per query (``WORKLOADS``): no filter; the query's own
source (correlated with relevance); a random length bucket; title present; a
random tenant at 1 / 10 / 50 %; a timestamp range of width 1 / 10 / 50 % at a
random offset; own source AND a random 10 % tenant; and a random 1 % tenant AND a
random 10 % timestamp range (~0.1 %, where some queries pass fewer than 10 rows). Ground truth is exact
filtered search in float64 NumPy (score descending, ties -> smaller row), top
``GT_K`` per (workload, query), padded with -1 when fewer rows pass.

Artifacts (small, committed): ``manifest.json`` (sizes, seeds, hashes, the
workloads and their measured selectivities), ``attributes.npz``,
``predicates.npz`` (per workload and query: attribute bounds) and
``ground_truth.npz``. The embeddings themselves (21 MB) are cached outside the
repository (``$EMBEDJAX_CACHE_DIR`` or ``~/.cache/embedjax``, under
``filtered_benchmark/``) keyed by a hash of the texts and the model; the manifest
records their SHA-256 so a reader knows the cache matches the ground truth.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import pathlib
import sys
import time

import numpy as np

CORPORA = ("scifact", "nfcorpus", "msmarco")
LENGTH_EDGES = (64, 160, 240)  # whitespace words: bucket b holds lengths in [edge[b-1], edge[b])
TENANTS = {"tenant_1pct": 100, "tenant_10pct": 10, "tenant_50pct": 2}
RANGE_WIDTHS = {"range_1pct": 0.01, "range_10pct": 0.10, "range_50pct": 0.50}
GT_K = 10
SEED = 19
FORMAT_VERSION = 1

# Workload name -> what each query's predicate is (built in `workload_predicates`).
WORKLOADS = {
    "none": "no filter",
    "source_same": "source == the query's own corpus",
    "length_bucket": "length_bucket == a random bucket (per query)",
    "title_present": "title_present == 1",
    "tenant_1pct": "tenant_1pct == a random tenant (per query)",
    "tenant_10pct": "tenant_10pct == a random tenant (per query)",
    "tenant_50pct": "tenant_50pct == a random tenant (per query)",
    "range_1pct": "timestamp in [t, t + 0.01) at a random t (per query)",
    "range_10pct": "timestamp in [t, t + 0.10) at a random t (per query)",
    "range_50pct": "timestamp in [t, t + 0.50) at a random t (per query)",
    "source_same_and_tenant_10pct": "source == own corpus AND tenant_10pct == a random tenant",
    "tenant_1pct_and_range_10pct": "tenant_1pct == a random tenant AND timestamp in a random 10 % range "
                                   "(~0.1 %: ~14 rows, some queries have fewer than 10)",
}


def default_cache_dir() -> pathlib.Path:
    root = os.environ.get("EMBEDJAX_CACHE_DIR")
    base = pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "embedjax"
    return base / "filtered_benchmark"


# ------------------------------------------------------------------ texts


@dataclasses.dataclass(frozen=True)
class BenchmarkTexts:
    doc_source: np.ndarray  # int [N] index into CORPORA
    doc_ids: list  # "corpus/id" strings [N]
    doc_texts: list  # title + " " + text [N]
    doc_has_title: np.ndarray  # bool [N]
    query_source: np.ndarray  # int [Q]
    query_ids: list  # "corpus/id" [Q]
    query_texts: list  # [Q]


def read_benchmark_texts(data_dir) -> BenchmarkTexts:
    """Documents and test queries of the three corpora, in a fixed order."""
    from embedjax.data.readers import read_beir
    from embedjax.eval.retrieval import document_text

    data_dir = pathlib.Path(data_dir)
    doc_source, doc_ids, doc_texts, has_title = [], [], [], []
    q_source, q_ids, q_texts = [], [], []
    for c, name in enumerate(CORPORA):
        if not (data_dir / name).is_dir():
            raise FileNotFoundError(f"{data_dir / name} is missing; point --data-dir (or EMBEDJAX_DATA_DIR) at "
                                    "the shared data folder")
        corpus, queries, qrels = read_beir(data_dir / name, split="test")
        for doc_id, doc in corpus.items():
            doc_source.append(c)
            doc_ids.append(f"{name}/{doc_id}")
            doc_texts.append(document_text(doc))
            has_title.append(bool((doc.get("title") or "").strip()))
        for qid, text in queries.items():
            if any(g > 0 for g in qrels.get(qid, {}).values()):
                q_source.append(c)
                q_ids.append(f"{name}/{qid}")
                q_texts.append(text)
    return BenchmarkTexts(np.asarray(doc_source), doc_ids, doc_texts, np.asarray(has_title),
                          np.asarray(q_source), q_ids, q_texts)


def _sha256_of_strings(strings) -> str:
    digest = hashlib.sha256()
    for s in strings:
        digest.update(s.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()


# Scores of unit vectors: float32 rounding of a score is ~6e-8; the vectors encoded on a 2-core AMD EPYC
# move the ground-truth scores computed on a Xeon by at most 4.4e-7;
# 2e-5 leaves room for other CPUs and still refuses vectors moved by 1e-3 per component (tested).
GT_SCORE_TOLERANCE = 2e-5


def array_sha256(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    return hashlib.sha256(str(a.dtype).encode() + str(a.shape).encode() + a.tobytes()).hexdigest()


# ------------------------------------------------------------------ embeddings


def embed_cached(texts: BenchmarkTexts, cache_dir=None, encoder=None, batch_size: int = 64):
    """MiniLM embeddings ``(docs float32 [N, 384], queries float32 [Q, 384])``, cached on disk.

    The cache file name holds a hash of every text and of the encoder's settings, so a
    changed text or model never reads a stale file. Encoding the corpus took 765 s on a
    2-core AMD EPYC (13,816 documents, 666 queries); later calls load the file.
    """
    import embedjax as ej
    from embedjax.models.pretrained import minilm_path

    cache = pathlib.Path(cache_dir) if cache_dir else default_cache_dir()
    source = str(minilm_path()) if encoder is None else str(encoder.source)
    model_tag = f"{pathlib.Path(source).name}"
    key = _sha256_of_strings(texts.doc_texts + ["|queries|"] + texts.query_texts + [model_tag])[:16]
    path = cache / f"minilm-{key}.npz"
    if path.exists():
        stored = np.load(path)
        return stored["docs"], stored["queries"]
    if encoder is None:
        encoder = ej.Encoder.from_pretrained(minilm_path())
    start = time.perf_counter()
    queries = encoder.encode(texts.query_texts, batch_size=batch_size, show_progress=True)
    docs = encoder.encode(texts.doc_texts, batch_size=batch_size, show_progress=True)
    print(f"encoded {len(texts.doc_texts)} documents and {len(texts.query_texts)} queries in "
          f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, docs=docs, queries=queries)
    os.replace(tmp, path)
    return docs, queries


# ------------------------------------------------------------------ attributes and workloads


def benchmark_attributes(texts: BenchmarkTexts, seed: int = SEED):
    """The real and synthetic attributes of every document (module docstring)."""
    from embedjax.index.attributes import Attributes

    n = len(texts.doc_ids)
    words = np.asarray([len(t.split()) for t in texts.doc_texts])
    rng = np.random.default_rng(seed)
    categorical = {
        "source": np.asarray(CORPORA)[texts.doc_source],
        "length_bucket": np.searchsorted(LENGTH_EDGES, words, side="right"),
        "title_present": texts.doc_has_title.astype(np.int64),
    }
    for name, values in TENANTS.items():
        column = np.empty(n, np.int64)
        column[rng.permutation(n)] = np.arange(n) % values  # balanced: every tenant owns n / values rows (+-1)
        categorical[name] = column
    timestamp = rng.permutation(n) / n  # distinct ranks in [0, 1): a width-w range holds ~w * n rows
    return Attributes.from_columns(categorical=categorical, numeric={"timestamp": timestamp})


def workload_predicates(texts: BenchmarkTexts, seed: int = SEED) -> dict:
    """Workload name -> one predicate per query (None = unfiltered), drawn with ``seed``."""
    from embedjax.index.attributes import Eq, Range

    q = len(texts.query_ids)
    rng = np.random.default_rng(seed + 1)
    own = [Eq("source", CORPORA[s]) for s in texts.query_source]
    out = {
        "none": [None] * q,
        "source_same": own,
        "length_bucket": [Eq("length_bucket", int(b)) for b in rng.integers(0, len(LENGTH_EDGES) + 1, q)],
        "title_present": [Eq("title_present", 1)] * q,
    }
    for name, values in TENANTS.items():
        out[name] = [Eq(name, int(v)) for v in rng.integers(0, values, q)]
    for name, width in RANGE_WIDTHS.items():
        out[name] = [Range("timestamp", float(t), float(t) + width) for t in rng.uniform(0, 1 - width, q)]
    out["source_same_and_tenant_10pct"] = [p & Eq("tenant_10pct", int(v))
                                           for p, v in zip(own, rng.integers(0, TENANTS["tenant_10pct"], q))]
    width = RANGE_WIDTHS["range_10pct"]
    out["tenant_1pct_and_range_10pct"] = [
        Eq("tenant_1pct", int(v)) & Range("timestamp", float(t), float(t) + width)
        for v, t in zip(rng.integers(0, TENANTS["tenant_1pct"], q), rng.uniform(0, 1 - width, q))]
    assert list(out) == list(WORKLOADS)
    return out


def exact_filtered_topk(q_qd, d_nd, masks_qn, k: int, batch: int = 256):
    """Exact filtered top-k in float64 NumPy: (scores float32 [Q, k], ids int32 [Q, k]).

    Score descending, ties -> smaller row; rows failing ``masks_qn`` (bool [Q, N] or [1, N])
    never appear; fewer than k passing rows -> id -1, score -inf.
    """
    q64, d64 = np.asarray(q_qd, np.float64), np.asarray(d_nd, np.float64)
    masks = np.broadcast_to(np.asarray(masks_qn, bool), (q64.shape[0], d64.shape[0]))
    scores, ids = [], []
    for start in range(0, q64.shape[0], batch):
        s = np.where(masks[start:start + batch], q64[start:start + batch] @ d64.T, -np.inf)
        rows = np.broadcast_to(np.arange(d64.shape[0]), s.shape)
        order = np.lexsort((rows, -s), axis=1)[:, :k]
        top = np.take_along_axis(s, order, 1)
        scores.append(top.astype(np.float32))
        ids.append(np.where(np.isfinite(top), order, -1).astype(np.int32))
    return np.concatenate(scores), np.concatenate(ids)


# ------------------------------------------------------------------ artifacts


@dataclasses.dataclass
class FilteredBenchmark:
    """The loaded artifacts: attributes, per-workload filters and exact filtered ground truth."""

    manifest: dict
    attributes: object  # index.attributes.Attributes
    filters: dict  # workload -> index.attributes.AttributeFilter (one predicate per query)
    gt_ids: dict  # workload -> int32 [Q, GT_K]
    gt_scores: dict  # workload -> float32 [Q, GT_K]

    def masks(self, workload: str) -> np.ndarray:
        """bool [Q, N]: the rows each query of ``workload`` may return."""
        return self.filters[workload].masks()


def build(data_dir, out_dir, cache_dir=None, encoder=None) -> dict:
    """Embed (cached), derive attributes and workloads, compute the ground truth, write the artifacts."""
    from embedjax.index.attributes import AttributeFilter

    texts = read_benchmark_texts(data_dir)
    docs, queries = embed_cached(texts, cache_dir, encoder)
    attrs = benchmark_attributes(texts)
    predicates = workload_predicates(texts)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bounds, gt, workloads = {}, {}, {}
    for name, preds in predicates.items():
        flt = AttributeFilter(attrs, preds)
        masks = flt.masks()
        scores, ids = exact_filtered_topk(queries, docs, masks, GT_K)
        passing = masks.sum(axis=1)
        bounds[f"{name}__names"] = np.asarray(flt.names)
        bounds[f"{name}__lo"], bounds[f"{name}__hi"] = flt.lo_qa, flt.hi_qa
        gt[f"{name}__ids"], gt[f"{name}__scores"] = ids, scores
        workloads[name] = {"description": WORKLOADS[name], "mean_selectivity": float(passing.mean() / len(docs)),
                           "min_passing": int(passing.min()), "queries_below_k": int((passing < GT_K).sum())}
    manifest = {
        "format_version": FORMAT_VERSION, "seed": SEED, "corpora": list(CORPORA),
        "num_documents": len(texts.doc_ids), "num_queries": len(texts.query_ids),
        "documents_per_corpus": {c: int((texts.doc_source == i).sum()) for i, c in enumerate(CORPORA)},
        "queries_per_corpus": {c: int((texts.query_source == i).sum()) for i, c in enumerate(CORPORA)},
        "model": "all-MiniLM-L6-v2 (embedjax port, mean pooling, unit norm)", "dim": int(docs.shape[1]),
        "gt_k": GT_K, "length_edges_words": list(LENGTH_EDGES), "tenants": TENANTS, "range_widths": RANGE_WIDTHS,
        "doc_ids_sha256": _sha256_of_strings(texts.doc_ids), "query_ids_sha256": _sha256_of_strings(texts.query_ids),
        "embeddings_sha256": {"documents": array_sha256(docs), "queries": array_sha256(queries)},
        "workloads": workloads,
        "command": "python -m embedjax filtered-benchmark --out experiments/filtered_search/dataset",
    }
    _atomic_npz(out / "predicates.npz", bounds)
    _atomic_npz(out / "ground_truth.npz", gt)
    tmp = out / ".attributes.npz.tmp"
    attrs.save(tmp)
    os.replace(tmp, out / "attributes.npz")
    tmp = out / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, out / "manifest.json")
    return manifest


def _atomic_npz(path: pathlib.Path, arrays: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    os.replace(tmp, path)


def load(out_dir) -> FilteredBenchmark:
    """Read the artifacts ``build`` wrote."""
    from embedjax.index.attributes import AttributeFilter, Attributes

    out = pathlib.Path(out_dir)
    if not (out / "manifest.json").is_file():
        raise FileNotFoundError(f"{out} has no manifest.json; build it with "
                                "`python -m embedjax filtered-benchmark --out {out}`")
    manifest = json.loads((out / "manifest.json").read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{out}/manifest.json has format {manifest.get('format_version')}; rebuild the benchmark")
    attrs = Attributes.load(out / "attributes.npz")
    filters, gt_ids, gt_scores = {}, {}, {}
    with np.load(out / "predicates.npz") as b, np.load(out / "ground_truth.npz") as g:
        for name in manifest["workloads"]:
            filters[name] = AttributeFilter.from_bounds(attrs, tuple(str(n) for n in b[f"{name}__names"]),
                                                        b[f"{name}__lo"], b[f"{name}__hi"])
            gt_ids[name], gt_scores[name] = g[f"{name}__ids"], g[f"{name}__scores"]
    return FilteredBenchmark(manifest, attrs, filters, gt_ids, gt_scores)


def load_embeddings(bench: FilteredBenchmark, data_dir, cache_dir=None, encoder=None,
                    score_tolerance: float = GT_SCORE_TOLERANCE):
    """The benchmark's embeddings ``(docs [N, D], queries [Q, D])`` from the cache (encoding on a miss),
    checked against the manifest so ground truth and vectors always belong together.

    Bit-identical vectors (the manifest's SHA-256) pass at once. Vectors encoded on another
    CPU differ in the last bits (XLA's CPU code generation follows the instruction set), so
    they pass when they reproduce every committed ground-truth score to ``score_tolerance``.
    """
    texts = read_benchmark_texts(data_dir)
    if _sha256_of_strings(texts.doc_ids) != bench.manifest["doc_ids_sha256"]:
        raise ValueError("the shared data's documents differ from the ones the benchmark was built from; rebuild it")
    docs, queries = embed_cached(texts, cache_dir, encoder)
    expected = bench.manifest["embeddings_sha256"]
    if array_sha256(docs) == expected["documents"] and array_sha256(queries) == expected["queries"]:
        return docs, queries
    drift = ground_truth_score_drift(bench, docs, queries)
    if not drift <= score_tolerance:
        raise ValueError(
            f"the cached embeddings differ from the ones the ground truth was computed on (model code or numerics "
            f"changed: ground-truth scores move by up to {drift:.2e}, tolerance {score_tolerance:.0e}); rebuild the "
            "benchmark with `python -m embedjax filtered-benchmark`")
    return docs, queries


def ground_truth_score_drift(bench: FilteredBenchmark, docs_nd, queries_qd) -> float:
    """Largest |float64 score of (query, ground-truth row) - committed score| over every workload
    (inf when the shapes do not match the manifest)."""
    if docs_nd.shape[0] != bench.manifest["num_documents"] or queries_qd.shape[0] != bench.manifest["num_queries"]:
        return float("inf")
    q64, d64 = np.asarray(queries_qd, np.float64), np.asarray(docs_nd, np.float64)
    drift = 0.0
    for workload, ids in bench.gt_ids.items():
        found = ids >= 0
        rows = np.nonzero(found)[0]
        scores = np.einsum("md,md->m", q64[rows], d64[ids[found]])
        drift = max(drift, float(np.max(np.abs(scores - bench.gt_scores[workload][found]), initial=0.0)))
    return drift


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="experiments/filtered_search/dataset", help="artifact folder")
    parser.add_argument("--data-dir", default=None, help="shared data (default: $EMBEDJAX_DATA_DIR)")
    parser.add_argument("--cache-dir", default=None, help="embedding cache (default: $EMBEDJAX_CACHE_DIR/"
                                                          "filtered_benchmark or ~/.cache/embedjax/filtered_benchmark)")


def main(args) -> dict:
    data_dir = args.data_dir or os.environ.get("EMBEDJAX_DATA_DIR")
    if not data_dir:
        raise ValueError("pass --data-dir or set EMBEDJAX_DATA_DIR to the shared data folder")
    manifest = build(data_dir, args.out, args.cache_dir)
    return {"command": "filtered-benchmark", "out": str(args.out), "documents": manifest["num_documents"],
            "queries": manifest["num_queries"],
            "selectivity": {n: round(w["mean_selectivity"], 4) for n, w in manifest["workloads"].items()}}


def recall_at_k(found_ids, gt_ids, gt_scores, q_qd, d_nd, k: int = 10, tolerance: float = 1e-6) -> np.ndarray:
    """float64 [Q]: recall@k of ``found_ids`` [Q, >= k] against exact filtered ground truth.

    A found row counts when its exact (float64) score reaches the ground truth's k-th
    score minus ``tolerance``, so rows tied with the k-th result (duplicate documents,
    which nfcorpus has) count whichever of them a system returns. The denominator is
    min(k, rows passing the filter); queries whose filter passes no row are NaN.
    Found rows must pass the filter: check that separately (``found_ids`` is trusted here).
    """
    found = np.asarray(found_ids)[:, :k]
    gt = np.asarray(gt_ids)[:, :k]
    valid = (gt >= 0).sum(axis=1)
    kth = np.take_along_axis(np.asarray(gt_scores, np.float64)[:, :k], np.maximum(valid - 1, 0)[:, None], 1)[:, 0]
    q64, d64 = np.asarray(q_qd, np.float64), np.asarray(d_nd, np.float64)
    scores = np.einsum("qd,qkd->qk", q64, d64[np.maximum(found, 0)])
    hits = ((found >= 0) & (scores >= kth[:, None] - tolerance)).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(valid > 0, np.minimum(hits, valid) / valid, np.nan)

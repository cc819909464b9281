"""@k metrics do not depend on the other cutoffs requested, and ties follow one rule (issue 10).

The rule (``embedjax.eval.metrics``): score descending, then document id descending. Binary
codes make ties common: 2,000 random 32-d vectors give only 33 possible Hamming distances.
Document ids are a shuffled set of names, so corpus order and id order differ; a search that
broke ties by corpus index, or a metric run deeper than its cutoff, fails these tests.
"""
import math

import numpy as np
import pytest

from embedjax.eval.embedding_report import inverted_softmax_retrieval
from embedjax.eval.metrics import query_metrics, tie_order
from embedjax.eval.querybank import querybank_retrieval_from_embeddings
from embedjax.eval.retrieval import retrieval_from_embeddings

N, D, Q = 2000, 32, 24
METRICS = ("ndcg", "recall", "mrr", "map", "precision")


@pytest.fixture(scope="module")
def task():
    rng = np.random.default_rng(0)
    d = rng.standard_normal((N, D)).astype(np.float32)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    q = rng.standard_normal((Q, D)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    doc_ids = [f"doc{i:05d}" for i in rng.permutation(N)]
    query_ids = [f"q{i}" for i in range(Q)]
    # Relevant documents among each query's 60 nearest (graded 1-2), so the @10 metrics are not all 0.
    near = np.argsort(-(q @ d.T), axis=1)[:, :60]
    qrels = {qid: {doc_ids[j]: int(rng.integers(1, 3)) for j in rng.choice(near[i], 6, replace=False)}
             for i, qid in enumerate(query_ids)}
    return q, d, query_ids, doc_ids, qrels


def _at(metrics, k):
    return {f"{m}@{k}": metrics[f"{m}@{k}"] for m in METRICS}


@pytest.mark.parametrize("quantization", [None, "binary", "binary_asym", "binary+rescore", "binary+int8rescore",
                                          "int8", "int4", "fp8", "residual2"])
def test_cutoff_10_is_the_same_whether_or_not_100_is_requested(task, quantization):
    q, d, query_ids, doc_ids, qrels = task
    alone = retrieval_from_embeddings(q, d, query_ids, doc_ids, qrels, (10,), quantization=quantization,
                                      per_query=True)
    deeper = retrieval_from_embeddings(q, d, query_ids, doc_ids, qrels, (10, 100), quantization=quantization,
                                       per_query=True)
    assert _at(alone, 10) == _at(deeper, 10)
    for m in METRICS:
        assert alone["per_query"][f"{m}@10"] == deeper["per_query"][f"{m}@10"]
    assert deeper["ndcg@100"] >= 0 and "ndcg@100" not in alone


def _hamming_ranking(q, d, doc_ids, depth):
    """Reference: Hamming distance ascending, then id descending, in numpy."""
    dist = ((q[:, None, :] > 0) != (d[None, :, :] > 0)).sum(-1)
    ids = np.array(doc_ids)
    out = []
    for row in dist:
        order = sorted(range(len(ids)), key=lambda j: (row[j], tuple(-ord(c) for c in ids[j])))
        out.append([ids[j] for j in order[:depth]])
    return out


def _mean_ndcg10(rankings, query_ids, qrels):
    return 100 * np.mean([query_metrics(r, qrels[qid], (10,))["ndcg@10"] for r, qid in zip(rankings, query_ids)])


def test_binary_ties_go_to_the_larger_id_like_trec_eval(task):
    q, d, query_ids, doc_ids, qrels = task
    ref = _hamming_ranking(q, d, doc_ids, 10)
    dist = ((q[:, None, :] > 0) != (d[None, :, :] > 0)).sum(-1)
    tenth = np.sort(dist, axis=1)[:, 9]
    assert ((dist == tenth[:, None]).sum(1) > 1).mean() > 0.9, "the test needs ties at the cutoff"
    for k_values in ((10,), (10, 100)):
        got = retrieval_from_embeddings(q, d, query_ids, doc_ids, qrels, k_values, quantization="binary")
        assert got["ndcg@10"] == pytest.approx(_mean_ndcg10(ref, query_ids, qrels), abs=1e-9), k_values


def test_two_stage_cutoff_k_is_a_search_for_exactly_k(task):
    q, d, query_ids, doc_ids, qrels = task
    ids = np.array(doc_ids)
    rankings = []
    for i, cand in enumerate(_hamming_ranking(q, d, doc_ids, 40)):  # 4 x 10 candidates
        rows = [doc_ids.index(c) for c in cand]
        scores = (d[rows].astype(np.float64) @ q[i].astype(np.float64))
        order = sorted(range(len(rows)), key=lambda j: (-scores[j], tuple(-ord(c) for c in ids[rows[j]])))
        rankings.append([ids[rows[j]] for j in order[:10]])
    got = retrieval_from_embeddings(q, d, query_ids, doc_ids, qrels, (10, 100), quantization="binary+rescore")
    assert got["ndcg@10"] == pytest.approx(_mean_ndcg10(rankings, query_ids, qrels), abs=1e-9)


def test_tie_order_sorts_ids_descending():
    ids = ["b", "a10", "a9", "c", "a"]
    assert [ids[j] for j in tie_order(ids)] == ["c", "b", "a9", "a10", "a"]


def test_query_bank_retrieval_breaks_ties_by_larger_id():
    # Rows 0 and 1 are the same vector; ids "a" < "x", so "x" (row 1) must take the single top-1
    # place. A corpus-index tie break would return "a" and score recall@1 = 0.
    d = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
    doc_ids = ["a", "x", "m"]
    q = np.array([[1.0, 0.1]], np.float32)
    qrels = {"q": {"x": 1}}
    bank = np.array([[0.0, 1.0]], np.float32)
    out = querybank_retrieval_from_embeddings(q, d, bank, ["q"], doc_ids, qrels, (1,), temperature=0.05)
    assert out["recall@1"] == 100.0
    out = inverted_softmax_retrieval(q, d, ["q"], doc_ids, qrels, bank, k_values=(1,))
    assert out["recall@1"] == 100.0
    assert math.isclose(retrieval_from_embeddings(q, d, ["q"], doc_ids, qrels, (1,))["recall@1"], 100.0)

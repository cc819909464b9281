"""Retention tables: each row is the setting's own retrieval metric over the float32 full-dim one."""
import numpy as np
import pytest

from embedjax.eval.retention import compression_retention, matryoshka_retention, retention_table
from embedjax.eval.retrieval import retrieval_from_embeddings


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _noisy_pairs(num_queries=12, num_docs=60, dim=32, noise=1.5, seed=0):
    """Each query is a noisy copy of document i, its one relevant document."""
    rng = np.random.default_rng(seed)
    d = _unit(rng.normal(size=(num_docs, dim)))
    q = _unit(d[:num_queries] + noise * rng.normal(size=(num_queries, dim)) / np.sqrt(dim))
    query_ids = [f"q{i}" for i in range(num_queries)]
    doc_ids = [f"d{j:03d}" for j in range(num_docs)]
    qrels = {f"q{i}": {f"d{i:03d}": 1} for i in range(num_queries)}
    return q, d, query_ids, doc_ids, qrels


def test_compression_rows_are_each_settings_metric_over_float32():
    q, d, qids, dids, qrels = _noisy_pairs()
    settings = [None, "int8", "int4", "binary", "binary+rescore"]
    rows = compression_retention(q, d, qids, dids, qrels, settings)
    base = retrieval_from_embeddings(q, d, qids, dids, qrels, (10,))["ndcg@10"]
    assert [r["setting"] for r in rows] == ["float32", "int8", "int4", "binary", "binary+rescore"]
    assert all(r["dims"] == 32 for r in rows)
    for row, quantization in zip(rows, settings):
        want = retrieval_from_embeddings(q, d, qids, dids, qrels, (10,), quantization=quantization)["ndcg@10"]
        assert row["ndcg@10"] == pytest.approx(want)
        assert row["retention"] == pytest.approx(want / base)
    assert rows[0]["retention"] == 1.0
    # 32 sign bits lose the noisy copies' ranks (0.68 at seed 0); float rescoring wins them back
    assert rows[3]["retention"] < 0.8
    assert rows[4]["retention"] == 1.0


def test_truncating_to_uninformative_dims_ties_every_document():
    # the first 4 dims are the same for every vector; only the last 4 tell documents apart
    num = 6
    shared = np.ones((num, 4))
    d = _unit(np.concatenate([shared, 3 * np.eye(num, 4, dtype=float) + 0.1 * np.arange(num)[:, None]], axis=1))
    q = d.copy()
    qids, dids = [f"q{i}" for i in range(num)], [f"d{i}" for i in range(num)]
    qrels = {f"q{i}": {f"d{i}": 1} for i in range(num)}
    rows = matryoshka_retention(q, d, qids, dids, qrels, dims=(4, 8, None), metric="ndcg@1")
    assert [r["setting"] for r in rows] == ["float32@4d", "float32", "float32"]
    assert [r["dims"] for r in rows] == [4, 8, 8]
    # at 4 dims all documents coincide: every query gets document 0 (ties -> smaller index), right only for q0
    assert rows[0]["ndcg@1"] == pytest.approx(100.0 / num)
    assert rows[0]["retention"] == pytest.approx(1.0 / num)
    assert rows[1]["retention"] == rows[2]["retention"] == 1.0


def test_bad_inputs_name_the_fix():
    q, d, qids, dids, qrels = _noisy_pairs()
    with pytest.raises(ValueError, match="must look like 'ndcg@10'"):
        compression_retention(q, d, qids, dids, qrels, metric="ndcg")
    with pytest.raises(ValueError, match=r"dims=64 must be an int in \[1, 32\]"):
        matryoshka_retention(q, d, qids, dids, qrels, dims=(64,))
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        compression_retention(q, d, qids, dids, qrels, ["int3"])
    with pytest.raises(ValueError, match="settings is empty"):
        retention_table(q, d, qids, dids, qrels, [])
    unrelated = {"q0": {"d059": 1}}  # never in anyone's top 1
    with pytest.raises(ValueError, match="retention is undefined"):
        compression_retention(q[:1], d, qids[:1], dids, unrelated, metric="ndcg@1")

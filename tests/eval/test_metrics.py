"""Ranking metrics against hand computations (trec_eval conventions)."""
import math

import numpy as np
import pytest

from embedjax.eval.metrics import rank_documents, retrieval_metrics
from embedjax.index.exact import exact_search


def test_metrics_match_hand_computation():
    run = {"q1": {"a": 0.9, "b": 0.8, "c": 0.7, "d": 0.1}, "q2": {"x": 1.0, "y": 0.5}, "q3": {"a": 1.0}}
    qrels = {"q1": {"b": 2, "d": 1, "e": 3}, "q2": {"x": 0}, "q3": {"a": 1}}  # q2 has no relevant doc
    m = retrieval_metrics(run, qrels, k_values=(2, 4), per_query=True)
    assert m["num_queries"] == 2
    dcg2 = 2 / math.log2(3)
    idcg2 = 3 / math.log2(2) + 2 / math.log2(3)
    dcg4 = dcg2 + 1 / math.log2(5)
    idcg4 = idcg2 + 1 / math.log2(4)
    assert m["per_query"]["ndcg@2"]["q1"] == pytest.approx(100 * dcg2 / idcg2)
    assert m["per_query"]["ndcg@4"]["q1"] == pytest.approx(100 * dcg4 / idcg4)
    assert m["per_query"]["recall@4"]["q1"] == pytest.approx(100 * 2 / 3)
    assert m["per_query"]["mrr@2"]["q1"] == pytest.approx(50.0)
    assert m["per_query"]["map@4"]["q1"] == pytest.approx(100 * (1 / 2 + 2 / 4) / 3)
    assert m["ndcg@2"] == pytest.approx((100 * dcg2 / idcg2 + 100) / 2)


def test_ties_are_ranked_like_trec_eval():
    assert rank_documents({"a": 1.0, "c": 1.0, "b": 2.0}) == ["b", "c", "a"]


def test_exact_search_matches_numpy_across_chunks():
    rng = np.random.default_rng(1)
    q, d = rng.standard_normal((7, 33), np.float32), rng.standard_normal((1001, 33), np.float32)
    d[500] = d[10]  # a duplicate: the tie must go to the smaller index
    scores, ids = exact_search(q, d, k=13, chunk_size=128)
    ref = q.astype(np.float64) @ d.T.astype(np.float64)
    order = np.lexsort((np.arange(1001)[None].repeat(7, 0), -ref), axis=1)[:, :13]
    np.testing.assert_array_equal(ids, order)
    np.testing.assert_allclose(scores, np.take_along_axis(ref, order, 1), rtol=1e-5, atol=1e-5)


def test_exact_search_bad_input():
    with pytest.raises(ValueError, match="k=5 must be between 1 and the corpus size 3"):
        exact_search(np.ones((1, 4)), np.ones((3, 4)), 5)
    with pytest.raises(ValueError, match="same D"):
        exact_search(np.ones((1, 4)), np.ones((3, 5)), 1)
    with pytest.raises(ValueError, match="empty"):
        exact_search(np.ones((1, 4)), np.ones((0, 4)), 1)

"""Query-bank normalised retrieval: chunked twin of analysis.inverted_softmax_scores, and its metrics.

Tolerance: both paths compute s / T - logsumexp in float32 with T = 0.05, so values
of magnitude ~20-100 agree to ~1e-5 relative (different summation order of the
chunked log-sum-exp).
"""
import numpy as np
import pytest

from embedjax.eval import analysis, querybank
from embedjax.eval.metrics import retrieval_metrics


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("dynamic", [False, True])
def test_chunked_scores_match_the_dense_reference(dynamic):
    rng = np.random.default_rng(0)
    q, d, bank = _unit(rng.normal(size=(13, 24))), _unit(rng.normal(size=(101, 24))), _unit(rng.normal(size=(777, 24)))
    log_z = querybank.bank_log_partition(bank, d, 0.05, chunk_size=100)  # 8 chunks, the last one short
    active = querybank.activation_mask(bank, d, 2, chunk_size=100) if dynamic else None
    got = np.asarray(querybank.querybank_scores(q, d, log_z, 0.05, active))
    ref = np.asarray(analysis.inverted_softmax_scores(q @ d.T, bank @ d.T, 0.05, dynamic=dynamic, activation_k=2))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)
    # and the log partition against float64 NumPy
    s = (bank.astype(np.float64) @ d.T) / 0.05
    ref_log_z = s.max(0) + np.log(np.exp(s - s.max(0)).sum(0))
    np.testing.assert_allclose(np.asarray(log_z), ref_log_z, rtol=1e-5)


def test_activation_mask_hand_case():
    d = np.eye(4)
    bank = np.array([[1.0, 0.1, 0.0, 0.0], [0.9, 0.0, 0.0, 0.2], [0.0, 0.0, 0.0, 1.0]])
    # top-1 of the bank queries: items 0, 0, 3
    np.testing.assert_array_equal(np.asarray(querybank.activation_mask(bank, d, 1)), [True, False, False, True])
    # top-2 adds items 1 and 3 (query 0), 3 (query 1), 0 (query 2)
    np.testing.assert_array_equal(np.asarray(querybank.activation_mask(bank, d, 2)), [True, True, False, True])


def test_normalised_retrieval_demotes_a_hub_and_fixes_the_ranking():
    # doc "hub" is close to every bank query; for query q1 it narrowly beats the relevant doc "a"
    d_emb = _unit(np.array([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, 0.0, 1.0]]))  # hub, a, other
    doc_ids = ["hub", "a", "other"]
    q_emb = _unit(np.array([[0.95, 0.3, 0.0]]))
    bank = _unit(np.array([[1.0, 0.05, 0.1], [1.0, -0.05, 0.0], [0.9, 0.0, -0.1], [0.2, 1.0, 0.0]]))
    qrels = {"q1": {"a": 1}}
    base = retrieval_metrics({"q1": dict(zip(doc_ids, (q_emb @ d_emb.T)[0].tolist()))}, qrels, (1,))
    assert base["recall@1"] == 0.0  # the hub wins without normalisation
    out = querybank.querybank_retrieval_from_embeddings(q_emb, d_emb, bank, ["q1"], doc_ids, qrels, (1,), temperature=0.1)
    assert out["recall@1"] == 100.0 and out["ndcg@1"] == 100.0


def test_bad_inputs_raise():
    d = np.ones((5, 4))
    with pytest.raises(ValueError, match="same embedding dimension"):
        querybank.bank_log_partition(np.ones((3, 2)), d, 0.05)
    with pytest.raises(ValueError, match="temperature"):
        querybank.bank_log_partition(np.ones((3, 4)), d, 0.0)
    with pytest.raises(ValueError, match="activation_k"):
        querybank.activation_mask(np.ones((3, 4)), d, 6)
    with pytest.raises(ValueError, match=r"log_partition_n must have shape \(5,\)"):
        querybank.querybank_scores(np.ones((2, 4)), d, np.zeros(4), 0.05)
    with pytest.raises(ValueError, match="do not match"):
        querybank.querybank_retrieval_from_embeddings(np.ones((2, 4)), d, np.ones((3, 4)), ["q"], list("abcde"), {}, (1,))


def test_precomputed_log_partition_is_used_instead_of_the_bank():
    rng = np.random.default_rng(1)
    q, d, bank = _unit(rng.normal(size=(6, 8))), _unit(rng.normal(size=(30, 8))), _unit(rng.normal(size=(50, 8)))
    qrels = {f"q{i}": {f"d{(3 * i) % 30}": 1} for i in range(6)}
    ids, doc_ids = [f"q{i}" for i in range(6)], [f"d{j}" for j in range(30)]
    direct = querybank.querybank_retrieval_from_embeddings(q, d, bank, ids, doc_ids, qrels, (1, 5), temperature=0.05)
    log_z = querybank.bank_log_partition(bank, d, 0.05)
    given = querybank.querybank_retrieval_from_embeddings(q, d, None, ids, doc_ids, qrels, (1, 5), temperature=0.05,
                                                          log_partition_n=log_z)
    assert given == direct
    # a partition that strongly penalises the relevant documents changes the metrics
    penalised = np.asarray(log_z).copy()
    penalised[[(3 * i) % 30 for i in range(6)]] += 1000.0
    worse = querybank.querybank_retrieval_from_embeddings(q, d, None, ids, doc_ids, qrels, (1, 5), temperature=0.05,
                                                          log_partition_n=penalised)
    assert worse["recall@5"] == 0.0

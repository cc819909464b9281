"""embedding_report: the dataset slice, the embedding cache, leave-one-out query banks and the metric summary."""
import numpy as np
import pytest
from scipy.special import logsumexp

from embedjax.eval import analysis, embedding_report as er, querybank


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


QRELS = {
    "qa": {"d3": 2, "d5": 0},
    "qb": {"d1": 1, "d4": 3},
    "qc": {"d0": 0},  # no relevant document: never kept
    "qd": {"d5": 1},
}
QUERIES = ["qa", "qb", "qc", "qd"]
DOCS = [f"d{i}" for i in range(7)]


def test_subset_keeps_relevant_documents_first_and_cuts_qrels():
    queries, docs, qrels = er.subset(QUERIES, DOCS, QRELS, max_queries=2, max_docs=4)
    # qa, qb are the first two judged queries; their relevant docs d1, d3, d4 come first, then d0 fills up
    assert queries == ["qa", "qb"]
    assert docs == ["d0", "d1", "d3", "d4"]
    assert qrels == {"qa": {"d3": 2}, "qb": {"d1": 1, "d4": 3}}
    # a document cap below the relevant set drops the query that lost all its relevant documents
    queries, docs, qrels = er.subset(QUERIES, DOCS, QRELS, max_docs=1)
    assert (queries, docs, qrels) == (["qb"], ["d1"], {"qb": {"d1": 1}})
    # no caps: every judged query, the whole corpus
    queries, docs, _ = er.subset(QUERIES, DOCS, QRELS)
    assert (queries, docs) == (["qa", "qb", "qd"], DOCS)
    with pytest.raises(ValueError, match="max_docs must be a positive int"):
        er.subset(QUERIES, DOCS, QRELS, max_docs=0)
    with pytest.raises(ValueError, match="check the ids match"):
        er.subset(["qc"], DOCS, QRELS)


def test_relevance_mask_and_positive_pairs():
    mask = er.relevance_mask(["qa", "qb", "qc"], ["d5", "d4", "d3", "d1", "d9"], QRELS)
    np.testing.assert_array_equal(mask, [[False, False, True, False, False],
                                         [False, True, False, True, False],
                                         [False, False, False, False, False]])
    q_idx, d_idx = er.positive_pairs(["qa", "qb", "qc"], ["d5", "d4", "d3", "d1", "d9"], QRELS)
    np.testing.assert_array_equal(q_idx, [0, 1, 1])
    np.testing.assert_array_equal(d_idx, [2, 1, 3])


def test_embedding_cache_round_trip_selects_rows_by_id(tmp_path):
    rng = np.random.default_rng(0)
    q, d = rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(5, 4)).astype(np.float32)
    path = er.save_embeddings(tmp_path / "sub" / "emb.npz", q, d, ["a", "b", "c"], ["v", "w", "x", "y", "z"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["emb.npz"]  # no temporary file left behind
    got_q, got_d = er.load_embeddings(path, ["c", "a"], ["z", "v", "x"])
    np.testing.assert_array_equal(got_q, q[[2, 0]])
    np.testing.assert_array_equal(got_d, d[[4, 0, 2]])
    with pytest.raises(ValueError, match=r"no embedding for 1 document ids \(e.g. \['nope'\]\)"):
        er.load_embeddings(path, ["a"], ["v", "nope"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        er.load_embeddings(tmp_path / "missing.npz", ["a"], ["v"])
    with pytest.raises(ValueError, match="do not match embeddings"):
        er.save_embeddings(tmp_path / "bad.npz", q, d, ["a"], ["v"])


def _brute_loo(scores_bn, temperature):
    logits = np.asarray(scores_bn, np.float64) / temperature
    return np.stack([logsumexp(np.delete(logits, b, axis=0), axis=0) for b in range(logits.shape[0])])


def test_leave_one_out_log_partition_matches_brute_force_even_when_one_row_dominates():
    rng = np.random.default_rng(1)
    scores = rng.uniform(-1, 1, size=(7, 11))
    scores[3, :4] = 5.0  # row 3 towers over its columns: exp(-100+) of the rest at T = 0.02
    scores[[0, 5], 6] = 2.0  # a tie at the column maximum
    for temperature in (0.02, 0.05, 1.0):
        got = er.leave_one_out_log_partition(scores, temperature)
        np.testing.assert_allclose(got, _brute_loo(scores, temperature), rtol=1e-12, atol=1e-9)
    with pytest.raises(ValueError, match="B >= 2"):
        er.leave_one_out_log_partition(scores[:1], 0.05)


def _retrieval_case(seed=2):
    rng = np.random.default_rng(seed)
    d = _unit(rng.normal(size=(40, 16)))
    q = _unit(d[:9] + 0.5 * rng.normal(size=(9, 16)))
    qids, dids = [f"q{i}" for i in range(9)], [f"d{j}" for j in range(40)]
    qrels = {f"q{i}": {f"d{i}": 1, f"d{i + 9}": 2} for i in range(9)}
    return q, d, qids, dids, qrels


def test_inverted_softmax_with_a_bank_matches_querybank():
    q, d, qids, dids, qrels = _retrieval_case()
    bank = _unit(np.random.default_rng(3).normal(size=(50, 16)))
    got = er.inverted_softmax_retrieval(q, d, qids, dids, qrels, bank, temperature=0.1, k_values=(1, 10))
    want = querybank.querybank_retrieval_from_embeddings(q, d, bank, qids, dids, qrels, (1, 10), temperature=0.1)
    for name in ("ndcg@10", "recall@10", "mrr@10", "ndcg@1"):
        assert got[name] == pytest.approx(want[name]), name


def test_inverted_softmax_leave_one_out_bank_is_the_other_queries():
    q, d, qids, dids, qrels = _retrieval_case()
    got, scores = er.inverted_softmax_retrieval(q, d, qids, dids, qrels, temperature=0.05, k_values=(10,),
                                                return_scores=True)
    per_query = []
    for i, qid in enumerate(qids):  # each query against the bank of all the others
        out = querybank.querybank_retrieval_from_embeddings(q[i:i + 1], d, np.delete(q, i, axis=0), [qid], dids,
                                                            {qid: qrels[qid]}, (10,), temperature=0.05)
        per_query.append(out["ndcg@10"])
        log_z = np.asarray(querybank.bank_log_partition(np.delete(q, i, axis=0), d, 0.05))
        np.testing.assert_allclose(scores[i], q[i] @ d.T / 0.05 - log_z, rtol=1e-4, atol=1e-3)
    assert got["ndcg@10"] == pytest.approx(np.mean(per_query))


def test_corpus_neighbour_scores_never_count_a_document_as_its_own_neighbour():
    d = _unit(np.array([[1.0, 0.0], [0.9, 0.1], [0.8, 0.3], [0.0, 1.0]]))
    scores = er.corpus_neighbour_scores(d)
    assert np.all(np.isneginf(np.diag(np.asarray(scores))))
    # nearest other document: 0 -> 1, 1 -> 0, 2 -> 1, 3 -> 2
    np.testing.assert_array_equal(np.asarray(analysis.k_occurrence(scores, 1)), [1, 2, 1, 0])
    np.testing.assert_array_equal(er.corpus_k_occurrence(3 * d, 1, sample=None), [1, 2, 1, 0])
    sampled = er.corpus_k_occurrence(d, 2, sample=3, seed=0)
    assert sampled.shape == (3,) and sampled.sum() == 6


def test_cosine_scores_ignore_vector_norms():
    rng = np.random.default_rng(5)
    q, d = rng.normal(size=(3, 6)), rng.normal(size=(4, 6))
    got = er.cosine_scores(q * np.array([[2.0], [0.1], [7.0]]), d * 3.0)
    np.testing.assert_allclose(got, _unit(q) @ _unit(d).T, rtol=1e-5)


def test_space_metrics_are_the_analysis_functions_on_the_right_inputs():
    q, d, qids, dids, qrels = _retrieval_case()
    got = er.space_metrics(q, d, qids, dids, qrels, k=5, uniformity_sample=None, hubness_sample=None)
    q_idx, d_idx = er.positive_pairs(qids, dids, qrels)
    assert len(q_idx) == 18
    want = {
        "rankme_corpus": analysis.rankme(d),
        "rankme_queries": analysis.rankme(q),
        "alignment": analysis.alignment(q[q_idx], d[d_idx]),
        "uniformity": analysis.uniformity(d),
        "mean_cosine": analysis.mean_cosine(d),
        "partition_isotropy": analysis.partition_isotropy(d),
        "hubness_skewness": analysis.hubness_skewness(er.corpus_neighbour_scores(d), 5),
        "hubness_skewness_queries": analysis.hubness_skewness(q @ d.T, 5),
    }
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert isinstance(got[name], float)
        assert got[name] == pytest.approx(float(value), rel=1e-5), name
    # alignment is 0 when every query coincides with its relevant documents
    same = er.space_metrics(d[:3], d, ["a", "b", "c"], dids, {"a": {"d0": 1}, "b": {"d1": 1}, "c": {"d2": 1}})
    assert same["alignment"] == pytest.approx(0.0, abs=1e-6)
    # samples: uniformity of 10 sampled documents differs from the full one, and is reproducible
    sampled = er.space_metrics(q, d, qids, dids, qrels, uniformity_sample=10, seed=4)
    assert sampled["uniformity"] != pytest.approx(got["uniformity"], rel=1e-4)
    assert er.space_metrics(q, d, qids, dids, qrels, uniformity_sample=10, seed=4)["uniformity"] == sampled["uniformity"]

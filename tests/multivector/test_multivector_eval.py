"""Multi-vector retrieval evaluation: exact MaxSim search (ties -> smaller id) and the
ej.eval.retrieval path of a multi-vector encoder (exact and FDE candidates)."""
import jax
import numpy as np
import pytest

import embedjax as ej
from embedjax.encoder import init_encoder_params
from embedjax.eval.metrics import rank_documents, retrieval_metrics
from embedjax.models.heads import build_head
from embedjax.models.pretrained import minilm_path
from embedjax.multivector.evaluation import maxsim_search, retrieval


def test_maxsim_search_is_exact_with_ties_to_the_smaller_id():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(5, 4, 8)).astype(np.float32)
    qm = rng.random((5, 4)) < 0.8
    qm[:, 0] = True
    d = rng.normal(size=(37, 6, 8)).astype(np.float32)
    dm = rng.random((37, 6)) < 0.7
    dm[:, 0] = True
    d[30], dm[30] = d[3], dm[3]  # a tie
    full = np.asarray(ej.multivector.maxsim(q, qm, d, dm))
    scores, ids = maxsim_search(q, qm, d, dm, 10, query_batch=2, chunk_size=8)
    want = np.asarray([sorted(range(37), key=lambda j: (-full[i, j], j))[:10] for i in range(5)])
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_allclose(scores, np.take_along_axis(full, want, 1), rtol=1e-5)


@pytest.fixture(scope="module")
def colbert():
    base = ej.Encoder.from_pretrained(minilm_path())
    head = build_head({"type": "multivector", "dim": 16, "query_length": 12, "document_length": 24}, pooling="mean")
    params = init_encoder_params(base.model, head, base.family, jax.random.key(1), backbone=base.params["backbone"])
    return ej.Encoder(base.model, params, base.tokenizer, head=head, normalize=False)


CORPUS = {f"d{i}": {"title": "", "text": t} for i, t in enumerate([
    "the cat sat on the mat", "dogs bark at night", "a recipe for bread", "stock markets fell sharply",
    "the cat chased a mouse", "rain is expected tomorrow", "bread needs yeast and flour", "markets and trade",
    "a small dog sleeps", "weather forecast: sunny"])}
QUERIES = {"q1": "cat", "q2": "bread baking", "q3": "dog", "q4": "weather"}
QRELS = {"q1": {"d0": 1, "d4": 1}, "q2": {"d2": 1, "d6": 1}, "q3": {"d1": 1, "d8": 1}, "q4": {"d5": 1, "d9": 1}}


def test_eval_retrieval_of_a_token_encoder_equals_maxsim_by_hand(colbert):
    got = ej.eval.retrieval(colbert, CORPUS, QUERIES, QRELS, k_values=(1, 3, 10))
    q_tok, q_mask = colbert.encode_query(list(QUERIES.values()))
    d_tok, d_mask = colbert.encode_document([c["text"] for c in CORPUS.values()])
    full = np.asarray(ej.multivector.maxsim(q_tok, q_mask, d_tok, d_mask))
    run = {qid: dict(zip(CORPUS, map(float, full[i]))) for i, qid in enumerate(QUERIES)}
    run = {qid: {d: run[qid][d] for d in rank_documents(run[qid])[:10]} for qid in run}
    want = retrieval_metrics(run, QRELS, (1, 3, 10))
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == pytest.approx(want[name], abs=1e-9), name
    # FDE candidates covering the whole corpus re-rank to the same result.
    via_fde = retrieval(colbert, CORPUS, QUERIES, QRELS, (1, 3, 10), candidates=len(CORPUS),
                        fde={"reps": 2, "k_sim": 2, "d_proj": 8, "quantization": "float32"})
    for name in want:
        assert via_fde[name] == pytest.approx(want[name], abs=1e-9), name


def test_single_vector_options_are_refused_for_token_encoders(colbert):
    with pytest.raises(ValueError, match="evaluated by MaxSim"):
        ej.eval.retrieval(colbert, CORPUS, QUERIES, QRELS, quantization="int8")

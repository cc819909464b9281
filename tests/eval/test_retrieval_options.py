"""retrieval()'s options reach the right code path (a deterministic stand-in encoder keeps it fast)."""
import hashlib

import numpy as np
import pytest

import embedjax as ej
from embedjax.eval.querybank import querybank_retrieval_from_embeddings


class HashEncoder:
    """Deterministic unit vectors from a text hash: a stand-in model with real hub structure."""

    def encode(self, texts, batch_size=64, prompt=None, show_progress=False):
        rows = []
        for t in texts:
            seed = int(hashlib.sha256(((prompt or "") + t).encode()).hexdigest()[:8], 16)
            v = np.random.default_rng(seed).standard_normal(16) + np.linspace(0, 2, 16)  # shared direction: hubs
            rows.append(v / np.linalg.norm(v))
        return np.asarray(rows, np.float32).reshape(len(texts), 16)


CORPUS = {f"d{i}": {"title": "" if i % 2 else f"t{i}", "text": f"doc {i}"} for i in range(30)}
QUERIES = {f"q{i}": f"query {i}" for i in range(12)}
QRELS = {f"q{i}": {f"d{(3 * i) % 30}": 1, f"d{(3 * i + 1) % 30}": 2} for i in range(12)}
BANK = [f"bank query {i}" for i in range(40)]


def test_inverted_softmax_option_matches_querybank_module():
    enc = HashEncoder()
    got = ej.eval.retrieval(enc, CORPUS, QUERIES, QRELS, k_values=(5,), hubness_correction="inverted_softmax",
                            query_bank=BANK, hubness_temperature=0.1)
    doc_ids = list(CORPUS)
    want = querybank_retrieval_from_embeddings(
        enc.encode(list(QUERIES.values())), enc.encode([ej.eval.document_text(CORPUS[d]) for d in doc_ids]),
        enc.encode(BANK), list(QUERIES), doc_ids, QRELS, (5,), temperature=0.1)
    plain = ej.eval.retrieval(enc, CORPUS, QUERIES, QRELS, k_values=(5,))
    assert got == want
    assert got["ndcg@5"] != plain["ndcg@5"]


def test_retrieval_option_errors():
    enc = HashEncoder()
    with pytest.raises(ValueError, match="needs query_bank"):
        ej.eval.retrieval(enc, CORPUS, QUERIES, QRELS, hubness_correction="inverted_softmax")
    with pytest.raises(ValueError, match="hubness_correction='csls'"):
        ej.eval.retrieval(enc, CORPUS, QUERIES, QRELS, hubness_correction="csls")
    with pytest.raises(ValueError, match="no query in `queries` has a relevant document"):
        ej.eval.retrieval(enc, CORPUS, QUERIES, {"zz": {"d1": 1}})

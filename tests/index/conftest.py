"""msmarco-subset embeddings from the pretrained MiniLM, encoded once per test session."""
import numpy as np
import pytest


@pytest.fixture(scope="session")
def msmarco_embeddings(data_dir, minilm_dir):
    """dict(q, d, query_ids, doc_ids, qrels): the 43 judged queries and all 5,000 passages (unit-norm)."""
    from embedjax.data import read_beir
    from embedjax.eval.retrieval import document_text
    from embedjax.models.encoder import Encoder

    corpus, queries, qrels = read_beir(data_dir / "msmarco")
    judged = [q for q in queries if any(g > 0 for g in qrels.get(q, {}).values())]
    doc_ids = list(corpus)
    enc = Encoder.from_pretrained(minilm_dir)
    q = enc.encode([queries[x] for x in judged], batch_size=64)
    d = enc.encode([document_text(corpus[x]) for x in doc_ids], batch_size=64)
    return dict(q=np.asarray(q), d=np.asarray(d), query_ids=judged, doc_ids=doc_ids, qrels=qrels)

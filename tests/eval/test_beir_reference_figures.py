"""all-MiniLM-L6-v2 reproduces the scifact and nfcorpus test figures of ../shared/data/README.md
(sentence-transformers 6.2.0 + torch CPU, scored with trec_eval's conventions; MTEB publishes the
same nDCG@10).

The embeddings come from the session-wide cached `beir_embeddings` fixture (tests/conftest.py):
on a cold cache, encoding the 5,183 scifact and 3,633 nfcorpus documents (256 word pieces) is most
of this file's cost; see the fixture for the figures.
"""
import pytest

import embedjax as ej

# dataset -> (judged test queries, nDCG@10, recall@100), x100, from the data README.
REFERENCE = {"scifact": (300, 64.51, 92.50), "nfcorpus": (323, 31.59, 31.15)}


# scifact (5,183 abstracts, ~6 min of encoding under a 2-worker CI) runs with `make test-all`; nfcorpus
# (and msmarco's nDCG in tests/models/test_bert_parity.py) keep a whole-corpus reproduction in the default suite.
@pytest.mark.parametrize("dataset", [pytest.param("scifact", marks=pytest.mark.slow), "nfcorpus"])
def test_minilm_reproduces_the_data_readme_test_figures(beir_embeddings, dataset):
    e = beir_embeddings(dataset)
    m = ej.eval.retrieval_from_embeddings(e["q_emb"], e["d_emb"], e["query_ids"], e["doc_ids"], e["qrels"],
                                          k_values=(10, 100))
    queries, ndcg10, recall100 = REFERENCE[dataset]
    assert m["num_queries"] == queries
    # +-0.05: the README rounds to 2 decimals, and float32 sums in another order move a score by ~1e-4.
    assert m["ndcg@10"] == pytest.approx(ndcg10, abs=0.05)
    assert m["recall@100"] == pytest.approx(recall100, abs=0.05)

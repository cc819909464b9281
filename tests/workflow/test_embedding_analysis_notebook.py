"""notebooks/embedding_analysis.ipynb executed headless on a 300-document, 40-query slice of msmarco.

The notebook reads the suite's cached MiniLM embeddings (written to an .npz in its cache
format), so the run costs the kernel start plus the analysis, not an encode. The test
checks the figures are drawn, the results file is complete, and its numbers are the ones
the library gives when called directly on the same slice.
"""
import json
import pathlib

import numpy as np
import pytest

# nbclient, nbformat, ipykernel and matplotlib come with the [dev] extra; a missing one fails loudly here.
import nbclient  # noqa: E402
import nbformat  # noqa: E402

from embedjax.eval import analysis, embedding_report
from embedjax.eval.retrieval import retrieval_from_embeddings

NOTEBOOK = pathlib.Path(__file__).resolve().parents[2] / "notebooks" / "embedding_analysis.ipynb"
FIGURES = ("matryoshka_retention", "compression_retention", "similarity_histograms", "k_occurrence")
METRICS = ("rankme_corpus", "rankme_queries", "alignment", "uniformity", "mean_cosine", "partition_isotropy",
           "hubness_skewness", "hubness_skewness_queries", "hubness_skewness_queries_inverted_softmax",
           "ndcg@10", "ndcg@10_inverted_softmax")


def _assert_drawn(png):
    import matplotlib.image

    image = matplotlib.image.imread(png)[..., :3]
    assert image.shape[0] > 200 and image.shape[1] > 300, (png, image.shape)
    ink = np.any(image < 0.9, axis=-1).mean()  # share of pixels that are not (near) white
    assert 0.02 < ink < 0.9, (png, ink)
    assert image.std() > 0.05, png  # lines, bars and text, not one flat fill


def test_embedding_analysis_notebook_on_a_small_slice(tmp_path, monkeypatch, data_dir, msmarco_embeddings):
    emb = msmarco_embeddings
    cache = embedding_report.save_embeddings(tmp_path / "emb.npz", emb["q_emb"], emb["d_emb"], emb["query_ids"],
                                             emb["doc_ids"])
    out = tmp_path / "analysis"
    monkeypatch.setenv("EMBEDJAX_ANALYSIS_DATASET", str(data_dir / "msmarco"))
    monkeypatch.setenv("EMBEDJAX_ANALYSIS_EMBEDDINGS", str(cache))
    monkeypatch.setenv("EMBEDJAX_ANALYSIS_MAX_DOCS", "300")
    monkeypatch.setenv("EMBEDJAX_ANALYSIS_MAX_QUERIES", "40")
    monkeypatch.setenv("EMBEDJAX_ANALYSIS_OUT", str(out))
    monkeypatch.delenv("EMBEDJAX_ANALYSIS_QUERY_BANK", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == len(FIGURES)

    results = json.loads((out / "results.json").read_text())
    assert sorted(results["figures"]) == sorted(FIGURES)
    for name in FIGURES:
        assert pathlib.Path(results["figures"][name]) == out / f"{name}.png"
        _assert_drawn(out / f"{name}.png")
    assert set(METRICS) <= set(results["metrics"]), set(METRICS) - set(results["metrics"])
    assert all(np.isfinite(v) for v in results["metrics"].values())

    # the same slice, rebuilt here: 40 judged queries, 300 documents (their relevant ones first)
    query_ids, doc_ids, qrels = embedding_report.subset(emb["query_ids"], emb["doc_ids"], emb["qrels"], 40, 300)
    q_row = {q: i for i, q in enumerate(emb["query_ids"])}
    d_row = {d: i for i, d in enumerate(emb["doc_ids"])}
    q_emb = emb["q_emb"][[q_row[q] for q in query_ids]]
    d_emb = emb["d_emb"][[d_row[d] for d in doc_ids]]
    assert (results["num_queries"], results["num_docs"], results["dim"]) == (len(query_ids), 300, 384)
    assert 30 <= len(query_ids) <= 40  # queries whose relevant documents all fell outside the slice are dropped

    got = results["metrics"]
    assert got["rankme_corpus"] == pytest.approx(float(analysis.rankme(d_emb)), rel=1e-4)
    q_idx, d_idx = embedding_report.positive_pairs(query_ids, doc_ids, qrels)
    assert got["alignment"] == pytest.approx(float(analysis.alignment(q_emb[q_idx], d_emb[d_idx])), rel=1e-4)
    float32 = retrieval_from_embeddings(q_emb, d_emb, query_ids, doc_ids, qrels, (10,))["ndcg@10"]
    int8 = retrieval_from_embeddings(q_emb, d_emb, query_ids, doc_ids, qrels, (10,), quantization="int8")["ndcg@10"]
    assert got["ndcg@10"] == pytest.approx(float32)
    compression = {r["setting"]: r for r in results["compression_retention"]}
    assert list(compression) == ["float32", "int8", "int4", "fp8", "binary", "binary+rescore"]
    assert compression["int8"]["retention"] == pytest.approx(int8 / float32)

    # sanity of the tables: the full dimension is the baseline itself. Rescoring 40 Hamming candidates
    # with float32 restores the float ranking up to a candidate missed, so binary+rescore sits at ~1 and
    # not below binary; on this slice (300 documents, all relevant to some query) binary alone happens
    # to land at 1.006 and binary+rescore at 1.000, hence the tolerance.
    matryoshka = {r["dims"]: r for r in results["matryoshka_retention"]}
    assert sorted(matryoshka) == [32, 64, 128, 256, 384]
    assert matryoshka[384]["retention"] == compression["float32"]["retention"] == 1.0
    assert matryoshka[32]["retention"] < 0.95 < matryoshka[256]["retention"]  # MiniLM has no Matryoshka training
    assert compression["binary+rescore"]["retention"] == pytest.approx(1.0, abs=0.01)
    assert compression["binary+rescore"]["retention"] >= compression["binary"]["retention"] - 0.01

    # histograms and k-occurrence count every pair / every neighbourhood exactly once
    hist = results["similarity_histograms"]
    assert sum(hist["relevant"]) == len(q_idx)
    assert sum(hist["relevant"]) + sum(hist["non_relevant"]) == len(query_ids) * 300
    occ = results["k_occurrence"]
    assert sum(occ["documents"]) == 300
    assert sum(v * n for v, n in zip(occ["values"], occ["documents"])) == 300 * occ["k"]


def _execute(monkeypatch, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    return nb


@pytest.mark.slow
def test_embedding_analysis_notebook_encodes_caches_and_uses_a_text_query_bank(tmp_path, monkeypatch, data_dir,
                                                                               minilm_encoder):
    import embedjax as ej

    bank = ["what is the capital of france", "how long to boil an egg", "symptoms of the flu", "define photosynthesis"]
    (tmp_path / "bank.txt").write_text("\n".join(bank) + "\n\n")
    cache, out = tmp_path / "cache" / "emb.npz", tmp_path / "analysis"
    _execute(monkeypatch, {"EMBEDJAX_ANALYSIS_MODEL": "all-MiniLM-L6-v2",
                           "EMBEDJAX_ANALYSIS_DATASET": str(data_dir / "msmarco"),
                           "EMBEDJAX_ANALYSIS_EMBEDDINGS": str(cache), "EMBEDJAX_ANALYSIS_MAX_DOCS": "40",
                           "EMBEDJAX_ANALYSIS_MAX_QUERIES": "4", "EMBEDJAX_ANALYSIS_QUERY_BANK": str(tmp_path / "bank.txt"),
                           "EMBEDJAX_ANALYSIS_OUT": str(out)})
    results = json.loads((out / "results.json").read_text())
    assert results["embeddings"] == "encoded with all-MiniLM-L6-v2"
    assert results["query_bank"] == f"4 queries of {tmp_path / 'bank.txt'}"

    corpus, queries, all_qrels = ej.data.read_beir(data_dir / "msmarco")
    query_ids, doc_ids, qrels = embedding_report.subset(list(queries), list(corpus), all_qrels, 4, 40)
    q_emb, d_emb = embedding_report.load_embeddings(cache, query_ids, doc_ids)  # the notebook wrote its cache
    np.testing.assert_allclose(q_emb, minilm_encoder.encode([queries[q] for q in query_ids]), atol=1e-4)
    np.testing.assert_allclose(d_emb[:5], minilm_encoder.encode(
        [ej.eval.document_text(corpus[d]) for d in doc_ids[:5]]), atol=1e-4)
    want = embedding_report.inverted_softmax_retrieval(q_emb, d_emb, query_ids, doc_ids, qrels,
                                                       minilm_encoder.encode(bank), temperature=0.05)
    assert results["metrics"]["ndcg@10_inverted_softmax"] == pytest.approx(want["ndcg@10"], abs=1e-6)

    # a second run reads the cache instead of encoding
    _execute(monkeypatch, {"EMBEDJAX_ANALYSIS_QUERY_BANK": "loo"})
    again = json.loads((out / "results.json").read_text())
    assert again["embeddings"] == "read from emb.npz (the model is not loaded)"
    assert again["metrics"]["rankme_corpus"] == pytest.approx(results["metrics"]["rankme_corpus"])

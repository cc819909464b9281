"""embedjax.integrations.mteb: mteb's own evaluators, run offline on local slices through
``MTEBEncoder``, report what embedjax's evaluation reports on the same slices."""
import importlib
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch.utils.data
from datasets import Dataset

import embedjax as ej
from embedjax.eval.retrieval import retrieval_from_embeddings
from embedjax.integrations.mteb import MTEBEncoder, resolve_prompt, retrieval_task, sts_task

import mteb  # noqa: E402  (after embedjax: the adapter must work whatever the import order)

# mteb rounds retrieval metrics to 5 decimals on a 0-1 scale; everything else must agree to float noise
RETRIEVAL_TOL = 1e-5
STS_TOL = 1e-6


def run_mteb(model, task) -> dict:
    """mteb.evaluate offline (no result cache) -> the test split's score dict (0-1 scale)."""
    result = mteb.evaluate(model, task, cache=None, show_progress_bar=False,
                           encode_kwargs={"batch_size": 64, "show_progress_bar": False})
    return result.task_results[0].scores["test"][0]


@pytest.fixture(scope="module")
def adapter(minilm_encoder):
    return MTEBEncoder(minilm_encoder, name="embedjax/all-MiniLM-L6-v2")


def msmarco_slice(data_dir, num_docs=200):
    """The first ``num_docs`` documents, the queries judged relevant to one of them, qrels cut to them."""
    corpus, queries, qrels = ej.data.read_beir(data_dir / "msmarco")
    corpus = dict(list(corpus.items())[:num_docs])
    cut = {q: {d: g for d, g in docs.items() if d in corpus} for q, docs in qrels.items()}
    cut = {q: docs for q, docs in cut.items() if any(g > 0 for g in docs.values())}
    return corpus, {q: queries[q] for q in cut}, cut


@pytest.mark.slow  # ~30 s (mteb's retrieval evaluator); the STS test below runs an mteb task from local files in the default suite
def test_retrieval_scores_equal_embedjax_on_an_msmarco_slice(data_dir, adapter, msmarco_embeddings):
    corpus, queries, qrels = msmarco_slice(data_dir)
    assert (len(corpus), len(queries)) == (200, 37)
    got = run_mteb(adapter, retrieval_task(corpus, queries, qrels))

    # embedjax's evaluation of the same slice, from the cached MiniLM embeddings of the whole subset
    e = msmarco_embeddings
    q_rows = [e["query_ids"].index(q) for q in queries]
    d_rows = [e["doc_ids"].index(d) for d in corpus]
    want = retrieval_from_embeddings(e["q_emb"][q_rows], e["d_emb"][d_rows], list(queries), list(corpus), qrels,
                                     k_values=(10, 100))
    assert 0.5 < got["ndcg_at_10"] < 0.95  # a real ranking, not a degenerate one
    for ours, theirs in [("ndcg@10", "ndcg_at_10"), ("recall@10", "recall_at_10"), ("recall@100", "recall_at_100"),
                         ("map@10", "map_at_10"), ("mrr@10", "mrr_at_10")]:
        assert got[theirs] == pytest.approx(want[ours] / 100, abs=RETRIEVAL_TOL), theirs
    assert got["main_score"] == got["ndcg_at_10"]


def test_sts_scores_equal_embedjax_on_an_stsb_slice(data_dir, adapter, minilm_encoder):
    s1, s2, gold = ej.data.read_sts(data_dir / "stsb" / "sts-test.csv")
    s1, s2, gold = s1[:300], s2[:300], gold[:300]
    got = run_mteb(adapter, sts_task(s1, s2, gold))
    want = ej.eval.sts(minilm_encoder, s1, s2, gold)
    assert 0.7 < got["cosine_spearman"] < 0.95
    for measure in ("cosine", "euclidean", "manhattan"):
        for stat in ("spearman", "pearson"):
            assert got[f"{measure}_{stat}"] == pytest.approx(want[f"{stat}_{measure}"] / 100, abs=STS_TOL)
    assert got["spearman"] == pytest.approx(got["cosine_spearman"], abs=STS_TOL)  # the meta's similarity: cosine
    assert got["main_score"] == got["cosine_spearman"]


def test_encode_returns_float32_rows_in_loader_order(adapter, minilm_encoder):
    texts = ["a tiny sentence", "a much longer sentence about embeddings and how they are evaluated", "third"]
    loader = torch.utils.data.DataLoader(Dataset.from_dict({"text": texts}), batch_size=2)
    task = sts_task(["x", "y"], ["x", "z"], [5.0, 1.0])
    emb = adapter.encode(loader, task_metadata=task.metadata, hf_split="test", hf_subset="default", batch_size=4)
    assert isinstance(emb, np.ndarray) and emb.dtype == np.float32 and emb.shape == (3, 384)
    np.testing.assert_allclose(emb, minilm_encoder.encode(texts), atol=1e-5)


def test_prompts_reach_queries_documents_and_named_tasks(minilm_encoder, monkeypatch):
    calls = []
    original = minilm_encoder.encode

    def recording_encode(texts, batch_size=64, prompt=None, show_progress=False):
        calls.append((prompt, list(texts)))
        return original(texts, batch_size=batch_size, prompt=prompt, show_progress=show_progress)

    monkeypatch.setattr(minilm_encoder, "encode", recording_encode)
    model = MTEBEncoder(minilm_encoder, query_prompt="query: ", document_prompt="passage: ", prompts={"STS": "sts: "})
    corpus = {"d1": {"title": "Paris", "text": "capital of France"}, "d2": {"title": "", "text": "a fish"},
              "d3": "no title here"}
    queries = {"q1": "french capital", "q2": "animals in water"}
    run_mteb(model, retrieval_task(corpus, queries, {"q1": {"d1": 1}, "q2": {"d2": 1}}))
    assert sorted(calls) == [("passage: ", ["Paris capital of France", "a fish", "no title here"]),
                             ("query: ", ["french capital", "animals in water"])]
    calls.clear()
    run_mteb(model, sts_task(["a cat", "a dog", "rain"], ["a kitten", "a car", "snow"], [4.5, 1.0, 2.0]))
    assert calls == [("sts: ", ["a cat", "a dog", "rain"]), ("sts: ", ["a kitten", "a car", "snow"])]


def test_resolve_prompt_prefers_the_most_specific_key():
    prompts = {"query": "q", "Retrieval": "type", "Retrieval-query": "type-q", "NFCorpus": "task",
               "NFCorpus-query": "task-q"}
    assert resolve_prompt(prompts, "NFCorpus", "Retrieval", "query") == "task-q"
    assert resolve_prompt(prompts, "NFCorpus", "Retrieval", "document") == "task"
    assert resolve_prompt(prompts, "SciFact", "Retrieval", "query") == "type-q"
    assert resolve_prompt(prompts, "SciFact", "Retrieval", "document") == "type"
    assert resolve_prompt({"query": "q"}, "SciFact", "Retrieval", "query") == "q"
    assert resolve_prompt({"query": "q"}, "STSB", "STS", None) is None
    assert resolve_prompt(None, "STSB", "STS", None) is None


def test_model_meta_describes_the_encoder_and_reloads_from_a_folder(adapter, minilm_encoder):
    meta = adapter.mteb_model_meta
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(minilm_encoder.params))
    assert (meta.name, meta.embed_dim, meta.max_tokens, meta.n_parameters) == (
        "embedjax/all-MiniLM-L6-v2", 384, 256, n_params)
    assert meta.framework == ["JAX"] and meta.similarity_fn_name.value == "cosine" and meta.loader is None
    # the revision (mteb's cache key) follows weights and settings, not the Python object
    assert MTEBEncoder(minilm_encoder).mteb_model_meta.revision == meta.revision
    assert MTEBEncoder(minilm_encoder, query_prompt="q: ").mteb_model_meta.revision != meta.revision
    assert MTEBEncoder(minilm_encoder, similarity="dot").mteb_model_meta.revision != meta.revision
    leaves, treedef = jax.tree_util.tree_flatten(minilm_encoder.params)
    tuned_params = jax.tree_util.tree_unflatten(treedef, [leaves[0] + 1e-3, *leaves[1:]])
    tuned = ej.Encoder(minilm_encoder.model, tuned_params, minilm_encoder.tokenizer)
    assert MTEBEncoder(tuned).mteb_model_meta.revision != meta.revision  # never reads its base model's results

    loaded = MTEBEncoder("all-MiniLM-L6-v2", query_prompt="q: ")
    reloaded = loaded.mteb_model_meta.load_model()
    assert isinstance(reloaded, MTEBEncoder)
    assert reloaded.model_prompts == {"query": "q: "}
    assert reloaded.mteb_model_meta.revision == loaded.mteb_model_meta.revision


@pytest.mark.parametrize("kwargs, error, match", [
    ({"device": "cuda"}, ValueError, "JAX_PLATFORMS"),
    ({"similarity": "euclidean"}, ValueError, "similarity"),
    ({"pooling": "cls"}, TypeError, "from_pretrained"),
    ({"prompts": {"passage": "p: "}}, ValueError, "document"),
    ({"prompts": {"query": "a: "}, "query_prompt": "b: "}, ValueError, "conflicts"),
])
def test_bad_adapter_options_are_named(minilm_encoder, kwargs, error, match):
    with pytest.raises(error, match=match):
        MTEBEncoder(minilm_encoder, **kwargs)


def test_bad_encode_and_task_inputs_are_named(adapter):
    task = sts_task(["x", "y"], ["x", "z"], [5.0, 1.0])
    text_loader = torch.utils.data.DataLoader(Dataset.from_dict({"text": ["x"]}), batch_size=1)
    with pytest.raises(ValueError, match="precision"):
        adapter.encode(text_loader, task_metadata=task.metadata, hf_split="test", hf_subset="default",
                       precision="int8")
    image_loader = [{"image": [np.zeros((2, 2))]}]
    with pytest.raises(ValueError, match="text tasks only"):
        adapter.encode(image_loader, task_metadata=task.metadata, hf_split="test", hf_subset="default")
    with pytest.raises(ValueError, match="pairs"):
        sts_task(["a", "b"], ["c"], [1.0, 2.0])
    with pytest.raises(ValueError, match="outside"):
        sts_task(["a", "b"], ["c", "d"], [1.0, 7.0])
    with pytest.raises(ValueError, match="corpus\\['d'\\] has no 'text'"):
        retrieval_task({"d": {"body": "text"}}, {"q": "query"}, {"q": {"d": 1}})
    with pytest.raises(ValueError, match="absent from `queries`"):
        retrieval_task({"d": "text"}, {"q": "query"}, {"q": {"d": 1}, "other": {"d": 1}})


def test_importing_embedjax_does_not_import_mteb():
    code = ("import sys, embedjax, embedjax.integrations, embedjax.eval; "
            "assert 'mteb' not in sys.modules and 'datasets' not in sys.modules, 'mteb imported eagerly'")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_missing_mteb_raises_an_error_naming_the_install(monkeypatch):
    for name in [n for n in sys.modules if n == "mteb" or n.startswith("mteb.")]:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import mteb...` fail as if mteb were not installed
    monkeypatch.delitem(sys.modules, "embedjax.integrations.mteb")
    with pytest.raises(ImportError, match="pip install mteb"):
        importlib.import_module("embedjax.integrations.mteb")

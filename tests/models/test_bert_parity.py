"""embedjax's BERT against PyTorch transformers / sentence-transformers on the same weights."""
import numpy as np
import pytest

import embedjax as ej


def _st_model(minilm_dir):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir), device="cpu")


def _sts_test_sentences(data_dir):
    s1, s2, _ = ej.data.read_sts(data_dir / "stsb" / "sts-test.csv")
    return list(dict.fromkeys(s1 + s2))


def _assert_cosines(emb, ref, threshold=0.99999):
    cos = np.sum(emb * ref, 1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref, axis=1))
    worst = int(np.argmin(cos))
    assert cos.min() >= threshold, f"row {worst}: cosine {cos[worst]:.7f} < {threshold}"


def test_hidden_states_match_transformers(minilm_dir):
    """Every layer's hidden states, padded batch included, against transformers' BertModel."""
    import torch
    from transformers import AutoModel

    enc = ej.Encoder.from_pretrained(minilm_dir)
    batch = enc.tokenizer(["A man is playing a flute.", "", "Short", "x " * 300])
    _, extras = enc.model.apply({"params": enc.params["backbone"]}, batch, output_hidden_states=True)
    hidden = extras["hidden_states"]
    ref = AutoModel.from_pretrained(str(minilm_dir)).eval()
    with torch.no_grad():
        out = ref(input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
                  attention_mask=torch.tensor(batch["attention_mask"], dtype=torch.long),
                  output_hidden_states=True)
    mask = batch["attention_mask"].astype(bool)
    assert len(hidden) == len(out.hidden_states) == 7
    for ours, theirs in zip(hidden, out.hidden_states):
        # float32 with different summation orders: a few 1e-5 absolute on O(1) activations.
        np.testing.assert_allclose(np.asarray(ours)[mask], theirs.numpy()[mask], atol=5e-5, rtol=1e-4)


def test_sample_of_sts_embeddings_match_sentence_transformers(data_dir, minilm_encoder, minilm_dir):
    sentences = _sts_test_sentences(data_dir)[::12]  # ~230 sentences of every length
    emb = minilm_encoder.encode(sentences, batch_size=32)
    ref = _st_model(minilm_dir).encode(sentences, batch_size=32, convert_to_numpy=True)
    _assert_cosines(emb, ref)


@pytest.mark.slow
def test_every_sts_test_embedding_matches_sentence_transformers(data_dir, minilm_encoder, minilm_dir):
    sentences = _sts_test_sentences(data_dir)
    emb = minilm_encoder.encode(sentences)
    ref = _st_model(minilm_dir).encode(sentences, batch_size=64, convert_to_numpy=True)
    _assert_cosines(emb, ref)


def test_sts_test_spearman_reproduces_reference(data_dir, minilm_encoder):
    s1, s2, gold = ej.data.read_sts(data_dir / "stsb" / "sts-test.csv")
    scores = ej.eval.sts(minilm_encoder, s1, s2, gold)
    assert scores["spearman_cosine"] == pytest.approx(82.03, abs=0.02)  # data README reference
    assert set(scores) >= {"spearman_dot", "spearman_euclidean", "spearman_manhattan", "pearson_cosine"}


def test_bfloat16_stays_close_to_float32(data_dir, minilm_dir):
    s1, s2, gold = ej.data.read_sts(data_dir / "stsb" / "sts-test.csv")
    s1, s2, gold = s1[:300], s2[:300], gold[:300]
    f32 = ej.eval.sts(ej.Encoder.from_pretrained(minilm_dir), s1, s2, gold)["spearman_cosine"]
    bf16 = ej.eval.sts(ej.Encoder.from_pretrained(minilm_dir, dtype="bfloat16"), s1, s2, gold)["spearman_cosine"]
    assert abs(f32 - bf16) <= 0.3, (f32, bf16)


def test_msmarco_ndcg_reproduces_reference(msmarco_embeddings):
    e = msmarco_embeddings
    m = ej.eval.retrieval_from_embeddings(e["q_emb"], e["d_emb"], e["query_ids"], e["doc_ids"], e["qrels"],
                                          k_values=(10, 100))
    assert m["num_queries"] == 43
    assert m["ndcg@10"] == pytest.approx(79.77, abs=0.05)     # sentence-transformers reference
    assert m["recall@10"] == pytest.approx(21.98, abs=0.05)
    assert m["recall@100"] == pytest.approx(80.32, abs=0.05)


def test_limit_small_recall_reproduces_reference(data_dir, minilm_encoder):
    corpus, queries, qrels = ej.data.read_beir(data_dir / "limit-small")
    m = ej.eval.retrieval(minilm_encoder, corpus, queries, qrels, k_values=(2, 10))
    assert m["recall@2"] == pytest.approx(16.20, abs=0.05)
    assert m["recall@10"] == pytest.approx(48.05, abs=0.05)

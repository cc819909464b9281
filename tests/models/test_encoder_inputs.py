"""Encoder behaviour on edge-case and bad inputs, ordering and compiled-shape bounds."""
import numpy as np
import pytest

from embedjax.data.tokenization import bucket_length, length_buckets


def test_empty_list_gives_zero_rows(minilm_encoder):
    out = minilm_encoder.encode([])
    assert out.shape == (0, 384) and out.dtype == np.float32


def test_empty_string_embeds_like_the_tokenizers_empty_input(minilm_encoder):
    ids = minilm_encoder.tokenizer.token_ids([""])[0]
    assert ids == [101, 102]  # [CLS] [SEP]
    emb = minilm_encoder.encode(["", "a sentence"])
    assert np.isfinite(emb).all()
    assert np.linalg.norm(emb[0]) == pytest.approx(1.0, abs=1e-5)


def test_non_string_item_names_its_index(minilm_encoder):
    with pytest.raises(TypeError, match=r"texts\[2\] is int"):
        minilm_encoder.encode(["a", "b", 3])
    with pytest.raises(TypeError, match="single string"):
        minilm_encoder.encode("just one string")


def test_output_order_and_batching_do_not_change_embeddings(minilm_encoder):
    texts = [("word " * n).strip() for n in (1, 40, 3, 17, 2, 60, 5)]
    whole = minilm_encoder.encode(texts, batch_size=64)
    small = minilm_encoder.encode(texts, batch_size=4)
    single = np.stack([minilm_encoder.encode([t])[0] for t in texts])
    np.testing.assert_allclose(small, whole, atol=2e-6)
    np.testing.assert_allclose(single, whole, atol=2e-6)


def test_prompt_is_prepended(minilm_encoder):
    a = minilm_encoder.encode(["hello"], prompt="query: ")
    b = minilm_encoder.encode(["query: hello"])
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert float(np.sum(a * minilm_encoder.encode(["hello"]))) < 0.999


def test_truncation_at_max_length(minilm_encoder):
    ids = minilm_encoder.tokenizer.token_ids(["word " * 1000])[0]
    assert len(ids) == 256 and ids[-1] == 102


def test_length_buckets_bound_compiled_shapes():
    buckets = length_buckets(256)
    assert buckets[-1] == 256 and len(buckets) <= 16
    assert bucket_length(1, buckets) == 8 and bucket_length(33, buckets) == 40
    assert bucket_length(256, buckets) == 256
    with pytest.raises(ValueError, match="longer than the largest bucket"):
        bucket_length(257, buckets)


def test_progress_bar_reports_every_text(minilm_encoder, capsys):
    minilm_encoder.encode(["a", "b", "c"], show_progress=True)
    assert "3/3" in capsys.readouterr().err

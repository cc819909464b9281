"""The multi-vector (ColBERT) head on MiniLM: PyLate framing (markers, [MASK] query expansion,
document skiplist), encode(output="tokens"), and the PyLate-style folder round trip."""
import json

import jax
import numpy as np
import pytest

import embedjax as ej
from embedjax.convert import hf
from embedjax.encoder import init_encoder_params
from embedjax.models.heads import MultiVectorHead, build_head
from embedjax.models.pretrained import minilm_path


@pytest.fixture(scope="module")
def colbert():
    base = ej.Encoder.from_pretrained(minilm_path())
    head = build_head({"type": "multivector", "dim": 16, "query_length": 12, "document_length": 20}, pooling="mean")
    params = init_encoder_params(base.model, head, base.family, jax.random.key(0), backbone=base.params["backbone"])
    return ej.Encoder(base.model, params, base.tokenizer, head=head, normalize=False, source=base.source)


def _vocab(enc, token):
    return enc.tokenizer.backend.token_to_id(token)


def test_queries_get_the_marker_and_mask_expansion(colbert):
    from embedjax.data import late_interaction as li

    framing = colbert.head.framing
    ids = li.framed_ids(colbert.tokenizer, ["a dog runs"], "query", framing)
    batch = li.frame(colbert.tokenizer, ids, "query", framing)
    row = batch["input_ids"][0]
    assert row[0] == _vocab(colbert, "[CLS]") and row[1] == _vocab(colbert, "[unused0]")
    real = len(ids[0])
    assert (row[real:] == _vocab(colbert, "[MASK]")).all() and len(row) == 12
    assert batch["attention_mask"][0].tolist() == [1] * real + [0] * (12 - real)  # expansion not attended
    assert batch["pool_mask"][0].tolist() == [1] * 12  # ... but scored


def test_documents_get_their_marker_and_skip_punctuation(colbert):
    from embedjax.data import late_interaction as li

    framing = colbert.head.framing
    ids = li.framed_ids(colbert.tokenizer, ["dogs, cats. birds"], "document", framing)
    batch = li.frame(colbert.tokenizer, ids, "document", framing)
    row, scored = batch["input_ids"][0], batch["pool_mask"][0].astype(bool)
    assert row[1] == _vocab(colbert, "[unused1]")
    punct = np.isin(row, [_vocab(colbert, ","), _vocab(colbert, ".")])
    assert punct.sum() == 2 and not scored[punct].any()
    assert scored.sum() == batch["attention_mask"][0].sum() - 2
    long_ids = li.framed_ids(colbert.tokenizer, ["word " * 100], "document", framing)
    assert len(long_ids[0]) == 20  # cut at document_length


def test_encode_tokens_matches_the_head_applied_by_hand(colbert):
    texts = ["A man is playing a flute.", "Short", "Another somewhat longer sentence, with a comma."]
    tokens, mask = colbert.encode_document(texts, batch_size=2)
    assert tokens.dtype == np.float32 and tokens.shape[0] == 3 and tokens.shape[2] == 16 and mask.dtype == bool
    norms = np.linalg.norm(tokens, axis=-1)
    np.testing.assert_allclose(norms[mask], 1.0, rtol=1e-5)
    assert (tokens[~mask] == 0).all()
    # Row 1 alone equals row 1 in the batch, and equals backbone states -> Dense -> L2 by hand.
    alone, alone_mask = colbert.encode_document(texts[1:2])
    n = alone_mask.shape[1]
    np.testing.assert_allclose(alone[0], tokens[1, :n], atol=1e-5)
    from embedjax.data import late_interaction as li

    framing = colbert.head.framing
    batch = li.frame(colbert.tokenizer, li.framed_ids(colbert.tokenizer, texts[1:2], "document", framing),
                     "document", framing)
    states, _ = colbert.model.apply({"params": colbert.params["backbone"]}, batch)
    manual = np.asarray(states[0]) @ np.asarray(colbert.params["head"]["dense"]["kernel"])
    manual /= np.linalg.norm(manual, axis=-1, keepdims=True)
    np.testing.assert_allclose(alone[0][alone_mask[0]], manual[batch["pool_mask"][0].astype(bool)], atol=1e-4)


def test_query_expansion_tokens_are_scored_vectors(colbert):
    tokens, mask = colbert.encode_query(["dog"])
    assert mask.shape == (1, 12) and mask.all()
    assert np.allclose(np.linalg.norm(tokens[0], axis=-1), 1.0, atol=1e-5)


def test_pylate_folder_round_trip(colbert, tmp_path):
    out = hf.export_pretrained(tmp_path / "colbert", colbert.config, colbert.params["backbone"], colbert.source,
                               normalize=False, head=colbert.head, head_params=colbert.params["head"])
    modules = json.loads((out / "modules.json").read_text())
    assert [m["type"] for m in modules] == ["sentence_transformers.models.Transformer", "pylate.models.Dense.Dense"]
    st = json.loads((out / "config_sentence_transformers.json").read_text())
    assert st["query_prefix"] == "[unused0]" and st["query_length"] == 12 and st["document_length"] == 20
    assert st["similarity_fn_name"] == "MaxSim" and "," in st["skiplist_words"]
    loaded = ej.Encoder.from_pretrained(out)
    assert isinstance(loaded.head, MultiVectorHead) and loaded.head.framing == colbert.head.framing
    texts = ["A man is playing a flute.", "dogs, cats"]
    for side in ("query", "document"):
        want = colbert.encode(texts, output="tokens", side=side)
        got = loaded.encode(texts, output="tokens", side=side)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_allclose(got[0], want[0], atol=1e-5)


def test_output_must_match_the_head(colbert):
    plain = ej.Encoder.from_pretrained(minilm_path())
    with pytest.raises(ValueError, match="a multi-vector head is needed"):
        plain.encode(["x"], output="tokens")
    with pytest.raises(ValueError, match="a pooling head is needed"):
        colbert.encode(["x"], output="sentence")
    with pytest.raises(ValueError, match="side must be one of"):
        colbert.encode(["x"], side="passage")


def test_documents_pack_and_equal_the_padded_ones(colbert, data_dir, monkeypatch):
    """Documents pack end to end as `encode`'s texts do (auto: where it saves positions; rows of 64
    tokens here): the skiplist stays unscored, the shapes, masks and scored vectors equal the padded
    plan's (float32, other reduction orders: 2e-6 on unit vectors). Queries never pack: their
    [MASK] expansion is scored."""
    from embedjax.data import late_interaction as li
    from embedjax.data.packing import is_packed
    from embedjax.data.readers import read_sts

    s1, s2, _ = read_sts(data_dir / "stsb" / "sts-test.csv")
    texts = (s1 + s2)[:150]
    ids = li.framed_ids(colbert.tokenizer, texts, "document", colbert.head.framing)
    assert colbert.packing_plan(ids, 64, None) is not None
    jitted, packed_batches = colbert._jitted, []
    monkeypatch.setattr(colbert, "_jitted", lambda params, batch: packed_batches.append(is_packed(batch))
                        or jitted(params, batch))
    packed_tokens, packed_mask = colbert.encode_document(texts)
    assert packed_batches and all(packed_batches)
    padded_tokens, padded_mask = colbert.encode_document(texts, pack=False)
    assert packed_tokens.shape == padded_tokens.shape == (150, 24, 16)
    np.testing.assert_array_equal(packed_mask, padded_mask)
    assert packed_mask.sum() < sum(map(len, ids))  # punctuation left out of the scored tokens
    np.testing.assert_allclose(packed_tokens, padded_tokens, atol=2e-6)
    with pytest.raises(ValueError, match="queries are expanded .* do not pack"):
        colbert.encode_query(texts[:3], pack=True)

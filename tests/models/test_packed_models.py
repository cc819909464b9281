"""Packed batches through whole models (issue 17): every text's embedding, hidden states and
gradient equal those of the padded batch.

MiniLM (pretrained) on real STS-B sentences and a random Mistral-style decoder with a sliding
window (causal, left padding, last-token pooling). Tolerance 2e-5 absolute on embeddings of norm
~1 (1e-4 relative on gradients): packed rows change the matmul shapes, so XLA sums the same
products in other blockings; a text that read another text's tokens would be off by ~1e-1.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embedjax.data import packing
from embedjax.data.readers import read_sts
from embedjax.encoder import embed_batch
from embedjax.models.registry import get_family


def _jnp(batch):
    return {k: jnp.asarray(v) for k, v in batch.items()}


@pytest.fixture(scope="module")
def sts_token_ids(minilm_encoder, data_dir):
    s1, s2, _ = read_sts(data_dir / "stsb" / "sts-train.csv")
    texts = [t for pair in zip(s1[:11], s2[:11]) for t in pair]  # 22 texts, pair-interleaved
    return minilm_encoder.tokenizer.token_ids(texts)


@pytest.mark.parametrize("pooling,layers", [("mean", None), ("cls", None), ("max", (2, 6))])
def test_packed_minilm_embeds_every_sentence_as_the_padded_batch(minilm_encoder, sts_token_ids, pooling, layers):
    tokenizer = minilm_encoder.tokenizer
    padded = _jnp(tokenizer.pad(sts_token_ids))
    packed = packing.pack(sts_token_ids, row_length=64, pad_id=tokenizer.pad_id, token_type_ids=True)
    assert packed["input_ids"].shape[0] < len(sts_token_ids) // 3  # several texts per row
    kwargs = dict(pooling=pooling, normalize=False, layers=layers)
    want = embed_batch(minilm_encoder.model, minilm_encoder.params, padded, **kwargs)
    got = embed_batch(minilm_encoder.model, minilm_encoder.params, _jnp(packed), **kwargs)
    assert got.shape == want.shape == (len(sts_token_ids), 384)
    assert float(jnp.abs(got - want).max()) <= 2e-5


def test_packed_minilm_gradients_equal_the_padded_ones(minilm_encoder, sts_token_ids):
    tokenizer = minilm_encoder.tokenizer
    ids = sts_token_ids[:8]
    padded = _jnp(tokenizer.pad(ids))
    packed = _jnp(packing.pack(ids, row_length=48, pad_id=tokenizer.pad_id, token_type_ids=True))
    weights = jnp.asarray(np.random.default_rng(0).normal(size=(len(ids), 384)), jnp.float32)

    def grads(batch):
        return jax.grad(lambda p: jnp.sum(weights * embed_batch(minilm_encoder.model, p, batch, pooling="mean",
                                                                normalize=True)))(minilm_encoder.params)

    for want, got in zip(jax.tree.leaves(grads(padded)), jax.tree.leaves(grads(packed))):
        assert float(jnp.abs(got - want).max()) <= 1e-4 * max(float(jnp.abs(want).max()), 1e-3)


def test_packed_decoder_with_a_sliding_window_equals_left_padding():
    family = get_family("mistral")
    config = family.config_from_fields(model_type="mistral", vocab_size=64, hidden_size=48, num_layers=2,
                                       num_heads=4, num_kv_heads=2, head_dim=12, intermediate_size=40,
                                       sliding_window=4, max_position_embeddings=64)
    model = family.build(config)
    rng = np.random.default_rng(1)
    ids = [list(rng.integers(3, 64, n)) for n in (7, 1, 12, 5, 9, 3)]
    length = max(map(len, ids))
    padded = {"input_ids": np.zeros((len(ids), length), np.int32), "attention_mask": np.zeros((len(ids), length), np.int32)}
    for i, text in enumerate(ids):
        padded["input_ids"][i, length - len(text):] = text
        padded["attention_mask"][i, length - len(text):] = 1
    params = {"backbone": model.init(jax.random.key(0), _jnp(padded))["params"], "head": {}}
    packed = packing.pack(ids, row_length=16, pad_id=0, shards=2)
    want = embed_batch(model, params, _jnp(padded), pooling="lasttoken", normalize=False)
    got = embed_batch(model, params, _jnp(packed), pooling="lasttoken", normalize=False)
    assert float(jnp.abs(got - want).max()) <= 2e-5
    # Rows mixing texts really were packed: positions restart inside a row.
    assert (packed["position_ids"][:, 1:] < packed["position_ids"][:, :-1]).any()

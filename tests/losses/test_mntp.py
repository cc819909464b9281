"""MNTP (embedjax.losses.mntp): the masking rule and the loss against a NumPy reference on a tiny
tied-embedding Llama (hidden states from transformers with a bidirectional mask, the LM head,
shift and cross-entropy in float64 NumPy).

Tolerance: relative 1e-5 on the loss (float32 logits over a 64-token vocabulary vs float64).
"""
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "models"))
from decoder_fixtures import VOCAB, hf_last_hidden, random_batch, save_tiny_decoder  # noqa: E402

from embedjax.convert import hf  # noqa: E402
from embedjax.losses.mntp import mntp_loss, mntp_mask, mntp_nll  # noqa: E402
from embedjax.models.registry import family_for_config  # noqa: E402

SPECIAL = (0, 1, 2)  # <pad>, <s>, </s> of the fixtures' vocabulary
MASK_ID = 3


def _numpy_mntp(hidden_bld, table_vd, targets_bl, weights_bl):
    """Token i scored by the logits at i - 1: -log softmax(h_{i-1} E^T)[t_i], summed over picked tokens."""
    h = hidden_bld.astype(np.float64)
    logits = h @ table_vd.astype(np.float64).T
    logits -= logits.max(-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = np.zeros(h.shape[0])
    for b in range(h.shape[0]):
        for i in range(1, h.shape[1]):
            if weights_bl[b, i]:
                nll[b] -= log_probs[b, i - 1, targets_bl[b, i]]
    return nll, weights_bl[:, 1:].sum(1)


@pytest.mark.parametrize("side", ["right", "left"])
def test_mntp_loss_equals_a_numpy_reference(tmp_path, side):
    folder = save_tiny_decoder(tmp_path / "llama", "llama", seed=2, tie_word_embeddings=True)
    config, params = hf.load_pretrained(folder, attention="bidirectional")
    model = family_for_config(config).build(config)
    batch = random_batch(np.random.default_rng(4), rows=6, length=10, vocab=len(VOCAB), side=side)
    inputs, targets, weights = (np.asarray(x) for x in mntp_mask(
        jax.random.PRNGKey(0), jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
        probability=0.4, mask_id=MASK_ID, vocab_size=len(VOCAB), special_ids=SPECIAL))
    assert weights.sum() >= 8  # enough picked tokens to mean something
    corrupted = {**batch, "input_ids": inputs}
    hidden, _ = model.apply({"params": params}, {k: jnp.asarray(v) for k, v in corrupted.items()})
    table = params["embed_tokens"]["embedding"]
    nll, count = mntp_nll(hidden, jnp.asarray(table), jnp.asarray(targets), jnp.asarray(weights), chunk_rows=2)
    reference_hidden = hf_last_hidden(folder, corrupted, bidirectional=True)
    ref_nll, ref_count = _numpy_mntp(reference_hidden, table, targets, weights)
    np.testing.assert_array_equal(np.asarray(count), ref_count)
    np.testing.assert_allclose(np.asarray(nll), ref_nll, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(mntp_loss(nll, count)), ref_nll.sum() / ref_count.sum(), rtol=1e-5)
    # chunking is an implementation detail: every chunk size gives the same sums
    whole, _ = mntp_nll(hidden, jnp.asarray(table), jnp.asarray(targets), jnp.asarray(weights), chunk_rows=6)
    np.testing.assert_allclose(np.asarray(whole), np.asarray(nll), rtol=1e-6)


def test_masking_picks_eligible_tokens_at_the_rate_asked():
    rng = np.random.default_rng(0)
    batch = random_batch(rng, rows=400, length=40, vocab=64, side="left")
    ids, mask = batch["input_ids"].copy(), batch["attention_mask"]
    ids[:, -1] = np.where(mask[:, -1] == 1, 2, ids[:, -1])  # an EOS closes every row
    inputs, targets, weights = (np.asarray(x) for x in mntp_mask(
        jax.random.PRNGKey(1), jnp.asarray(ids), jnp.asarray(mask), probability=0.3, mask_id=MASK_ID, vocab_size=64,
        special_ids=SPECIAL))
    picked = weights.astype(bool)
    previous_real = np.pad(mask[:, :-1], ((0, 0), (1, 0))).astype(bool)
    eligible = mask.astype(bool) & previous_real & ~np.isin(ids, SPECIAL)
    assert not np.any(picked & ~eligible)  # never padding, a first real token, or a special token
    np.testing.assert_array_equal(targets, ids)
    rate = picked.sum() / eligible.sum()
    assert abs(rate - 0.3) < 0.01, rate  # ~11,000 eligible tokens: 4 standard deviations is 0.018
    as_mask = (inputs == MASK_ID) & picked
    unchanged = (inputs == ids) & picked
    assert abs(as_mask.sum() / picked.sum() - 0.8) < 0.03
    assert abs(unchanged.sum() / picked.sum() - (0.1 + 0.1 / 64)) < 0.03  # "keep", plus random draws of itself
    np.testing.assert_array_equal(inputs[~picked], ids[~picked])
    with pytest.raises(ValueError, match="MNTP mask probability 0.0 must be in"):
        mntp_mask(jax.random.PRNGKey(0), jnp.asarray(ids), jnp.asarray(mask), probability=0.0, mask_id=3, vocab_size=64)

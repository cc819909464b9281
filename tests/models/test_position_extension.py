"""Absolute position tables stretched past their trained length (issue 15): interpolate, grouped,
recurrent and parallel context windows, selected at load time, exported, and refused when they
cannot apply.

The checks use a tiny random BERT (16 trained positions, so "long" inputs are cheap), the real
all-MiniLM-L6-v2 where behaviour on short inputs must not change, and transformers for the
exported interpolated table.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import meta

import embedjax as ej
from embedjax.convert import hf
from embedjax.models import position_extension as ext
from embedjax.models.pretrained import minilm_path
from embedjax.models.registry import get_family

BERT = get_family("bert")
TRAINED = 16


def _tiny(extension=None, vocab=60, hidden=32):
    config = BERT.config_from_fields(vocab_size=vocab, hidden_size=hidden, num_layers=2, num_heads=4,
                                     intermediate_size=48, max_position_embeddings=TRAINED,
                                     hidden_dropout=0.0, attention_dropout=0.0, position_extension=extension)
    return config, BERT.build(config)


def _tiny_params(seed=0, vocab=60, hidden=32):
    _, model = _tiny(vocab=vocab, hidden=hidden)
    tokens = {"input_ids": jnp.ones((1, 4), jnp.int32), "attention_mask": jnp.ones((1, 4), jnp.int32)}
    return jax.tree.map(np.asarray, meta.unbox(model.init(jax.random.PRNGKey(seed), tokens)["params"]))


def _batch(rng, lengths, width, vocab=60):
    ids = np.zeros((len(lengths), width), np.int32)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(3, vocab, size=n)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def _apply(model, params, batch):
    return np.asarray(jax.jit(model.apply)({"params": params}, batch)[0])


def _with_table(params, table):
    return {**params, "position_embeddings": {"embedding": table}}


# ---- the table ----------------------------------------------------------------------------

def test_interpolated_table_reproduces_the_original_rows_at_the_original_positions():
    table = np.random.default_rng(0).normal(size=(512, 24)).astype(np.float32)
    for max_length in (1024, 4096, 8192):
        s = max_length // 512
        longer = ext.interpolate_table(table, max_length)
        assert longer.shape == (max_length, 24)
        np.testing.assert_array_equal(longer[::s][:512], table)
        np.testing.assert_allclose(longer[s // 2::s][:511], (table[:-1] + table[1:]) / 2, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(longer[s * 511:], np.broadcast_to(table[-1], (s, 24)))
        assert ext.new_rows(512, max_length).sum() == max_length - 512
        assert not ext.new_rows(512, max_length)[::s].any()
    np.testing.assert_array_equal(ext.interpolate_table(table, 512), table)


def test_position_maps():
    rows = lambda kind, n, natural=True: np.asarray(ext.table_rows(  # noqa: E731
        kind, jnp.arange(n)[None], jnp.asarray([n]), 512, 4096, natural=natural))[0]
    np.testing.assert_array_equal(rows("interpolate", 300), np.arange(300) * 8)  # fits: the original rows
    np.testing.assert_array_equal(rows("interpolate", 3000), np.arange(3000))
    np.testing.assert_array_equal(rows("interpolate", 300, natural=False), np.arange(300))  # explicit ids
    np.testing.assert_array_equal(rows("grouped", 512), np.arange(512))
    np.testing.assert_array_equal(rows("grouped", 1500), np.arange(1500) // 3)
    np.testing.assert_array_equal(rows("recurrent", 1500), np.arange(1500) % 512)


# ---- models -------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("kind", ["grouped", "recurrent"])
def test_grouped_and_recurrent_models_read_the_mapped_rows(kind):
    """A model with the extension = the plain model given the mapped positions as position_ids."""
    rng = np.random.default_rng(1)
    params = _tiny_params()
    batch = _batch(rng, [50, 37, 9], 50)
    _, extended = _tiny({"type": kind, "max_length": 64})
    _, plain = _tiny()
    n = batch["attention_mask"].sum(1)
    mapped = ext.table_rows(kind, jnp.asarray(np.maximum(np.cumsum(batch["attention_mask"], 1) - 1, 0)),
                            jnp.asarray(n), TRAINED, 64, natural=True)
    ours = _apply(extended, params, batch)
    ref = _apply(plain, params, {**batch, "position_ids": mapped})
    np.testing.assert_array_equal(ours, ref)
    short = _batch(rng, [16, 5], 16)  # an input that fits the table is unchanged by grouping
    if kind == "grouped":
        np.testing.assert_array_equal(_apply(extended, params, short), _apply(plain, params, short))


@pytest.mark.slow
def test_interpolated_model_keeps_short_inputs_and_reads_long_ones_naturally():
    rng = np.random.default_rng(2)
    params = _tiny_params()
    longer = _with_table(params, ext.interpolate_table(params["position_embeddings"]["embedding"], 64))
    _, extended = _tiny({"type": "interpolate", "max_length": 64})
    _, plain = _tiny()
    short = _batch(rng, [16, 7], 16)
    np.testing.assert_array_equal(_apply(extended, longer, short), _apply(plain, params, short))
    long = _batch(rng, [60, 40], 60)
    big_config = BERT.config_from_fields(vocab_size=60, hidden_size=32, num_layers=2, num_heads=4,
                                         intermediate_size=48, max_position_embeddings=64)
    natural = _apply(BERT.build(big_config), longer, long)
    np.testing.assert_array_equal(_apply(extended, longer, long), natural)


@pytest.mark.slow
def test_parallel_context_windows_average_the_windows_weighted_by_token_count():
    """pcw = each 16-token window encoded on its own; mean pooling over the whole input = the
    token-count-weighted mean of the windows' mean-pooled embeddings."""
    rng = np.random.default_rng(3)
    params = _tiny_params()
    _, windowed = _tiny({"type": "pcw", "max_length": 64})
    _, plain = _tiny()
    batch = _batch(rng, [45, 16, 3], 45)
    states = _apply(windowed, params, batch)
    for row, n in enumerate(batch["attention_mask"].sum(1)):
        pooled, weights = [], []
        for start in range(0, n, TRAINED):
            piece = {k: v[row:row + 1, start:min(start + TRAINED, n)] for k, v in batch.items()}
            window_states = _apply(plain, params, piece)[0]
            np.testing.assert_allclose(states[row, start:start + len(window_states)], window_states, atol=1e-5)
            pooled.append(window_states.mean(0))
            weights.append(len(window_states))
        expected = np.average(pooled, axis=0, weights=weights)
        np.testing.assert_allclose(states[row, :n].mean(0), expected, atol=1e-5)


@pytest.mark.slow
def test_minilm_extended_to_2048_embeds_short_texts_as_before():
    texts = ["A man is playing a flute.", "Three dogs run across a green park in the morning."]
    base = ej.Encoder.from_pretrained("all-MiniLM-L6-v2").encode(texts)
    for kind in ("interpolate", "pcw"):  # grouped: the tiny model's test above
        enc = ej.Encoder.from_pretrained("all-MiniLM-L6-v2", max_length=2048, position_extension={"type": kind})
        assert enc.max_length == 2048 and enc.config.max_supported_length == 2048
        np.testing.assert_allclose(enc.encode(texts), base, atol=2e-6, err_msg=kind)
    long_text = " ".join(["the quick brown fox jumps over the lazy dog"] * 100)  # ~900 word pieces
    enc = ej.Encoder.from_pretrained("all-MiniLM-L6-v2", position_extension={"type": "recurrent", "max_length": 1024})
    assert enc.max_length == 1024 and len(enc.tokenizer.token_ids([long_text])[0]) > 512
    assert np.isfinite(enc.encode([long_text])).all()


@pytest.mark.slow
def test_exported_interpolated_model_reloads_in_embedjax_and_transformers(tmp_path):
    """The export is a plain BERT with the longer table: transformers reads long inputs as embedjax
    does; embedjax reads the extension back and keeps short inputs on the original rows."""
    import torch
    from transformers import AutoModel

    vocab = 30522  # MiniLM's tokenizer files come along
    params = _tiny_params(seed=4, vocab=vocab)
    config, _ = _tiny({"type": "interpolate", "max_length": 64}, vocab=vocab)
    longer = _with_table(params, ext.interpolate_table(params["position_embeddings"]["embedding"], 64))
    folder = hf.export_pretrained(tmp_path / "export", config, longer, minilm_path(), max_length=64)
    saved = json.loads((folder / "config.json").read_text())
    assert saved["max_position_embeddings"] == 64
    assert saved["embedjax_position_extension"] == {"type": "interpolate", "max_length": 64,
                                                    "original_max_position_embeddings": TRAINED}
    reloaded, reloaded_params = hf.load_pretrained(folder)
    assert reloaded == config
    np.testing.assert_array_equal(reloaded_params["position_embeddings"]["embedding"],
                                  longer["position_embeddings"]["embedding"])
    batch = _batch(np.random.default_rng(5), [50, 30], 50, vocab=vocab)
    ours = _apply(BERT.build(config), longer, batch)
    with torch.no_grad():
        ref = AutoModel.from_pretrained(str(folder)).eval()(
            **{k: torch.tensor(v).long() for k, v in batch.items()}).last_hidden_state.numpy()
    real = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-5)
    enc = ej.Encoder.from_pretrained(folder)
    assert enc.config.extension == {"type": "interpolate", "max_length": 64} and enc.max_length == 64


def test_position_extension_in_a_training_config_builds_the_longer_table():
    from embedjax.train.config import default_config
    from embedjax.train.loop import model_config_and_params

    cfg = default_config()
    cfg.model.max_length = 1024
    cfg.model.config.position_extension = {"type": "interpolate", "max_length": 1024}
    config, params = model_config_and_params(cfg, BERT, minilm_path(), tokenizer=None)
    assert params["position_embeddings"]["embedding"].shape == (1024, 384)
    assert config.max_position_embeddings == 512 and config.max_supported_length == 1024


# ---- PoSE ---------------------------------------------------------------------------------

def test_pose_position_ids_skip_forward_within_the_target():
    mask = np.zeros((64, 20), bool)
    for i in range(64):
        mask[i, : 2 + i % 19] = True
    target = 512
    ids = np.asarray(ext.pose_position_ids(jnp.asarray(mask), target, jax.random.PRNGKey(0), chunks=3))
    np.testing.assert_array_equal(ids, np.asarray(ext.pose_position_ids(jnp.asarray(mask), target,
                                                                         jax.random.PRNGKey(0), chunks=3)))
    for row, m in zip(ids, mask):
        real = row[m]
        assert real[0] == 0 and real.max() < target
        steps = np.diff(real)
        assert (steps >= 1).all() and (steps > 1).sum() <= 2  # increasing, at most chunks - 1 skips
    assert ids.max() > 256  # the skips reach far rows
    with pytest.raises(ValueError, match="shorter than the batch length"):
        ext.pose_position_ids(jnp.asarray(mask), 10, jax.random.PRNGKey(0))


# ---- bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize("spec,message", [
    ({"type": "stretch", "max_length": 1024}, "type='stretch' is not a position extension"),
    ({"type": "grouped", "max_length": 256}, "max_length=256 is below the 512 positions"),
    ({"type": "interpolate", "max_length": 1000}, "multiple of the trained length 512.*use 1024"),
    ({"type": "grouped"}, "needs max_length"),
    ({"type": "grouped", "max_length": 1024, "factor": 2}, r"unknown key\(s\) \['factor'\]"),
])
def test_bad_extensions_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        hf.load_pretrained(minilm_path(), position_extension=spec)


def test_extension_errors_at_load_time(tmp_path):
    from decoder_fixtures import save_tiny_decoder

    folder = save_tiny_decoder(tmp_path / "llama", "llama")
    with pytest.raises(ValueError, match=r"model family 'llama' has no option\(s\) \['position_extension'\]"):
        ej.Encoder.from_pretrained(folder, max_length=128, position_extension={"type": "interpolate"})
    with pytest.raises(ValueError, match="max_length=4096 exceeds the 2048 positions"):
        ej.Encoder.from_pretrained("all-MiniLM-L6-v2", max_length=4096,
                                   position_extension={"type": "grouped", "max_length": 2048})
    with pytest.raises(ValueError, match="max_length=1024 exceeds the 512 positions"):
        ej.Encoder.from_pretrained("all-MiniLM-L6-v2", max_length=1024)
    _, model = _tiny({"type": "grouped", "max_length": 32})
    with pytest.raises(ValueError, match="sequence length 40 exceeds the 32 positions"):
        _apply(model, _tiny_params(), _batch(np.random.default_rng(0), [40], 40))

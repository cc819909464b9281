"""RoPE scaling types selected at load time (issue 15): linear, NTK-aware, YaRN and SelfExtend.

References: transformers' own RoPE initialisers and forward pass (linear, YaRN) on tiny saved
checkpoints; a float64 NumPy SelfExtend attention written from the reference implementation's
formulation (grouped shift on the key for keys after the query); the identities of the issue
(factor 1 and SelfExtend with group 1 or a window past the length change nothing, bit for bit).
Tolerances: float32 model vs float64 reference, 1e-5 relative on attention outputs of norm ~1;
whole models vs transformers, the decoder parity bound 1e-4 relative per real token.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import meta

import embedjax as ej
from embedjax.convert import hf
from embedjax.models import layers, rope
from embedjax.models.registry import family_for_config
from decoder_fixtures import VOCAB, hf_last_hidden, random_batch, save_tiny_decoder, token_relative_errors


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return save_tiny_decoder(tmp_path_factory.mktemp("rope") / "llama", "llama", seed=5,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def _hidden(folder, batch, **options):
    config, params = hf.load_pretrained(folder, **options)
    model = family_for_config(config).build(config)
    return np.asarray(model.apply({"params": params}, batch)[0])


# ---- frequencies ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["linear", "ntk", "yarn"])
def test_factor_one_leaves_the_frequencies_unchanged(kind):
    base = rope.default_inverse_frequencies(64, 1e5)
    scaled = rope.inverse_frequencies(64, 1e5, {"type": kind, "factor": 1.0, "original_max_position_embeddings": 64})
    np.testing.assert_array_equal(scaled, base)
    assert rope.attention_factor(rope.normalize_scaling({"type": kind, "factor": 1.0,
                                                          "original_max_position_embeddings": 64})) == 1.0


def test_ntk_keeps_the_highest_frequency_and_divides_the_lowest_by_the_factor():
    for factor in (2.0, 4.0, 8.0):
        base = rope.default_inverse_frequencies(64, 10000.0)
        ntk = rope.inverse_frequencies(64, 10000.0, {"type": "ntk", "factor": factor})
        assert ntk[0] == base[0] == 1.0
        np.testing.assert_allclose(ntk[-1], base[-1] / factor, rtol=1e-5)
        assert np.all(np.diff(base / ntk) > 0)  # stretched more the lower the frequency


@pytest.mark.parametrize("kind,extra", [("linear", {}), ("yarn", {"original_max_position_embeddings": 2048}),
                                        ("yarn", {"original_max_position_embeddings": 4096, "beta_fast": 16,
                                                  "beta_slow": 2, "mscale": 0.9, "mscale_all_dim": 0.5})])
def test_frequencies_and_attention_factor_match_transformers(kind, extra):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": kind, "factor": 4.0, **extra}
    config = LlamaConfig(hidden_size=512, num_attention_heads=8, max_position_embeddings=2048,
                         rope_parameters={"rope_theta": 50000.0, **params})
    ref_inv, ref_factor = ROPE_INIT_FUNCTIONS[kind](config, "cpu")
    ours = rope.inverse_frequencies(64, 50000.0, params)
    np.testing.assert_allclose(ours, ref_inv.numpy(), rtol=1e-6)
    assert rope.attention_factor(rope.normalize_scaling(params)) == pytest.approx(ref_factor, rel=1e-12)


def test_supported_lengths():
    assert rope.supported_length(None, 2048) == 2048
    assert rope.supported_length({"type": "linear", "factor": 4.0}, 2048) == 8192
    assert rope.supported_length({"type": "ntk", "factor": 2.0}, 2048) == 4096
    assert rope.supported_length({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
                                 2048) == 4096
    # SelfExtend: the longest input whose largest grouped distance is still a trained one
    for g, w, trained in ((4, 16, 64), (3, 2048, 4096), (9, 512, 4096), (1, 8, 64)):
        longest = rope.supported_length({"type": "self_extend", "group_size": g, "window": w}, trained)
        for length, fits in ((longest, True), (longest + 1, False)):
            before, _, key = (np.asarray(x) for x in rope.self_extend_positions(jnp.arange(length)[None], g, w))
            assert (before.max() - key.min() <= trained - 1) == fits, (g, w, length)


# ---- whole models against transformers ----------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("scaling", [{"rope_type": "linear", "factor": 2.0},
                                     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}])
def test_scaled_decoder_matches_transformers(tmp_path, scaling):
    folder = save_tiny_decoder(tmp_path / "scaled", "llama", seed=2,
                               rope_parameters={"rope_theta": 10000.0, **scaling})
    batch = random_batch(np.random.default_rng(4), rows=3, length=40, vocab=len(VOCAB), side="left")
    ref = hf_last_hidden(folder, batch)
    assert token_relative_errors(_hidden(folder, batch), ref, batch["attention_mask"]).max() <= 1e-4


@pytest.mark.slow
def test_scaling_chosen_at_load_time_matches_a_checkpoint_saved_with_it(tmp_path, llama_folder):
    """rope_scaling given to the loader = the same scaling written in config.json by transformers."""
    batch = random_batch(np.random.default_rng(6), rows=2, length=30, vocab=len(VOCAB), side="left")
    saved = save_tiny_decoder(tmp_path / "yarn", "llama", seed=5,
                              rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 3.0,
                                               "original_max_position_embeddings": 64})
    chosen = _hidden(llama_folder, batch, rope_scaling={"type": "yarn", "factor": 3.0})
    mask = batch["attention_mask"]
    assert token_relative_errors(chosen, hf_last_hidden(saved, batch), mask).max() <= 1e-4
    assert np.abs(chosen - _hidden(llama_folder, batch))[mask.astype(bool)].max() > 1e-3  # it changes the model


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["linear", "ntk"])
def test_factor_one_changes_nothing_in_a_model(llama_folder, kind):
    batch = random_batch(np.random.default_rng(7), rows=3, length=25, vocab=len(VOCAB), side="left")
    np.testing.assert_array_equal(_hidden(llama_folder, batch, rope_scaling={"type": kind, "factor": 1.0}),
                                  _hidden(llama_folder, batch))


# ---- SelfExtend --------------------------------------------------------------------------

def _rotate(x, pos, inv_freq):
    """float64 half-split rotation of x [..., K] at integer position(s) pos."""
    angles = np.asarray(pos, np.float64)[..., None] * inv_freq
    cos, sin = np.cos(np.concatenate([angles, angles], -1)), np.sin(np.concatenate([angles, angles], -1))
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def _self_extend_reference(q, k, v, mask, positions, inv_freq, group, window, causal):
    """float64 [B, L, H, K]: per pair, neighbours (|i - j| < w) at their positions; keys before the
    query at (q: i//g + w - w//g, k: j//g); keys after it at (q: i//g, k: j//g + w - w//g)."""
    b, length, h, d = q.shape
    rep = h // k.shape[2]
    shift = window - window // group
    out = np.zeros((b, length, h, d))
    for bi in range(b):
        for hi in range(h):
            scores = np.full((length, length), -np.inf)
            for i in range(length):
                for j in range(length):
                    if not mask[bi, j] or (causal and j > i):
                        continue
                    pi, pj = positions[bi, i], positions[bi, j]
                    if abs(pi - pj) < window:
                        qp, kp = pi, pj
                    elif pi - pj >= window:
                        qp, kp = pi // group + shift, pj // group
                    else:
                        qp, kp = pi // group, pj // group + shift
                    qr = _rotate(q[bi, i, hi], qp, inv_freq)
                    kr = _rotate(k[bi, j, hi // rep], kp, inv_freq)
                    scores[i, j] = qr @ kr / np.sqrt(d)
            for i in range(length):
                if np.isinf(scores[i]).all():
                    continue  # a padding query with no visible key: undefined, masked by callers
                p = np.exp(scores[i] - scores[i].max())
                out[bi, i, hi] = (p / p.sum()) @ v[bi, :, hi // rep]
    return out


def _attention_module(causal, impl, window):
    spec = layers.AttentionSpec(4, 2, 8, mask="causal" if causal else "bidirectional", impl=impl, chunk_size=8,
                                self_extend_window=window)
    return layers.Attention(spec, hidden_size=16, init_std=0.3)  # outputs of order 1


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["chunked", "explicit"])
@pytest.mark.parametrize("causal,side", [(False, "right"), (True, "left")])
def test_self_extend_attention_matches_a_float64_reference(impl, causal, side):
    rng = np.random.default_rng(11)
    length, group, window = 23, 3, 4
    batch = random_batch(rng, rows=2, length=length, vocab=50, side=side)
    mask = batch["attention_mask"]
    x = jnp.asarray(rng.normal(size=(2, length, 16)), jnp.float32)
    positions = rope.positions_from_mask(jnp.asarray(mask))
    scaling = rope.normalize_scaling({"type": "self_extend", "group_size": group, "window": window})
    tables = rope.rotary_tables(positions, 8, 10000.0, scaling)
    module = _attention_module(causal, impl, window)
    params = meta.unbox(module.init(jax.random.PRNGKey(0), x, jnp.asarray(mask), tables, True)["params"])
    proj = {n: (np.asarray(params[n]["kernel"], np.float64), np.asarray(params[n]["bias"], np.float64))
            for n in ("q", "k", "v")}
    q, k, v = (np.einsum("bld,dhk->blhk", np.asarray(x, np.float64), w) + bias for w, bias in
               (proj["q"], proj["k"], proj["v"]))
    ctx = _self_extend_reference(q, k, v, mask, np.asarray(positions), rope.default_inverse_frequencies(8, 10000.0)
                                 .astype(np.float64), group, window, causal)
    w_o, b_o = np.asarray(params["o"]["kernel"], np.float64), np.asarray(params["o"]["bias"], np.float64)
    ref = np.einsum("blhk,hkd->bld", ctx, w_o) + b_o
    ours = np.asarray(module.apply({"params": params}, x, jnp.asarray(mask), tables, True), np.float64)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], rtol=1e-5, atol=1e-5)
    plain = np.asarray(_attention_module(causal, impl, None).apply(
        {"params": params}, x, jnp.asarray(mask), rope.rotary_tables(positions, 8, 10000.0), True))
    assert np.abs(plain[real] - ours[real]).max() > 1e-3  # grouping past the window changes the output


@pytest.mark.parametrize("impl", ["chunked", "explicit"])
def test_self_extend_kernel_with_group_one_computes_plain_attention(impl):
    """Forced through SelfExtend's score selection (the model skips it when it cannot matter),
    group size 1 gives plain attention up to float32 summation order."""
    rng = np.random.default_rng(12)
    batch = random_batch(rng, rows=2, length=19, vocab=50, side="right")
    mask = jnp.asarray(batch["attention_mask"])
    x = jnp.asarray(rng.normal(size=(2, 19, 16)), jnp.float32)
    positions = rope.positions_from_mask(mask)
    plain = rope.rotary_tables(positions, 8, 10000.0)
    inv_freq = rope.default_inverse_frequencies(8, 10000.0)
    grouped = [rope.rope_tables(p, inv_freq) for p in rope.self_extend_positions(positions, 1, 4)]
    forced = rope.RotaryTables(plain.cos, plain.sin, *grouped, positions)
    module = _attention_module(False, impl, 4)
    params = module.init(jax.random.PRNGKey(1), x, mask, plain, True)["params"]
    a = np.asarray(module.apply({"params": params}, x, mask, forced, True))
    b = np.asarray(module.apply({"params": params}, x, mask, plain, True))
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["chunked", "explicit"])
@pytest.mark.parametrize("attention,side", [("causal", "left"), ("bidirectional", "right")])
def test_self_extend_with_group_one_or_a_window_past_the_length_is_plain_attention(llama_folder, impl, attention,
                                                                                 side):
    batch = random_batch(np.random.default_rng(8), rows=3, length=30, vocab=len(VOCAB), side=side)
    plain = _hidden(llama_folder, batch, attention=attention, attention_impl=impl)
    for group, window in ((1, 4), (4, 30), (8, 64)):
        extended = _hidden(llama_folder, batch, attention=attention, attention_impl=impl,
                           rope_scaling={"type": "self_extend", "group_size": group, "window": window})
        np.testing.assert_array_equal(extended, plain)


@pytest.mark.slow
def test_self_extend_reaches_past_the_trained_context_through_the_encoder(llama_folder):
    """The tiny model was trained on 64 positions; SelfExtend (4, 16) supports 4 * (64 - 16 + 4) = 208."""
    enc = ej.Encoder.from_pretrained(llama_folder, max_length=200, pooling="mean",
                                     rope_scaling={"type": "self_extend", "group_size": 4, "window": 16})
    assert enc.config.max_supported_length == 208
    text = " ".join(VOCAB[4 + i % 20] for i in range(180))
    emb = enc.encode([text, "the dog runs"])
    assert np.isfinite(emb).all() and emb.shape == (2, 48)
    with pytest.raises(ValueError, match="max_length=300 exceeds the 208 positions"):
        ej.Encoder.from_pretrained(llama_folder, max_length=300,
                                   rope_scaling={"type": "self_extend", "group_size": 4, "window": 16})


# ---- bad input -------------------------------------------------------------------------

@pytest.mark.parametrize("scaling,message", [
    ({"type": "linear", "factor": 0.5}, "factor=0.5 is below 1"),
    ({"type": "ntk", "factor": 0.9}, "factor=0.9 is below 1"),
    ({"type": "yarn", "factor": 0.25}, "factor=0.25 is below 1"),
    ({"type": "dynamic", "factor": 2.0}, "'dynamic', which embedjax does not implement"),
    ({"type": "ntk"}, r"lacks \['factor'\]"),
    ({"type": "self_extend", "group_size": 0, "window": 16}, "group_size=0 must be an integer >= 1"),
    ({"type": "self_extend", "group_size": 2, "window": 1.5}, "window=1.5 must be an integer >= 1"),
    ({"type": "self_extend", "window": 16}, r"lacks \['group_size'\]"),
])
def test_bad_scalings_are_refused_at_load_time(llama_folder, scaling, message):
    with pytest.raises(ValueError, match=message):
        ej.Encoder.from_pretrained(llama_folder, rope_scaling=scaling)


def test_a_max_length_past_what_the_scaling_supports_is_refused(llama_folder):
    ej.Encoder.from_pretrained(llama_folder, max_length=128, rope_scaling={"type": "linear", "factor": 2.0})
    with pytest.raises(ValueError, match="max_length=129 exceeds the 128 positions"):
        ej.Encoder.from_pretrained(llama_folder, max_length=129, rope_scaling={"type": "ntk", "factor": 2.0})
    with pytest.raises(ValueError, match="max_length=65 exceeds the 64 positions"):
        ej.Encoder.from_pretrained(llama_folder, max_length=65)


def test_rope_scaling_on_bert_and_self_extend_with_xla_attention_are_refused(llama_folder):
    from embedjax.models.pretrained import minilm_path

    with pytest.raises(ValueError, match=r"model family 'bert' has no option\(s\) \['rope_scaling'\]"):
        ej.Encoder.from_pretrained(minilm_path(), rope_scaling={"type": "linear", "factor": 2.0})
    with pytest.raises(ValueError, match=r"model family '[a-z0-9]+' has no option\(s\) \['position_extension'\]"):
        ej.Encoder.from_pretrained(llama_folder, position_extension={"type": "interpolate", "max_length": 128})
    config, params = hf.load_pretrained(llama_folder, attention_impl="xla",
                                        rope_scaling={"type": "self_extend", "group_size": 2, "window": 8})
    batch = random_batch(np.random.default_rng(0), rows=1, length=12, vocab=len(VOCAB))
    with pytest.raises(ValueError, match="attention_impl='xla'.*cannot select SelfExtend"):
        family_for_config(config).build(config).apply({"params": params}, batch)
    config, params = hf.load_pretrained(llama_folder, attention_impl="flash",
                                        rope_scaling={"type": "self_extend", "group_size": 2, "window": 8})
    with pytest.raises(ValueError, match="attention_impl='flash'.*cannot select SelfExtend"):
        family_for_config(config).build(config).apply({"params": params}, batch)
    with pytest.raises(ValueError, match="attention_impl='flash2' is not an attention implementation"):
        hf.load_pretrained(llama_folder, attention_impl="flash2")


def test_rope_scaling_in_a_training_config_reaches_the_model(llama_folder):
    """model.config.rope_scaling goes through the family's configure like any other field."""
    from embedjax.train.loop import model_config_and_params
    from embedjax.train.config import default_config

    cfg = default_config()
    cfg.model.max_length = 100
    cfg.model.config.rope_scaling = {"type": "ntk", "factor": 2.0}
    family = family_for_config(hf.read_config(llama_folder))
    config, _ = model_config_and_params(cfg, family, llama_folder, tokenizer=None)
    assert config.scaling == {"type": "ntk", "factor": 2.0} and config.max_supported_length == 128
    cfg.model.config.rope_scaling = {"type": "ntk", "factor": 0.5}
    with pytest.raises(ValueError, match="factor=0.5 is below 1"):
        model_config_and_params(cfg, family, llama_folder, tokenizer=None)
    assert dataclasses.replace(config, rope_scaling=None).max_supported_length == 64

"""GradCache equals the plain step (loss and every parameter gradient), with dropout
keys shared between its two passes, while compiled temp memory falls with the sub-batch."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from embedjax.losses import contrastive
from embedjax.losses.gradcache import gradcache_value_and_grad, reference_value_and_grad

# Parameter gradients are sums over the batch in a different grouping (per sub-batch,
# then across sub-batches): float32 rounding, well below 1e-5 of each leaf's largest entry.
RTOL = 1e-5


class _Tower(nn.Module):
    width: int = 64

    @nn.compact
    def __call__(self, x, deterministic: bool):
        x = nn.gelu(nn.Dense(self.width)(x))
        x = nn.Dropout(0.2)(x, deterministic=deterministic)
        return nn.Dense(16)(x)


def _tiny_setup(batch=24, width=64):
    model = _Tower(width)
    rng = np.random.default_rng(0)
    data = {"q": rng.normal(size=(batch, 12)).astype(np.float32), "d": rng.normal(size=(batch, 12)).astype(np.float32)}
    params = jax.jit(lambda key, x: model.init(key, x, True))(jax.random.key(0), data["q"])["params"]

    def embed_fn(p, sub, key):
        run = lambda x, k: model.apply({"params": p}, x, k is None, rngs=None if k is None else {"dropout": k})  # noqa: E731
        return {"q": run(sub["q"], None if key is None else jax.random.fold_in(key, 0)),
                "d": run(sub["d"], None if key is None else jax.random.fold_in(key, 1))}

    def loss_fn(e):
        return contrastive.infonce(e["q"], e["d"], temperature=0.1, bidirectional=True)

    return embed_fn, loss_fn, params, data


def _assert_tree_close(expected, actual):
    """Per-leaf error relative to the leaf's largest entry. BERT's attention key bias has an
    exact gradient of zero (softmax ignores a shift shared by all keys), so both sides hold
    only rounding noise of the terms they sum: that leaf is compared against the largest
    gradient anywhere instead."""
    overall = max(float(np.max(np.abs(np.asarray(e)))) for e in jax.tree.leaves(expected))
    for path, e in jax.tree_util.tree_leaves_with_path(expected):
        a = np.asarray(dict(jax.tree_util.tree_leaves_with_path(actual))[path])
        e = np.asarray(e)
        zero_by_construction = "['attention']['k']['bias']" in jax.tree_util.keystr(path)
        err = np.max(np.abs(a - e)) / (overall if zero_by_construction else max(np.max(np.abs(e)), 1e-30))
        assert err <= RTOL, f"{jax.tree_util.keystr(path)}: relative error {err:.2e}"


def _plain(embed_fn, loss_fn, params, data):
    return jax.value_and_grad(lambda p: loss_fn(embed_fn(p, data, None)))(params)


@pytest.mark.parametrize("sub_batch_size", [1, 8])
def test_gradcache_equals_plain_step_tiny_model(sub_batch_size):
    embed_fn, loss_fn, params, data = _tiny_setup()
    loss, grads = jax.jit(lambda p: gradcache_value_and_grad(embed_fn, loss_fn, p, data,
                                                             sub_batch_size=sub_batch_size))(params)
    expected_loss, expected = jax.jit(lambda p: _plain(embed_fn, loss_fn, p, data))(params)
    np.testing.assert_allclose(float(loss), float(expected_loss), rtol=1e-6)
    _assert_tree_close(expected, grads)


def test_gradcache_dropout_uses_the_same_keys_in_both_passes():
    embed_fn, loss_fn, params, data = _tiny_setup()
    key = jax.random.key(3)
    loss, grads = jax.jit(lambda p: gradcache_value_and_grad(embed_fn, loss_fn, p, data, sub_batch_size=12,
                                                             rng=key))(params)
    ref_loss, ref = jax.jit(lambda p: reference_value_and_grad(embed_fn, loss_fn, p, data, sub_batch_size=12,
                                                               rng=key))(params)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    _assert_tree_close(ref, grads)
    plain_loss, _ = jax.jit(lambda p: _plain(embed_fn, loss_fn, p, data))(params)
    assert abs(float(loss) - float(plain_loss)) > 1e-4   # dropout really was active


def _temp_bytes(fn, params):
    return jax.jit(fn).lower(params).compile().memory_analysis().temp_size_in_bytes


def test_gradcache_temp_memory_falls_with_sub_batch_tiny_model():
    # Wide hidden layer so encoder activations (not the [B, B] loss) dominate temp memory.
    embed_fn, loss_fn, params, data = _tiny_setup(batch=256, width=4096)
    sizes = [256, 64, 16]
    temps = [_temp_bytes(lambda p, s=s: gradcache_value_and_grad(embed_fn, loss_fn, p, data, sub_batch_size=s),
                         params) for s in sizes]
    assert temps[0] > temps[1] > temps[2], dict(zip(sizes, temps))


def test_gradcache_bad_sub_batch():
    embed_fn, loss_fn, params, data = _tiny_setup()
    with pytest.raises(ValueError, match="not divisible by sub_batch_size 5"):
        gradcache_value_and_grad(embed_fn, loss_fn, params, data, sub_batch_size=5)
    with pytest.raises(ValueError, match="same leading"):
        gradcache_value_and_grad(embed_fn, loss_fn, params, {"q": data["q"], "d": data["d"][:4]}, sub_batch_size=4)


# ------------------------------------------------------------------ pretrained MiniLM


def _minilm_setup(minilm_dir, data_dir, pairs=16, max_length=32):
    from embedjax.convert.hf import load_pretrained
    from embedjax.data import read_sts
    from embedjax.data.tokenization import Tokenizer
    from embedjax.encoder import embed_batch, encoder_params
    from embedjax.models.towers.bert import BertModel

    config, backbone = load_pretrained(minilm_dir)
    model = BertModel(config)
    params = encoder_params(backbone)
    s1, s2, _ = read_sts(data_dir / "stsb" / "sts-dev.csv")
    tok = Tokenizer.from_folder(minilm_dir, max_length=max_length)
    q, d = tok(s1[:pairs]), tok(s2[:pairs])
    length = max(q["input_ids"].shape[1], d["input_ids"].shape[1])
    q, d = tok.pad(tok.token_ids(s1[:pairs]), length), tok.pad(tok.token_ids(s2[:pairs]), length)
    data = {"q": {k: np.asarray(v) for k, v in q.items()}, "d": {k: np.asarray(v) for k, v in d.items()}}

    def embed_fn(p, sub, key):
        def run(tokens, k):
            return embed_batch(model, p, tokens, pooling="mean", normalize=True, deterministic=k is None,
                               rngs=None if k is None else {"dropout": k})
        return {"q": run(sub["q"], None if key is None else jax.random.fold_in(key, 0)),
                "d": run(sub["d"], None if key is None else jax.random.fold_in(key, 1))}

    def loss_fn(e):
        return contrastive.infonce(e["q"], e["d"], temperature=0.05)

    return embed_fn, loss_fn, params, data


def test_gradcache_equals_plain_step_pretrained_minilm(minilm_dir, data_dir):
    embed_fn, loss_fn, params, data = _minilm_setup(minilm_dir, data_dir)
    loss, grads = jax.jit(lambda p: gradcache_value_and_grad(embed_fn, loss_fn, p, data, sub_batch_size=4))(params)
    expected_loss, expected = jax.jit(lambda p: _plain(embed_fn, loss_fn, p, data))(params)
    np.testing.assert_allclose(float(loss), float(expected_loss), rtol=1e-6)
    assert float(loss) > 0.01  # real sentences, real weights: a non-trivial loss and gradient
    _assert_tree_close(expected, grads)


@pytest.mark.slow
def test_gradcache_minilm_temp_memory_falls_with_sub_batch(minilm_dir, data_dir):
    embed_fn, loss_fn, params, data = _minilm_setup(minilm_dir, data_dir, pairs=32)
    sizes = [32, 8, 2]
    temps = [_temp_bytes(lambda p, s=s: gradcache_value_and_grad(embed_fn, loss_fn, p, data, sub_batch_size=s),
                         params) for s in sizes]
    assert temps[0] > temps[1] > temps[2], dict(zip(sizes, temps))

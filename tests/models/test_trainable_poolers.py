"""Trainable poolers as heads: NV-Embed latent attention (against a PyTorch module written here),
the softmax layer mix, and the latent keys/values computed once per training step.

Tolerance 1e-5: float32 on both sides, summation orders differ (~1e-6 observed).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embedjax.models.heads import build_head
from embedjax.models.latent_attention import LatentKV
from embedjax.train.step import Objective, make_embed, make_objective, value_and_grad_fn


def _torch_latent_attention(width, n_latents, heads, head_dim, mult):
    """NV-Embed's pooler as its paper and model card describe it, in plain PyTorch."""
    import torch
    from torch import nn

    class LatentAttention(nn.Module):
        def __init__(self):
            super().__init__()
            inner = heads * head_dim
            self.latents = nn.Parameter(torch.randn(n_latents, width))
            self.norm_q, self.norm_c, self.norm_f = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
            self.to_q = nn.Linear(width, inner, bias=False)
            self.to_kv = nn.Linear(width, 2 * inner, bias=False)
            self.to_out = nn.Linear(inner, width)
            self.ff_in, self.ff_out = nn.Linear(width, 2 * mult * width), nn.Linear(mult * width, width)

        def forward(self, x, mask):
            b, length, _ = x.shape
            q = self.to_q(self.norm_q(x)).view(b, length, heads, head_dim).transpose(1, 2)
            k, v = self.to_kv(self.norm_c(self.latents)).chunk(2, dim=-1)
            k = k.view(n_latents, heads, head_dim).transpose(0, 1)
            v = v.view(n_latents, heads, head_dim).transpose(0, 1)
            attn = torch.softmax(q @ k.transpose(-1, -2) * head_dim ** -0.5, dim=-1)
            x = x + self.to_out((attn @ v).transpose(1, 2).reshape(b, length, -1))
            a, g = self.ff_in(self.norm_f(x)).chunk(2, dim=-1)
            x = x + self.ff_out(a * torch.nn.functional.gelu(g))
            m = mask.float()[..., None]
            return (x * m).sum(1) / m.sum(1)

    torch.manual_seed(0)
    module = LatentAttention().double().eval()
    with torch.no_grad():  # LayerNorm affine parameters away from (1, 0)
        for norm in (module.norm_q, module.norm_c, module.norm_f):
            norm.weight.add_(0.2 * torch.randn_like(norm.weight))
            norm.bias.add_(0.1 * torch.randn_like(norm.bias))
    return module


def _flax_params(module):
    def dense(linear):
        out = {"kernel": linear.weight.detach().numpy().T}
        if linear.bias is not None:
            out["bias"] = linear.bias.detach().numpy()
        return out

    def norm(layer):
        return {"scale": layer.weight.detach().numpy(), "bias": layer.bias.detach().numpy()}

    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), {
        "latent_kv": {"latents": module.latents.detach().numpy(), "latent_norm": norm(module.norm_c),
                      "to_kv": dense(module.to_kv)},
        "query_norm": norm(module.norm_q), "to_q": dense(module.to_q), "to_out": dense(module.to_out),
        "ff_norm": norm(module.norm_f), "ff_in": dense(module.ff_in), "ff_out": dense(module.ff_out)})


def test_latent_attention_equals_a_pytorch_module():
    import torch

    width, n_latents, heads, head_dim, mult = 24, 7, 3, 5, 2
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 9, width)).astype(np.float32)
    mask = np.ones((4, 9), np.int32)
    mask[1, 6:] = 0
    mask[2, :3] = 0  # left padding
    torch_module = _torch_latent_attention(width, n_latents, heads, head_dim, mult)
    with torch.no_grad():
        expected = torch_module(torch.tensor(x, dtype=torch.float64), torch.tensor(mask)).numpy()
    head = build_head({"type": "latent_attention", "n_latents": n_latents, "heads": heads, "head_dim": head_dim,
                       "mlp_ratio": mult}, pooling="mean")
    params = _flax_params(torch_module)
    initialised = nn.meta.unbox(head.init(jax.random.PRNGKey(0), x, mask)["params"])
    assert jax.tree.map(jnp.shape, initialised) == jax.tree.map(jnp.shape, params)
    ours = np.asarray(head.apply({"params": params}, x, mask))
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=1e-5)
    # the batch-independent keys/values handed in give the same result
    shared = head.batch_independent(params)
    np.testing.assert_allclose(np.asarray(head.apply({"params": params}, x, mask, shared=shared)), ours, atol=1e-6)


def test_layer_mix_is_a_softmax_mix_of_every_hidden_state():
    rng = np.random.default_rng(1)
    states = [rng.normal(size=(3, 5, 8)).astype(np.float32) for _ in range(4)]
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], np.int32)
    head = build_head({"type": "layer_mix"}, pooling="mean")
    params = nn.meta.unbox(head.init(jax.random.PRNGKey(0), states[-1], mask, tuple(states))["params"])
    np.testing.assert_array_equal(np.asarray(params["layer_logits"]), np.zeros(4))  # uniform at start
    logits = np.array([0.3, -1.0, 2.0, 0.5], np.float32)
    out = np.asarray(head.apply({"params": {"layer_logits": logits}}, states[-1], mask, tuple(states)))
    w = np.exp(logits) / np.exp(logits).sum()
    mixed = sum(wi * s for wi, s in zip(w, states))
    m = mask[..., None].astype(np.float64)
    np.testing.assert_allclose(out, (mixed * m).sum(1) / m.sum(1), atol=1e-5)
    assert head.needs_hidden_states
    with pytest.raises(ValueError, match="needs every layer's hidden states"):
        head.apply({"params": {"layer_logits": logits}}, states[-1], mask, None)


class _TinyBackbone:
    """A stand-in backbone: token embeddings only (what the head sees is all this test needs)."""

    config = None

    def __init__(self, vocab=20, width=12):
        self.table = jax.random.normal(jax.random.PRNGKey(3), (vocab, width))

    def apply(self, variables, tokens, deterministic=True, output_hidden_states=False, rngs=None):
        hidden = variables["params"]["table"][tokens["input_ids"]]
        return hidden, {"hidden_states": None}


@pytest.mark.slow  # compiles a training step twice (~140 s on 2 loaded cores)
def test_latent_keys_and_values_are_computed_once_per_step(monkeypatch):
    """A retrieval step embeds 3 columns; with GradCache every sub-batch twice. K/V of the latents
    are computed once (traced once) and the gradients equal those of the naive per-call path."""
    calls = []
    original = LatentKV.__call__

    def counting(self, width):
        calls.append(width)
        return original(self, width)

    monkeypatch.setattr(LatentKV, "__call__", counting)
    model = _TinyBackbone()
    head = build_head({"type": "latent_attention", "n_latents": 5, "heads": 2, "mlp_ratio": 1}, pooling="mean")
    rng = np.random.default_rng(0)

    def tokens(rows, length):
        return {"input_ids": jnp.asarray(rng.integers(0, 20, (rows, length))),
                "attention_mask": jnp.ones((rows, length), jnp.int32)}

    batch = {"query": tokens(4, 6), "positive": tokens(4, 7), "query_id": jnp.arange(4), "positive_id": jnp.arange(4),
             "negatives": jax.tree.map(lambda x: x.reshape(4, 1, -1), tokens(4, 7)),
             "negative_ids": jnp.arange(4, 8).reshape(4, 1)}
    head_params = nn.meta.unbox(head.init(jax.random.PRNGKey(1), jnp.zeros((1, 3, 12)), jnp.ones((1, 3)))["params"])
    params = {"backbone": {"table": model.table}, "head": head_params}
    embed = make_embed(model, pooling="mean", normalize=True, head=head)
    objective = make_objective(embed, kind="retrieval", loss="infonce", temperature=0.1)
    assert objective.precompute is not None
    naive = Objective(objective.embed_columns, objective.loss_from_embeddings)  # K/V inside every call
    for sub_batch in (0, 2):
        calls.clear()
        loss, grads = jax.jit(value_and_grad_fn(objective, sub_batch))(params, batch, jax.random.PRNGKey(0))
        assert len(calls) == 1, f"gradcache_sub_batch={sub_batch}: latent K/V traced {len(calls)} times"
        calls.clear()
        loss_naive, grads_naive = jax.jit(value_and_grad_fn(naive, sub_batch))(params, batch, jax.random.PRNGKey(0))
        assert len(calls) >= 3
        np.testing.assert_allclose(float(loss), float(loss_naive), rtol=1e-6)
        for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_naive)):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6)
        assert float(jnp.abs(grads["head"]["latent_kv"]["latents"]).max()) > 0

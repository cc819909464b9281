"""The MLP activations of `embedjax.models.layers` against float64 and PyTorch references."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from embedjax.models import layers

# The erf spelling against float64: 6.8e-7 at worst on these inputs (jax.nn.gelu's erfc form 3.5e-7),
# 1.3e-6 on the larger N(0, 4) sample of benchmarks/gelu_forms.json; the worst sits in the negative
# tail, where 1 + erf cancels in float32. 2e-6 holds both with room for other CPUs' erf.
ABS_TOL = 2e-6


def _phi64(x):
    """The standard normal CDF in float64."""
    return 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def _gelu64(x):
    return x * _phi64(x)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((37, 301)) * 2.0).astype(np.float32)
    x[0, :7] = [-9.0, -5.5, -4.0, 0.0, 3.9, 6.0, 12.0]  # tails, zero and where XLA's erf saturates
    return x


def test_gelu_is_the_exact_erf_form_within_float32(inputs):
    out = np.asarray(jax.jit(layers.ACTIVATIONS["gelu"])(jnp.asarray(inputs)), np.float64)
    assert np.abs(out - _gelu64(inputs.astype(np.float64))).max() < ABS_TOL
    # The tanh approximation is ~5e-4 away: the test tells the two apart.
    tanh = np.asarray(jax.nn.gelu(jnp.asarray(inputs), approximate=True), np.float64)
    assert np.abs(tanh - _gelu64(inputs.astype(np.float64))).max() > 100 * ABS_TOL


def test_gelu_matches_pytorch_gelu(inputs):
    ours = np.asarray(layers.gelu_erf(jnp.asarray(inputs)))
    theirs = torch.nn.functional.gelu(torch.from_numpy(inputs)).numpy()
    assert np.abs(ours - theirs).max() < ABS_TOL


def test_gelu_gradient_is_phi_plus_x_density(inputs):
    x64 = inputs.astype(np.float64)
    want = _phi64(x64) + x64 * np.exp(-0.5 * x64 ** 2) / math.sqrt(2.0 * math.pi)
    got = np.asarray(jax.grad(lambda x: layers.gelu_erf(x).sum())(jnp.asarray(inputs)), np.float64)
    assert np.abs(got - want).max() < 1e-5  # d/dx rounds through erf's derivative exp(-x^2 / 2)


def test_gelu_keeps_bfloat16(inputs):
    x = jnp.asarray(inputs, jnp.bfloat16)
    out = layers.gelu_erf(x)
    assert out.dtype == jnp.bfloat16
    want = _gelu64(np.asarray(x, np.float64))
    assert (np.abs(np.asarray(out, np.float64) - want) <= 2.0 ** -7 * np.maximum(np.abs(want), 1.0)).all()

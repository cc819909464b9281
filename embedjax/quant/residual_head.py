"""Trainable residual binarisation head (BEBR-style recurrent binarisation).

A Flax module maps a float embedding x [D] to P bit-planes of D bits:

    r_0 = x;  b_p = sign(E_p r_p)  (E_p: Dense D -> D);  x_hat_p = sum_{j<=p} B_j b_j;  r_{p+1} = x - x_hat_p

with ``B_p`` linear decoders (D x D, no bias). ``sign`` is trained with the
straight-through estimator (forward sign, backward the gradient of
``clip(., -1, 1)``). Initialised at the greedy residual quantiser (``E_p = I``,
``B_p = w_p I``) and trained embedding-to-embedding: the loss makes inner products of
float queries with reconstructed documents match the float inner products
(in-batch listwise KL at temperature ``tau`` plus a reconstruction MSE).

Because the decoder is linear, a float query scores a code as
``<q, x_hat> = sum_p <B_p^T q, b_p>``: project the query once per plane
(``project_queries``) and score the packed bits with
``kernels.residual.residual_topk``.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from embedjax.quant.binary import pack_bits
from embedjax.quant.residual import fit_residual_weights


def ste_sign(x):
    """+1 where x > 0 else -1 (matches ``pack_bits``); straight-through gradient of clip(x, -1, 1)."""
    hard = jnp.where(x > 0, 1.0, -1.0).astype(x.dtype)
    soft = jnp.clip(x, -1.0, 1.0)
    return soft + jax.lax.stop_gradient(hard - soft)


def _scaled_identity(scale):
    def init(key, shape, dtype=jnp.float32):
        del key
        return (scale * jnp.eye(shape[0], shape[1])).astype(dtype)

    return init


class ResidualBinarizer(nn.Module):
    """``apply(params, x_nd) -> (logits_npd, recon_nd)``; bits are ``logits > 0``.

    ``init_weights`` only fixes the number of planes and the identity-scaled
    initial decoders; ``train_residual_binarizer`` re-initialises the planes to
    random rotations with greedy weights before training.
    """

    dim: int
    init_weights: tuple[float, ...]

    @nn.compact
    def __call__(self, x_nd):
        recon = jnp.zeros_like(x_nd)
        logits = []
        for p, w in enumerate(self.init_weights):
            residual = x_nd - recon
            logit = nn.Dense(self.dim, kernel_init=_scaled_identity(1.0), name=f"encoder_{p}")(residual)
            bits = ste_sign(logit)
            recon = recon + nn.Dense(self.dim, use_bias=False, kernel_init=_scaled_identity(w), name=f"decoder_{p}")(bits)
            logits.append(logit)
        return jnp.stack(logits, axis=1), recon


def _loss(params, model, x_bd, tau, mse_weight, kl_weight):
    # The first half of the batch plays queries (float), the second half
    # documents (reconstructed): no query meets its own reconstruction, which
    # would reward inflating every reconstruction along its input.
    half = x_bd.shape[0] // 2
    queries, docs = x_bd[:half], x_bd[half:]
    _, recon = model.apply({"params": params}, docs)
    target = queries @ docs.T / tau
    approx = queries @ recon.T / tau
    kl = jnp.mean(jnp.sum(jax.nn.softmax(target) * (jax.nn.log_softmax(target) - jax.nn.log_softmax(approx)), axis=1))
    mse = jnp.mean(jnp.sum((recon - docs) ** 2, axis=1))
    return kl_weight * kl + mse_weight * mse


def rotated_greedy_init(x_nd: np.ndarray, planes: int, seed: int = 0) -> dict:
    """Params of the greedy residual quantiser in random rotated bases.

    Plane p encodes with an orthogonal ``R_p`` (``b_p = sign(r_p R_p)``) and decodes
    with ``w_p R_p^T``, ``w_p = mean |r_p R_p|`` (the least-squares scale of a sign
    vector). A rotation spreads variance evenly over the bits, which already
    beats signs in the original basis; training starts from here.
    """
    rng = np.random.default_rng(seed)
    dim = x_nd.shape[1]
    params, residual = {}, x_nd.astype(np.float64)
    for p in range(planes):
        rot = np.linalg.qr(rng.standard_normal((dim, dim)))[0]
        logits = residual @ rot
        w = float(np.mean(np.abs(logits)))
        params[f"encoder_{p}"] = {"kernel": jnp.asarray(rot, jnp.float32), "bias": jnp.zeros((dim,), jnp.float32)}
        params[f"decoder_{p}"] = {"kernel": jnp.asarray(w * rot.T, jnp.float32)}
        residual = residual - w * np.where(logits > 0, 1.0, -1.0) @ rot.T
    return params


def train_residual_binarizer(train_nd, planes: int, *, steps: int = 200, batch_size: int = 512,
                             learning_rate: float = 1e-5, tau: float = 0.05, mse_weight: float = 1.0, kl_weight: float = 1.0,
                             seed: int = 0):
    """Fit the head on float embeddings [N, D] (``steps=0`` returns the rotated greedy init).

    Returns ``{"params", "init_weights", "dim"}`` for ``encode_codes`` / ``project_queries``.
    """
    x = np.asarray(train_nd, np.float32)
    if x.ndim != 2 or x.shape[0] < 4:
        raise ValueError(f"train_nd must be [N >= 4, D] float embeddings; got shape {x.shape}")
    if planes < 1:
        raise ValueError(f"planes must be >= 1; got {planes}")
    weights = tuple(float(w) for w in np.asarray(fit_residual_weights(x, planes)))
    model = ResidualBinarizer(dim=x.shape[1], init_weights=weights)
    params = rotated_greedy_init(x, planes, seed)
    optimizer = optax.adam(learning_rate)
    opt_state = optimizer.init(params)
    batch = min(batch_size, x.shape[0])

    @jax.jit
    def step(params, opt_state, x_bd):
        loss, grads = jax.value_and_grad(_loss)(params, model, x_bd, tau, mse_weight, kl_weight)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.choice(x.shape[0], size=batch, replace=False)
        params, opt_state, _ = step(params, opt_state, jnp.asarray(x[idx]))
    return {"params": params, "init_weights": weights, "dim": x.shape[1]}


def _model(trained):
    return ResidualBinarizer(dim=trained["dim"], init_weights=trained["init_weights"])


@functools.partial(jax.jit, static_argnums=0)
def _logits(model, params, x_nd):
    return model.apply({"params": params}, x_nd)[0]


def encode_codes(trained, x_nd):
    """Packed codes uint32 [N, P, W] for float embeddings [N, D]."""
    logits = _logits(_model(trained), trained["params"], jnp.asarray(x_nd, jnp.float32))
    return jnp.stack([pack_bits(logits[:, p]) for p in range(logits.shape[1])], axis=1)


def decode_codes_reconstruction(trained, x_nd):
    """Reconstruction float32 [N, D] (what the codes represent), for analysis and tests."""
    return _model(trained).apply({"params": trained["params"]}, jnp.asarray(x_nd, jnp.float32))[1]


def project_queries(trained, q_qd):
    """Per-plane projected queries float32 [Q, P, D]: ``q @ B_p^T`` for each plane's decoder."""
    q = jnp.asarray(q_qd, jnp.float32)
    planes = len(trained["init_weights"])
    return jnp.stack([q @ trained["params"][f"decoder_{p}"]["kernel"].T for p in range(planes)], axis=1)

"""The all-gather InfoNCE baseline: what open_clip's ``gather_with_grad`` and
sentence-transformers' gathered negatives do. Each device all-gathers every document
(and hard negative), scores its B/n queries against all of them ([B/n, B(1+K)] logits
held in memory, twice for the backward pass) and autodiff does the rest.

Used as the memory/speed reference for the ring loss in ``python -m embedjax bench loss``;
it gives the same value as `contrastive.infonce` with default options.

With ``row_block`` it scores the local queries in stripes of ``row_block`` rows against every
gathered key and forms the gradients in the same pass (the loss of one row needs only its own
stripe, whose log-sum-exp is final once the stripe is scored): 6 B^2 d FLOPs like the dense
loss, where the ring's tiles recompute their logits (8 B^2 d), and [row_block, B(1+K)] logits
per device instead of [B/n, B(1+K)]. The gradients are kept for the backward pass, which only
scales them by the loss's cotangent; a value without a gradient scores each stripe once.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from embedjax.losses import contrastive as dense
from embedjax.losses import validation as val
from embedjax.losses.ring import _check_mesh, _context_mesh, _place


def _gathered_keys(axis, d_nd, h_nkd):
    """Every device's documents, then every device's hard negatives: [B + B K, D] float32."""
    keys = [lax.all_gather(d_nd.astype(jnp.float32), axis, tiled=True)]
    if h_nkd is not None:
        keys.append(lax.all_gather(h_nkd.reshape(-1, h_nkd.shape[-1]).astype(jnp.float32), axis, tiled=True))
    return jnp.concatenate(keys)


def _device_loss(axis, global_batch, x):
    q = x["q"].astype(jnp.float32)
    logits_bn = q @ _gathered_keys(axis, x["d"], x.get("h")).T * x["scale"]
    positive = lax.axis_index(axis) * q.shape[0] + jnp.arange(q.shape[0])
    lse = jax.nn.logsumexp(logits_bn, axis=1)
    picked = jnp.take_along_axis(logits_bn, positive[:, None], axis=1)[:, 0]
    return lax.psum(jnp.sum(lse - picked), axis) / global_batch


def _stripe(q_rd, positive_r, valid_r, keys_nd, scale, with_grads):
    """One stripe's summed cross-entropy, and with ``with_grads`` its gradients: d/dq [R, D],
    d/dkeys [N, D] and d/dscale (a scalar); padded rows (``valid_r`` False) count for nothing."""
    logits_rn = q_rd @ keys_nd.T * scale
    lse_r = jax.nn.logsumexp(logits_rn, axis=1)
    picked_r = jnp.take_along_axis(logits_rn, positive_r[:, None], axis=1)[:, 0]
    loss = jnp.sum(jnp.where(valid_r, lse_r - picked_r, 0.0))
    if not with_grads:
        return loss
    # d(lse - picked)/d logits: the row's softmax less its positive's one-hot.
    onehot_rn = positive_r[:, None] == jnp.arange(keys_nd.shape[0])[None]
    dlogits_rn = jnp.where(valid_r[:, None], jnp.exp(logits_rn - lse_r[:, None]) - onehot_rn, 0.0)
    d_scale = jnp.sum(dlogits_rn * logits_rn) / scale
    return loss, dlogits_rn @ keys_nd * scale, dlogits_rn.T @ q_rd * scale, d_scale


def _stripes(q_nd, positive_n, keys_nd, scale, row_block, with_grads):
    """`_stripe` over the local rows in stripes of ``row_block`` (the last padded): the summed
    loss, and with ``with_grads`` d/dq [n, D], d/dkeys [N, D] and d/dscale."""
    n = q_nd.shape[0]
    stripes = -(-n // row_block)
    pad = stripes * row_block - n
    q_srd = jnp.pad(q_nd, ((0, pad), (0, 0))).reshape(stripes, row_block, -1)
    pos_sr = jnp.pad(positive_n, (0, pad)).reshape(stripes, row_block)
    valid_sr = (jnp.arange(stripes * row_block) < n).reshape(stripes, row_block)
    if not with_grads:
        def value(total, xs):
            return total + _stripe(*xs, keys_nd, scale, False), None
        return lax.scan(value, jnp.float32(0), (q_srd, pos_sr, valid_sr))[0]

    def step(carry, xs):
        total, d_keys, d_scale = carry
        loss, d_q, d_k, d_s = _stripe(*xs, keys_nd, scale, True)
        return (total + loss, d_keys + d_k, d_scale + d_s), d_q

    zero = jnp.float32(0)
    (total, d_keys, d_scale), d_q_srd = lax.scan(step, (zero, jnp.zeros_like(keys_nd), zero), (q_srd, pos_sr, valid_sr))
    return total, d_q_srd.reshape(stripes * row_block, -1)[:n], d_keys, d_scale


def _make_striped_loss(axis, row_block):
    """The per-device summed loss of the local rows, with the stripes' own gradients as its VJP."""
    def forward(x, with_grads):
        q = x["q"].astype(jnp.float32)
        keys = _gathered_keys(axis, x["d"], x.get("h"))
        positive = lax.axis_index(axis) * q.shape[0] + jnp.arange(q.shape[0])
        return _stripes(q, positive, keys, x["scale"], min(row_block, q.shape[0]), with_grads)

    @jax.custom_vjp
    def local_loss(x):
        return forward(x, with_grads=False)

    def fwd(x):
        total, d_q, d_keys, d_scale = forward(x, with_grads=True)
        return total, (x, d_q, d_keys, d_scale)

    def bwd(res, g):
        x, d_q, d_keys, d_scale = res
        # Each device's rows reach every device's keys: sum the key gradients over the devices and
        # keep this device's slice (documents first, then hard negatives, as gathered).
        n_docs = x["d"].shape[0] * lax.psum(1, axis)
        grads = {"q": g * d_q, "scale": g * d_scale,
                 "d": lax.psum_scatter(g * d_keys[:n_docs], axis, scatter_dimension=0, tiled=True)}
        if "h" in x:
            d_h = lax.psum_scatter(g * d_keys[n_docs:], axis, scatter_dimension=0, tiled=True)
            grads["h"] = d_h.reshape(x["h"].shape)
        return ({name: grads[name].astype(x[name].dtype) for name in x},)

    local_loss.defvjp(fwd, bwd)
    return local_loss


def _device_striped_loss(axis, global_batch, row_block, x):
    return lax.psum(_make_striped_loss(axis, row_block)(x), axis) / global_batch


def allgather_infonce(q_bd, d_bd, *, mesh, axis: str = "data", temperature, hard_negatives_bkd=None,
                      row_block: int | None = None):
    """Plain InfoNCE (in-batch + hard negatives) via all-gather; [B, D] inputs sharded on ``axis``.

    ``row_block``: score the local queries in stripes of this many rows with their gradients
    formed in the same pass (see the module docstring); None holds all [B/n, B(1+K)] logits.
    """
    batch = dense.prepare_pairs(q_bd, d_bd, hard_negatives_bkd)
    temperature = val.check_positive_scalar("temperature", temperature)
    _check_mesh(mesh, axis, batch.q_bd.shape[0])
    if row_block is not None and (isinstance(row_block, bool) or not isinstance(row_block, int) or row_block < 1):
        raise ValueError(f"row_block must be a positive int (query rows per stripe) or None, got {row_block!r}")
    x = dict(q=batch.q_bd, d=batch.d_bd)
    if batch.h_bkd is not None:
        x["h"] = batch.h_bkd
    specs = {name: P(axis) for name in x}
    x["scale"], specs["scale"] = jnp.asarray(1.0 / temperature, jnp.float32), P()
    mesh = _context_mesh(mesh)
    x = _place(x, specs, mesh)
    if row_block is None:
        body = functools.partial(_device_loss, axis, batch.q_bd.shape[0])
    else:
        body = functools.partial(_device_striped_loss, axis, batch.q_bd.shape[0], row_block)
    return jax.shard_map(body, mesh=mesh, in_specs=(specs,), out_specs=P(), check_vma=False)(x)

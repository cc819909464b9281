"""The all-gather InfoNCE baseline: what open_clip's ``gather_with_grad`` and
sentence-transformers' gathered negatives do. Each device all-gathers every document
(and hard negative), scores its B/n queries against all of them ([B/n, B(1+K)] logits
held in memory, twice for the backward pass) and autodiff does the rest.

Used as the memory/speed reference for the ring loss in ``python -m embedjax bench loss``;
it gives the same value as `contrastive.infonce` with default options.
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


def _device_loss(axis, global_batch, x):
    q, d = x["q"].astype(jnp.float32), x["d"].astype(jnp.float32)
    keys = [lax.all_gather(d, axis, tiled=True)]
    if "h" in x:
        keys.append(lax.all_gather(x["h"].reshape(-1, x["h"].shape[-1]).astype(jnp.float32), axis, tiled=True))
    logits_bn = q @ jnp.concatenate(keys).T * x["scale"]
    positive = lax.axis_index(axis) * q.shape[0] + jnp.arange(q.shape[0])
    lse = jax.nn.logsumexp(logits_bn, axis=1)
    picked = jnp.take_along_axis(logits_bn, positive[:, None], axis=1)[:, 0]
    return lax.psum(jnp.sum(lse - picked), axis) / global_batch


def allgather_infonce(q_bd, d_bd, *, mesh, axis: str = "data", temperature, hard_negatives_bkd=None):
    """Plain InfoNCE (in-batch + hard negatives) via all-gather; [B, D] inputs sharded on ``axis``."""
    batch = dense.prepare_pairs(q_bd, d_bd, hard_negatives_bkd)
    temperature = val.check_positive_scalar("temperature", temperature)
    _check_mesh(mesh, axis, batch.q_bd.shape[0])
    x = dict(q=batch.q_bd, d=batch.d_bd)
    if batch.h_bkd is not None:
        x["h"] = batch.h_bkd
    specs = {name: P(axis) for name in x}
    x["scale"], specs["scale"] = 1.0 / temperature, P()
    mesh = _context_mesh(mesh)
    x = _place(x, specs, mesh)
    body = functools.partial(_device_loss, axis, batch.q_bd.shape[0])
    return jax.shard_map(body, mesh=mesh, in_specs=(specs,), out_specs=P(), check_vma=False)(x)

"""InfoNCE in row stripes with the gradients formed in the scoring pass: the dense loss's FLOPs
without its B x B logits.

Each device all-gathers every document and hard negative (with their ids) and scores its B/n
queries in stripes of ``row_block`` rows against all of them. A stripe holds whole rows, so its
log-sum-exps are final once it is scored, and its gradients (each row's softmax over its
candidates less its softmax over its positives, pulled back to the queries, every gathered key and
the scale) are formed in the same pass. The backward pass only scales them by the loss's cotangent
and reduce-scatters the key gradients to their devices. So a value with a gradient costs 6 B^2 d
per prefix, as the dense loss (`contrastive.infonce`), where the ring's tiles recompute their
logits (8 B^2 d, `ring.ring_infonce`); a value alone scores each stripe once (2 B^2 d).

Per-device memory: [row_block, B(1+K)] logits, plus the gathered keys and their gradient, [B(1+K),
D] each: linear in B, where the ring's is O(B/n D + tile^2) and the all-gather loss's
[B/n, B(1+K)] (`allgather.allgather_infonce`).

Options: hard negatives, group/document ids (several positives per query, false negatives left
out as in `contrastive.infonce`), cosine or dot similarity, Matryoshka prefixes. Bidirectional,
same-side, margin and guide filters, focal weights and MaxSim need the ring or the dense loss (their
rows need statistics over whole columns, or per-pair filters this pass does not form).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from embedjax.losses import contrastive as dense
from embedjax.losses import validation as val
from embedjax.losses.ring import _check_mesh, _context_mesh, _place, _zero_cotangent


def _log_softmax_parts(logits_rn, mask_rn=None):
    """Each row's log-sum-exp over ``mask`` [R] and its softmax over the mask [R, N] (0 off the
    mask), from one exponential per logit; a row with nothing in its mask gives 0 and 0s.
    The softmax is only computed when used: a value without a gradient drops it."""
    masked = logits_rn if mask_rn is None else jnp.where(mask_rn, logits_rn, -jnp.inf)
    m = jnp.max(masked, axis=1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(masked - m)
    total = jnp.sum(e, axis=1, keepdims=True)
    safe = jnp.where(total > 0, total, 1.0)
    return jnp.where(total > 0, m + jnp.log(safe), 0.0)[:, 0], e / safe


def _stripe_masks(rows, keys):
    """(positive, candidate) [R, N] masks: a document of the query's group is a positive; a
    document of another group and the same document id (a duplicate), or a hard negative whose id
    is the query's document, is left out; padded rows have neither."""
    positive = keys["is_doc"][None] & (rows["group"][:, None] == keys["group"][None])
    candidate = positive | (keys["doc"][None] != rows["doc"][:, None])
    valid = rows["valid"][:, None]
    return positive & valid, candidate & valid


def _stripe(q_rd, rows, keys_nd, keys, scale, with_grads):
    """One stripe's summed cross-entropy, and with ``with_grads`` its gradients: d/dq [R, D],
    d/dkeys [N, D] and d/dscale. ``keys`` None (no ids given): each row's one positive is the key
    at ``rows["index"]`` and every key is a candidate, which spares the masks and the positives'
    exponentials (one per logit, where ids take two)."""
    logits_rn = q_rd @ keys_nd.T * scale
    if keys is None:
        lse_all, soft_all = _log_softmax_parts(logits_rn)
        lse_pos = jnp.take_along_axis(logits_rn, rows["index"][:, None], axis=1)[:, 0]
        soft_pos = (rows["index"][:, None] == jnp.arange(keys_nd.shape[0])[None]).astype(jnp.float32)
    else:
        positive, candidate = _stripe_masks(rows, keys)
        (lse_all, soft_all), (lse_pos, soft_pos) = (_log_softmax_parts(logits_rn, candidate),
                                                    _log_softmax_parts(logits_rn, positive))
    loss = jnp.sum(jnp.where(rows["valid"], lse_all - lse_pos, 0.0))
    if not with_grads:
        return loss
    # d(lse_all - lse_pos)/d logits: softmax over the candidates less softmax over the positives.
    dlogits_rn = jnp.where(rows["valid"][:, None], soft_all - soft_pos, 0.0)
    d_scale = jnp.sum(dlogits_rn * logits_rn) / scale
    return loss, dlogits_rn @ keys_nd * scale, dlogits_rn.T @ q_rd * scale, d_scale


def _stripes(q_nd, rows, keys_nd, keys, scale, row_block, with_grads):
    """`_stripe` over the local rows in stripes of ``row_block`` (the last padded with rows that
    count for nothing): the summed loss, and with ``with_grads`` d/dq [n, D], d/dkeys, d/dscale."""
    n = q_nd.shape[0]
    count = -(-n // row_block)
    pad = count * row_block - n
    split = lambda x: jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)).reshape(count, row_block, *x.shape[1:])  # noqa: E731
    xs = (split(q_nd), {name: split(value) for name, value in rows.items()})
    if not with_grads:
        def value(total, stripe):
            return total + _stripe(*stripe, keys_nd, keys, scale, False), None
        return lax.scan(value, jnp.float32(0), xs)[0]

    def step(carry, stripe):
        total, d_keys, d_scale = carry
        loss, d_q, d_k, d_s = _stripe(*stripe, keys_nd, keys, scale, True)
        return (total + loss, d_keys + d_k, d_scale + d_s), d_q

    zero = jnp.float32(0)
    (total, d_keys, d_scale), d_q = lax.scan(step, (zero, jnp.zeros_like(keys_nd), zero), xs)
    return total, d_q.reshape(count * row_block, -1)[:n], d_keys, d_scale


def _gather(axis, x):
    return lax.all_gather(x, axis, tiled=True)


def _gathered_keys(axis, diff, meta):
    """Every device's documents, then every device's hard negatives ([B + BK, D] float32), and
    (when ids were given) their ids: group (documents only), document id (a hard negative's own
    id), is-a-document; None without ids."""
    keys = [_gather(axis, diff["d"])]
    if "h" in diff:
        keys.append(_gather(axis, diff["h"].reshape(-1, diff["h"].shape[-1])))
    if "group" not in meta:
        return jnp.concatenate(keys), None
    ids = {"group": [_gather(axis, meta["group"])], "doc": [_gather(axis, meta["doc"])]}
    ids["is_doc"] = [jnp.ones_like(ids["doc"][0], bool)]
    if "h" in diff:
        hnid = _gather(axis, meta["hnid"].reshape(-1))
        ids["group"].append(hnid)  # never read: a hard negative is no positive
        ids["doc"].append(hnid)
        ids["is_doc"].append(jnp.zeros_like(hnid, bool))
    return jnp.concatenate(keys), {name: jnp.concatenate(parts) for name, parts in ids.items()}


def _make_local_loss(axis, row_block):
    """The summed loss of this device's rows against every key, with the stripes' gradients as its
    VJP. ``diff``: float32 q [n, D], d [n, D], (h [n, K, D]), scale; ``meta``: int ids (no
    gradient). The residuals are the gradients alone: the inputs' shapes follow from them."""
    def forward(diff, meta, with_grads):
        q = diff["q"]
        keys_nd, keys = _gathered_keys(axis, diff, meta)
        rows = {"valid": jnp.ones(q.shape[0], bool)}
        if keys is None:
            rows["index"] = lax.axis_index(axis) * q.shape[0] + jnp.arange(q.shape[0])
        else:
            rows["group"], rows["doc"] = meta["group"], meta["doc"]
        return _stripes(q, rows, keys_nd, keys, diff["scale"], min(row_block, q.shape[0]), with_grads)

    @jax.custom_vjp
    def local_loss(diff, meta):
        return forward(diff, meta, with_grads=False)

    def fwd(diff, meta):
        total, d_q, d_keys, d_scale = forward(diff, meta, with_grads=True)
        return total, (meta, d_q, d_keys, d_scale)

    def bwd(res, g):
        meta, d_q, d_keys, d_scale = res
        # Every device's rows reach every device's keys: sum the key gradients over the devices and
        # keep this device's slice (documents first, then hard negatives, as gathered).
        scatter = functools.partial(lax.psum_scatter, axis_name=axis, scatter_dimension=0, tiled=True)
        n, n_docs = d_q.shape[0], d_q.shape[0] * lax.psum(1, axis)
        grads = {"q": g * d_q, "scale": g * d_scale, "d": scatter(g * d_keys[:n_docs])}
        if d_keys.shape[0] > n_docs:  # hard negatives: [n, K, D] on each device
            grads["h"] = scatter(g * d_keys[n_docs:]).reshape(n, -1, d_keys.shape[1])
        return grads, jax.tree.map(_zero_cotangent, meta)

    local_loss.defvjp(fwd, bwd)
    return local_loss


def _device_loss(axis, global_batch, row_block, dims, weights, similarity, x):
    """Per-device body inside shard_map: each prefix (normalised for cosine) through the stripes."""
    local_loss = _make_local_loss(axis, row_block)
    meta = {name: x[name] for name in ("group", "doc", "hnid") if name in x}
    total = jnp.float32(0)
    for dim, weight in zip(dims, weights):
        diff = {name: dense._prefix(x[name], dim, similarity) for name in ("q", "d", "h") if name in x}
        diff["scale"] = x["scale"]
        total = total + weight * lax.psum(local_loss(diff, meta), axis)
    return total / global_batch


ROW_BLOCK = 1024  # query rows per stripe when the caller names none (capped by the local rows)


def striped_infonce(q_bd, d_bd, *, mesh, axis: str = "data", temperature, row_block: int | None = None,
                    hard_negatives_bkd=None, group_ids_b=None, doc_ids_b=None, hard_negative_ids_bk=None,
                    similarity: str = "dot", matryoshka_dims=None, matryoshka_weights=None):
    """InfoNCE over the global batch sharded on mesh axis ``axis``, scored in row stripes (module
    docstring); the same value and gradients as `contrastive.infonce` with the same options.

    q_bd, d_bd: [B, D]; hard_negatives_bkd: [B, K, D] (B divisible by the axis size).
    row_block: query rows per stripe (default `ROW_BLOCK`; any positive size: the last stripe of
    each device is padded).
    similarity: "dot" or "cos" (each Matryoshka prefix normalised).
    """
    val.check_similarity(similarity, ("dot", "cos"))
    batch = dense.prepare_pairs(q_bd, d_bd, hard_negatives_bkd, group_ids_b, doc_ids_b, hard_negative_ids_bk,
                                matryoshka_dims=matryoshka_dims, matryoshka_weights=matryoshka_weights)
    temperature = val.check_positive_scalar("temperature", temperature)
    row_block = val.check_positive_int("row_block", ROW_BLOCK if row_block is None else row_block,
                                       "query rows per stripe")
    _check_mesh(mesh, axis, batch.q_bd.shape[0])
    x = dict(q=batch.q_bd, d=batch.d_bd)
    with_ids = any(ids is not None for ids in (group_ids_b, doc_ids_b, hard_negative_ids_bk))
    if with_ids:
        x["group"], x["doc"] = batch.group_b, batch.doc_b
    if batch.h_bkd is not None:
        x["h"] = batch.h_bkd
        if with_ids:
            x["hnid"] = batch.hnid_bk
    specs = {name: P(axis) for name in x}
    x["scale"], specs["scale"] = jnp.asarray(1.0 / temperature, jnp.float32), P()
    mesh = _context_mesh(mesh)
    x = _place(x, specs, mesh)
    body = functools.partial(_device_loss, axis, batch.q_bd.shape[0], row_block, batch.dims, batch.weights,
                             similarity)
    return jax.shard_map(body, mesh=mesh, in_specs=(specs,), out_specs=P(), check_vma=False)(x)

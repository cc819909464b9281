"""k-means for the coarse quantizer of an inverted-file index: jitted Lloyd iterations sharded over a mesh.

    centroids_kd, info = kmeans(x_nd, 256, iters=20, seed=0, mesh=mesh, axis="data")
    lists_n = assign(x_nd, centroids_kd)

The points are split over ``axis`` of ``mesh`` (padded with weightless rows); every
iteration each device assigns its points to the nearest centroid and sums them per
cluster, and one ``psum`` of the [K, D] sums and [K] counts gives every device the
new centroids. All iterations run inside one jitted ``shard_map`` (a ``fori_loop``),
so the points never leave their device.

Metric: ``"ip"`` (default, for unit-norm embeddings searched by inner product) is
spherical k-means: assign by the largest inner product, centroids are the
re-normalised means. ``"l2"`` is plain Lloyd (nearest centroid in Euclidean
distance, centroids are means).

Empty clusters are re-seeded every iteration with the worst-fitting points (lowest
best similarity), found per shard with ``top_k`` and merged across shards, so no
centroid is ever wasted. Initial centroids: distinct points drawn with ``seed``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

METRICS = ("ip", "l2")


def _fit_scores(x_nd, c_kd, metric):
    """float32 [n, K], larger = closer: <x, c> (ip) or <x, c> - |c|^2 / 2 (l2, same argmax as -|x - c|^2)."""
    dots = jnp.dot(x_nd, c_kd.T, precision=lax.Precision.HIGHEST)
    if metric == "l2":
        dots = dots - 0.5 * jnp.sum(c_kd * c_kd, axis=1)[None, :]
    return dots


def _normalize(c_kd):
    norms = jnp.linalg.norm(c_kd, axis=1, keepdims=True)
    return c_kd / jnp.where(norms > 0, norms, 1.0)


def _lloyd_shard(x_nd, w_n, c_kd, *, iters, metric, axis):
    """One device's share of every iteration; returns replicated (centroids, counts, objective)."""
    k = c_kd.shape[0]
    worst_k = min(k, x_nd.shape[0])

    def step(_, carry):
        c, _, _ = carry
        fit = _fit_scores(x_nd, c, metric)
        assign = jnp.argmax(fit, axis=1)  # ties -> smaller cluster index
        best = jnp.max(fit, axis=1)
        sums = jax.ops.segment_sum(x_nd * w_n[:, None], assign, num_segments=k)
        counts = jax.ops.segment_sum(w_n, assign, num_segments=k)
        sums, counts = lax.psum(sums, axis), lax.psum(counts, axis)
        objective = lax.psum(jnp.sum(jnp.where(w_n > 0, best, 0.0)), axis)
        # Re-seed empty clusters with the globally worst-fitting points (padding rows never qualify).
        badness = jnp.where(w_n > 0, -best, -jnp.inf)
        local_bad, local_idx = lax.top_k(badness, worst_k)
        all_bad = lax.all_gather(local_bad, axis, tiled=True)
        all_pts = lax.all_gather(x_nd[local_idx], axis, tiled=True)
        _, pick = lax.top_k(all_bad, worst_k)
        seeds = all_pts[pick]  # [worst_k, D], worst first
        means = sums / jnp.maximum(counts, 1.0)[:, None]
        empty = counts == 0
        rank = jnp.clip(jnp.cumsum(empty) - 1, 0, worst_k - 1)
        new = jnp.where(empty[:, None], seeds[rank], means)
        if metric == "ip":
            new = _normalize(new)
        return new, counts, objective

    init = (c_kd, jnp.zeros((k,), jnp.float32), jnp.zeros((), jnp.float32))
    return lax.fori_loop(0, iters, step, init)


def _mesh_or_single(mesh, axis):
    if mesh is None:
        return jax.make_mesh((1,), (axis,), devices=jax.devices()[:1]), axis
    if axis not in mesh.axis_names:
        raise ValueError(f"axis {axis!r} is not an axis of the mesh {mesh.axis_names}")
    return mesh, axis


def _check_points(x_nd, name="x_nd"):
    x = np.asarray(x_nd)
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name} must be a 2-D float array [N, D]; got {x.dtype} {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} has NaN or infinite values")
    return x.astype(np.float32)


def kmeans(x_nd, num_clusters: int, *, iters: int = 20, seed: int = 0, metric: str = "ip", mesh=None,
           axis: str = "data", max_points: int | None = None):
    """Train ``num_clusters`` centroids on the points ``x_nd`` [N, D].

    Args:
        max_points: train on a seeded sample of at most this many points (None = all).
        mesh, axis: shard the points over ``axis`` of ``mesh`` (None = one device).

    Returns:
        ``(centroids float32 [K, D] numpy, info)``; info holds ``counts`` [K] (training
        points per cluster after the last iteration) and ``objective`` (sum of the
        points' best fit scores: inner products for "ip").
    """
    x = _check_points(x_nd)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}; got {metric!r}")
    if not isinstance(num_clusters, int) or not 1 <= num_clusters <= x.shape[0]:
        raise ValueError(f"num_clusters={num_clusters} must be an int between 1 and the number of points {x.shape[0]}")
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an int >= 1; got {iters}")
    rng = np.random.default_rng(seed)
    if max_points is not None and max_points < x.shape[0]:
        if max_points < num_clusters:
            raise ValueError(f"max_points={max_points} is below num_clusters={num_clusters}")
        x = x[np.sort(rng.choice(x.shape[0], max_points, replace=False))]
    init = x[rng.choice(x.shape[0], num_clusters, replace=False)]
    if metric == "ip":
        init = np.asarray(_normalize(jnp.asarray(init)))
    mesh, axis = _mesh_or_single(mesh, axis)
    shards = mesh.shape[axis]
    rows = -(-x.shape[0] // shards) * shards
    xp = np.zeros((rows, x.shape[1]), np.float32)
    xp[: x.shape[0]] = x
    weights = (np.arange(rows) < x.shape[0]).astype(np.float32)
    run = _compiled_lloyd(mesh, axis, iters, metric)
    points = jax.device_put(xp, NamedSharding(mesh, P(axis)))
    weights = jax.device_put(weights, NamedSharding(mesh, P(axis)))
    centroids, counts, objective = run(points, weights, jnp.asarray(init))
    return np.asarray(centroids), {"counts": np.asarray(counts), "objective": float(objective)}


@functools.lru_cache(maxsize=32)
def _compiled_lloyd(mesh, axis, iters, metric):
    body = functools.partial(_lloyd_shard, iters=iters, metric=metric, axis=axis)
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(axis), P(axis), P()), out_specs=(P(), P(), P()),
                                 check_vma=False))


@functools.partial(jax.jit, static_argnames=("metric",))
def _assign_chunk(x_nd, c_kd, metric):
    return jnp.argmax(_fit_scores(x_nd, c_kd, metric), axis=1).astype(jnp.int32)


def assign(x_nd, centroids_kd, *, metric: str = "ip", chunk_size: int = 65536) -> np.ndarray:
    """int32 [N]: the nearest centroid of every point (the rule ``kmeans`` trains with; ties -> smaller index)."""
    x = _check_points(x_nd)
    c = jnp.asarray(centroids_kd, jnp.float32)
    if c.ndim != 2 or c.shape[1] != x.shape[1]:
        raise ValueError(f"centroids {tuple(c.shape)} must be [K, D] with D = {x.shape[1]}")
    out = []
    for start in range(0, x.shape[0], chunk_size):
        part = x[start:start + chunk_size]
        padded = np.pad(part, ((0, min(chunk_size, x.shape[0]) - part.shape[0]), (0, 0)))
        out.append(np.asarray(_assign_chunk(padded, c, metric))[: part.shape[0]])
    return np.concatenate(out)

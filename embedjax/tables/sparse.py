"""Row-sparse, row-sharded table access: deduplicated gathers, scatters, and row-wise optimizers.

A training step touches a table only through the rows its batch reads:

    uniq_u, inv = unique_rows(idx, sentinel)        # the distinct rows of the batch (padded)
    stored_u   = gather(stored, uniq_u, sharding)   # only those rows move
    ...loss on decode(stored_u)[inv], gradient g_u per distinct row...
    stored     = scatter(stored, uniq_u, encode(opt.update(...)), sharding)

so rows that are not in the batch keep their values **and** their optimizer state bit for bit.

With a `RowSharding`, row tables are split into contiguous blocks over the mesh axes named by
the ``table_rows`` rule; `gather` runs inside ``shard_map``: each shard reads the requested rows
it owns (zeros elsewhere) and one all-reduce over those axes combines them, so what crosses
devices is [U, width] per table, never the table. Values are summed as their integer bit
patterns, which is exact (every row comes from exactly one shard), so a sharded gather is
bit-identical to a single-device one. `scatter` writes each shard's own rows locally.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from embedjax.tables.base import TABLE_ROWS, RowTable

OPTIMIZERS = ("adagrad", "rowwise_adagrad", "lazy_adam", "sgd")


# ---------------------------------------------------------------- sharding


@dataclasses.dataclass(frozen=True)
class RowSharding:
    """Rows split in contiguous blocks over ``axes`` of ``mesh`` (the ``table_rows`` rule)."""

    mesh: jax.sharding.Mesh
    axes: tuple[str, ...]

    def __post_init__(self):
        unknown = [a for a in self.axes if a not in self.mesh.shape]
        if unknown or not self.axes:
            raise ValueError(f"table_rows axes {self.axes} must be a non-empty subset of the mesh axes "
                             f"{tuple(self.mesh.shape)}")

    @property
    def num_shards(self) -> int:
        return math.prod(self.mesh.shape[a] for a in self.axes)

    def spec(self, ndim: int) -> P:
        return P(self.axes if len(self.axes) > 1 else self.axes[0], *([None] * (ndim - 1)))

    def sharding(self, ndim: int) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(ndim))

    def shard_index(self):
        """Linear index of this shard along ``axes`` (inside shard_map)."""
        index = 0
        for axis in self.axes:
            index = index * self.mesh.shape[axis] + jax.lax.axis_index(axis)
        return index


def row_sharding_from_rules(mesh: jax.sharding.Mesh, rules) -> RowSharding | None:
    """The `RowSharding` the ``table_rows`` rule of a rules table asks for (None: replicated)."""
    from embedjax.sharding.rules import get_rules

    axes = dict(get_rules(rules)).get(TABLE_ROWS)
    if axes is None:
        return None
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(a for a in axes if mesh.shape[a] > 1)
    return RowSharding(mesh, axes) if axes else None


# ---------------------------------------------------------------- gather / scatter


def unique_rows(idx, sentinel: int):
    """Distinct rows of ``idx`` (any shape) -> (uniq int32 [idx.size] sorted, padded with ``sentinel``;
    inv int32 idx.shape with ``uniq[inv] == idx``)."""
    flat = idx.reshape(-1)
    uniq, inv = jnp.unique(flat, size=flat.size, fill_value=sentinel, return_inverse=True)
    return uniq.astype(jnp.int32), inv.reshape(idx.shape).astype(jnp.int32)


_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _exact_psum(x, axes):
    """Sum over shards where at most one shard holds a non-zero value: add the bit patterns."""
    if x.dtype == jnp.bool_:
        return jax.lax.psum(x.astype(jnp.uint8), axes).astype(jnp.bool_)
    as_int = jax.lax.bitcast_convert_type(x, _UINT[x.dtype.itemsize])
    return jax.lax.bitcast_convert_type(jax.lax.psum(as_int, axes), x.dtype)


def gather(stored: Mapping, uniq_u, sharding: RowSharding | None = None) -> dict:
    """Rows ``uniq_u`` [U] of every stored array -> {array: [U, ...]}; out-of-range rows read as zeros."""
    if sharding is None:
        return {k: jnp.take(v, uniq_u, axis=0, mode="fill", fill_value=0) for k, v in stored.items()}
    keys = sorted(stored)

    def local(uniq, *blocks):
        out = []
        for block in blocks:
            start = sharding.shard_index() * block.shape[0]
            li = uniq - start
            mine = (li >= 0) & (li < block.shape[0])
            rows = jnp.take(block, jnp.where(mine, li, block.shape[0]), axis=0, mode="fill", fill_value=0)
            out.append(_exact_psum(rows, sharding.axes))
        return tuple(out)

    in_specs = (P(),) + tuple(sharding.spec(stored[k].ndim) for k in keys)
    out_specs = tuple(P() for _ in keys)
    rows = jax.shard_map(local, mesh=sharding.mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)(uniq_u, *(stored[k] for k in keys))
    return dict(zip(keys, rows))


def scatter(stored: Mapping, uniq_u, new_u: Mapping, sharding: RowSharding | None = None) -> dict:
    """``stored`` with rows ``uniq_u`` replaced by ``new_u`` (out-of-range rows dropped); other rows untouched."""
    if set(new_u) != set(stored):
        raise ValueError(f"scatter: new rows for {sorted(new_u)} but the table stores {sorted(stored)}")
    if sharding is None:
        return {k: stored[k].at[uniq_u].set(new_u[k].astype(stored[k].dtype), mode="drop") for k in stored}
    keys = sorted(stored)

    def local(uniq, *arrays):
        blocks, news = arrays[: len(keys)], arrays[len(keys):]
        out = []
        for block, new in zip(blocks, news):
            start = sharding.shard_index() * block.shape[0]
            li = uniq - start
            mine = (li >= 0) & (li < block.shape[0])
            out.append(block.at[jnp.where(mine, li, block.shape[0])].set(new.astype(block.dtype), mode="drop"))
        return tuple(out)

    in_specs = ((P(),) + tuple(sharding.spec(stored[k].ndim) for k in keys)
                + tuple(P() for _ in keys))
    out_specs = tuple(sharding.spec(stored[k].ndim) for k in keys)
    arrays = jax.shard_map(local, mesh=sharding.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(
        uniq_u, *(stored[k] for k in keys), *(new_u[k] for k in keys))
    return dict(zip(keys, arrays))


# ---------------------------------------------------------------- row-wise optimizers


@dataclasses.dataclass(frozen=True)
class SparseOptimizer:
    """Optimizers whose state is per table row, so a step reads and writes only the batch's rows.

    - ``sgd``: w -= lr * g.
    - ``adagrad``: a += g^2; w -= lr * g / (sqrt(a) + eps)  (per entry).
    - ``rowwise_adagrad``: a += mean(g^2 over the row); w -= lr * g / (sqrt(a) + eps): one
      accumulator per row (FBGEMM's row-wise Adagrad), 4 bytes per row.
    - ``lazy_adam``: Adam moments updated only for the rows in the batch (TensorFlow's LazyAdam), bias
      correction with the global step t: w -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps).
    """

    kind: str = "rowwise_adagrad"
    learning_rate: float = 0.05
    eps: float = 1e-8
    b1: float = 0.9
    b2: float = 0.999
    initial_accumulator: float = 0.0

    def __post_init__(self):
        if self.kind not in OPTIMIZERS:
            raise ValueError(f"sparse optimizer {self.kind!r}: choose one of {OPTIMIZERS}")
        if self.learning_rate <= 0:
            raise ValueError(f"sparse learning_rate={self.learning_rate} must be positive")

    def layout(self, width: int) -> dict[str, tuple[int, ...]]:
        """State arrays per row: name -> row shape."""
        return {"sgd": {}, "adagrad": {"accumulator": (width,)}, "rowwise_adagrad": {"accumulator": ()},
                "lazy_adam": {"m": (width,), "v": (width,)}}[self.kind]

    def state_bytes(self, table: RowTable) -> int:
        if not table.trainable:
            return 0
        return sum(table.physical_rows * int(np.prod(shape, dtype=np.int64)) * 4
                   for shape in self.layout(table.width).values())

    def init(self, table: RowTable) -> dict:
        if not table.trainable:
            return {}
        fill = {"accumulator": self.initial_accumulator}
        return {name: jnp.full((table.physical_rows,) + shape, fill.get(name, 0.0), jnp.float32)
                for name, shape in self.layout(table.width).items()}

    def update(self, w_uw, g_uw, state_u: Mapping, step) -> tuple[jax.Array, dict]:
        """One update of the rows ``w_uw`` with gradients ``g_uw``; ``step`` is the 0-based global step."""
        lr = self.learning_rate
        if self.kind == "sgd":
            return w_uw - lr * g_uw, {}
        if self.kind == "adagrad":
            acc = state_u["accumulator"] + g_uw * g_uw
            return w_uw - lr * g_uw / (jnp.sqrt(acc) + self.eps), {"accumulator": acc}
        if self.kind == "rowwise_adagrad":
            acc = state_u["accumulator"] + jnp.mean(g_uw * g_uw, axis=-1)
            return w_uw - lr * g_uw / (jnp.sqrt(acc)[:, None] + self.eps), {"accumulator": acc}
        t = jnp.asarray(step, jnp.float32) + 1.0
        m = self.b1 * state_u["m"] + (1.0 - self.b1) * g_uw
        v = self.b2 * state_u["v"] + (1.0 - self.b2) * g_uw * g_uw
        m_hat = m / (1.0 - self.b1 ** t)
        v_hat = v / (1.0 - self.b2 ** t)
        return w_uw - lr * m_hat / (jnp.sqrt(v_hat) + self.eps), {"m": m, "v": v}

"""Stretching a learned absolute position table (BERT-style) past the length it was trained on.

A model trained on ``L0`` positions meets inputs of up to ``max_length`` tokens. The methods
(``{"type": ..., "max_length": L}``, LongEmbed's names):

- ``"interpolate"``: a new table of ``L`` rows, row ``s * i`` the original row ``i`` (``s = L / L0``,
  an integer) and the rows between them linear interpolations (rows past ``s * (L0 - 1)`` repeat
  the last one). Inputs longer than ``L0`` read it at their natural positions; inputs of at most
  ``L0`` tokens read rows ``s * p``, the original rows, so they embed exactly as before. The new
  rows (`new_rows`) are what a position fine-tune trains (`embedjax.train.position_tuning`).
- ``"grouped"``: positions ``p -> floor(p / s)`` with ``s = ceil(n / L0)`` for an input of n
  tokens, so an input that fits is unchanged and a longer one shares each row among s neighbours.
- ``"recurrent"``: positions ``p -> p mod L0``.
- ``"pcw"`` (parallel context windows): the input is cut into windows of ``L0`` consecutive tokens;
  each window is encoded on its own (positions restart at 0, attention stays inside the window),
  and the token states are put back in order. Mean pooling over them is then the average of the
  windows' mean-pooled embeddings weighted by their token counts. The first window holds the
  leading special token, the last the closing one.

Everything here is a pure function of arrays; the BERT tower (`embedjax.models.towers.bert`) wires
it in. PoSE (`pose_position_ids`) spreads a short training input's positions over ``[0, L)`` with
random skips, so that fine-tuning at the original length still reaches every new row.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

EXTENSION_TYPES = ("interpolate", "grouped", "recurrent", "pcw")


def normalize_extension(spec: Mapping[str, Any] | None, trained_length: int,
                        where: str = "position_extension") -> dict | None:
    """``{"type", "max_length"}`` checked against a table of ``trained_length`` rows (None: no extension)."""
    if not spec:
        return None
    spec = dict(spec)
    unknown = sorted(set(spec) - {"type", "max_length"})
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {unknown}; it takes 'type' and 'max_length'")
    kind = spec.get("type")
    if kind not in EXTENSION_TYPES:
        raise ValueError(f"{where} type={kind!r} is not a position extension; choose one of {EXTENSION_TYPES}")
    if "max_length" not in spec:
        raise ValueError(f"{where} needs max_length (the longest input to support), e.g. "
                         f"{{'type': {kind!r}, 'max_length': {8 * trained_length}}}")
    max_length = spec["max_length"]
    if isinstance(max_length, bool) or not isinstance(max_length, int):
        raise ValueError(f"{where} max_length={max_length!r} must be an integer")
    if max_length < trained_length:
        raise ValueError(f"{where} max_length={max_length} is below the {trained_length} positions the table "
                         "already covers; an extension needs max_length >= the trained length")
    if kind == "interpolate" and max_length % trained_length:
        raise ValueError(f"{where} interpolate needs max_length a multiple of the trained length {trained_length} "
                         f"(so that every original row keeps its place), got {max_length}; use "
                         f"{-(-max_length // trained_length) * trained_length}")
    return {"type": kind, "max_length": max_length}


def interpolation_factor(trained_length: int, max_length: int) -> int:
    return max_length // trained_length


def interpolate_table(table_pd, max_length: int) -> np.ndarray:
    """[L0, D] -> float32 [max_length, D]: row ``s * i`` is row ``i`` exactly, rows between are linear
    interpolations of their two neighbours, rows past ``s * (L0 - 1)`` repeat the last row."""
    table = np.asarray(table_pd, dtype=np.float32)
    trained = table.shape[0]
    s = interpolation_factor(trained, max_length)
    rows = np.arange(max_length)
    low = np.minimum(rows // s, trained - 1)
    high = np.minimum(low + 1, trained - 1)
    frac = ((rows - low * s) / s).astype(np.float32)[:, None]
    frac = np.where(rows[:, None] >= s * (trained - 1), np.float32(0), frac)
    out = table[low] * (np.float32(1) - frac) + table[high] * frac
    out[low * s == rows] = table[low[low * s == rows]]  # exact copies, not 1 * x + 0 * y
    return out.astype(np.float32)


def new_rows(trained_length: int, max_length: int) -> np.ndarray:
    """bool [max_length]: the rows of an interpolated table that are not an original row."""
    s = interpolation_factor(trained_length, max_length)
    rows = np.arange(max_length)
    return ~((rows % s == 0) & (rows // s < trained_length))


def table_rows(kind: str, positions_bl, real_counts_b, trained_length: int, max_length: int, *, natural: bool):
    """int32 [B, L]: which table row each position reads (see the module docstring).

    ``positions_bl``: each token's position (the real-token index, or explicit position ids when
    ``natural`` is False, e.g. PoSE's); ``real_counts_b``: real tokens per row.
    """
    positions = positions_bl.astype(jnp.int32)
    if kind == "interpolate":
        if not natural:
            return positions
        s = interpolation_factor(trained_length, max_length)
        short = (real_counts_b <= trained_length)[:, None]
        return jnp.where(short, positions * s, positions)
    if kind == "grouped":
        span = positions.max(axis=1) + 1  # the input's extent (its token count for natural positions)
        group = jnp.maximum(1, -(-span // trained_length))[:, None]
        return positions // group
    if kind == "recurrent":
        return positions % trained_length
    raise ValueError(f"position extension {kind!r} does not map positions (pcw cuts windows instead)")


def pose_position_ids(mask_bl, target_length: int, key, *, chunks: int = 2):
    """PoSE position ids int32 [B, L] for a right-padded batch: each row's n real tokens are cut at
    random into ``chunks`` consecutive pieces (the first keeps position 0, where [CLS] sits); piece
    i is shifted by a skip ``u_i``, with ``0 = u_0 <= u_1 <= ... <= target_length - n`` drawn
    uniformly and sorted, so positions stay increasing and below ``target_length``. Padding tokens
    get the position of the row's last real token (they are masked anyway)."""
    mask = mask_bl.astype(bool)
    b, length = mask.shape
    if chunks < 1:
        raise ValueError(f"PoSE chunks={chunks} must be at least 1")
    if length > target_length:
        raise ValueError(f"PoSE target_length={target_length} is shorter than the batch length {length}")
    n = mask.sum(axis=1)
    key_cut, key_skip = jax.random.split(key)
    # chunk boundaries: sorted cut points in [1, n), one piece per interval
    cuts = jnp.sort(jax.random.randint(key_cut, (b, chunks - 1), 1, jnp.maximum(n, 2)[:, None]), axis=1)
    budget = target_length - n
    skips = jnp.sort(jax.random.randint(key_skip, (b, chunks - 1), 0, budget[:, None] + 1), axis=1)
    index = jnp.arange(length)
    piece = jnp.sum(index[None, :, None] >= cuts[:, None, :], axis=-1)  # [B, L]: which piece each token is in
    shift = jnp.concatenate([jnp.zeros((b, 1), skips.dtype), skips], axis=1)
    positions = index[None, :] + jnp.take_along_axis(shift, piece, axis=1)
    last = jnp.take_along_axis(positions, jnp.maximum(n - 1, 0)[:, None], axis=1)
    return jnp.where(mask, positions, last).astype(jnp.int32)


def window_count(length: int, window: int) -> int:
    return math.ceil(length / window)

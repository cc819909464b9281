"""Sequence packing: several texts end to end in each row of a token batch, each attending to itself only.

A padded batch computes on its padding: sixteen STS-B pairs hold ~460 real tokens, padded to
~1,270 positions (both sides at one length bucket), and every matmul of the encoder pays for all
of them. A packed batch
places the texts one after another in rows of ``row_length`` tokens (first-fit decreasing), gives
every token its text's segment id and every text positions counted from 0, and a family that
reads packed batches (``Family.packs_sequences``) keeps attention within each segment
(`embedjax.models.attention.Segments`): each text's token states are those it would get alone in a
padded row. `unpack_states` then gathers the states back into one row per text, where poolers and
heads read them as from a padded batch of ``row_length`` columns.

Packed token batch (numpy int32; R rows of P = ``row_length`` tokens, N texts):

- ``input_ids``, ``attention_mask``, ``position_ids``, ``segment_ids`` (and ``token_type_ids`` for
  families that read them) [R, P]; segment id n + 1 marks text n, 0 marks padding;
- ``unpack_index`` [N, P]: the flat position (row * P + column) of each of text n's tokens, then 0;
- ``pool_mask`` [N, P]: the tokens pooling covers (the text's tokens after ``pool_skip`` of them).

Data parallelism: the N texts are cut into ``shards`` contiguous groups (one per data-parallel
device) and every group is packed into the same number of rows, so that device d's slice of the
rows holds the texts of its slice of ``pool_mask``. The row count is rounded up to a short ladder
(`row_bucket`) so that a run compiles few step shapes. `pack_rows` lays texts out as its caller
planned (`Encoder.encode` plans rows over a whole corpus), with filler texts to a fixed count.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

PACKED_KEYS = ("segment_ids", "unpack_index")


def row_bucket(rows: int) -> int:
    """Rows rounded up to 1..8, then to {4, 5, 6, 7} x 2^e (at most 25% extra rows)."""
    if rows <= 8:
        return max(rows, 1)
    scale = 1 << (rows.bit_length() - 3)  # rows / scale in [4, 8)
    return -(-rows // scale) * scale


def first_fit_rows(lengths: Sequence[int], row_length: int) -> list[list[int]]:
    """Text indices per row: longest first, each into the first row with room (ties by index)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room = np.zeros(0, np.int64)
    for i in order:
        fits = np.flatnonzero(room >= lengths[i])
        if fits.size:
            rows[fits[0]].append(i)
            room[fits[0]] -= lengths[i]
        else:
            rows.append([i])
            room = np.append(room, row_length - lengths[i])
    return rows


def pack(ids: Sequence[Sequence[int]], *, row_length: int, pad_id: int, shards: int = 1,
         token_type_ids: bool = False, pool_skip: int = 0) -> dict[str, np.ndarray]:
    """Token id lists of N texts -> a packed token batch (module docstring); N divisible by ``shards``.

    Each shard's texts go first-fit into its rows, and every shard gets `row_bucket` of the most
    rows any shard needs. ``pool_skip``: leading tokens of every text left out of ``pool_mask`` (a
    prompt with ``include_prompt=False``)."""
    n = len(ids)
    if n == 0 or n % shards:
        raise ValueError(f"{n} texts cannot be packed into {shards} equal shards; give a multiple of {shards}")
    lengths = [len(t) for t in ids]  # `pack_rows` checks them
    per_shard = n // shards
    shard_rows = [first_fit_rows(lengths[s * per_shard:(s + 1) * per_shard], row_length) for s in range(shards)]
    rows_each = row_bucket(max(len(rows) for rows in shard_rows))
    layout = [[s * per_shard + i for i in members] for s, rows in enumerate(shard_rows)
              for members in rows + [[]] * (rows_each - len(rows))]
    return pack_rows(ids, layout, row_length=row_length, pad_id=pad_id, token_type_ids=token_type_ids,
                     pool_skip=pool_skip)


def _checked_lengths(ids: Sequence[Sequence[int]], row_length: int) -> list[int]:
    lengths = [len(t) for t in ids]
    if lengths and min(lengths) == 0:
        raise ValueError(f"text {lengths.index(0)} has no tokens; every packed text needs at least one")
    if lengths and max(lengths) > row_length:
        raise ValueError(f"a text of {max(lengths)} tokens does not fit rows of row_length={row_length}; "
                         "raise the row length to the longest text's")
    return lengths


def pack_rows(ids: Sequence[Sequence[int]], rows: Sequence[Sequence[int]], *, row_length: int, pad_id: int,
              num_texts: int | None = None, token_type_ids: bool = False, pool_skip: int = 0) -> dict[str, np.ndarray]:
    """Token id lists of N texts, laid out as ``rows`` says -> a packed token batch of ``len(rows)``
    rows and ``num_texts`` (default N) texts.

    ``rows[r]``: the indices of the texts row r holds, end to end in that order (``[]``: a padding
    row); every text is in exactly one row. Texts N .. ``num_texts`` - 1 are fillers that keep the
    text count at one compiled shape: they have no tokens and pool the state of the batch's first
    position, so their embeddings are finite and meaningless (drop them)."""
    n = len(ids)
    lengths = _checked_lengths(ids, row_length)
    num_texts = n if num_texts is None else num_texts
    if num_texts < n:
        raise ValueError(f"num_texts={num_texts} is fewer than the {n} texts given; pass at least {n}")
    placed = [i for members in rows for i in members]
    if sorted(placed) != list(range(n)):
        raise ValueError(f"rows must hold each of the {n} texts (indices 0 .. {n - 1}) exactly once; they hold "
                         f"{len(placed)} indices, {len(set(placed) & set(range(n)))} of them distinct texts")
    for r, members in enumerate(rows):
        if sum(lengths[i] for i in members) > row_length:
            raise ValueError(f"row {r} holds {sum(lengths[i] for i in members)} tokens, more than "
                             f"row_length={row_length}; put fewer texts in it")
    total = max(len(rows), 1)
    input_ids = np.full((total, row_length), pad_id, np.int32)
    positions = np.zeros((total, row_length), np.int32)
    segments = np.zeros((total, row_length), np.int32)
    unpack_index = np.zeros((num_texts, row_length), np.int32)
    for row, members in enumerate(rows):
        start = 0
        for text in members:
            end = start + lengths[text]
            input_ids[row, start:end] = ids[text]
            positions[row, start:end] = np.arange(lengths[text])
            segments[row, start:end] = text + 1
            unpack_index[text, :lengths[text]] = row * row_length + np.arange(start, end)
            start = end
    columns = np.arange(row_length)
    pool_mask = (columns < np.asarray(lengths, np.int64).reshape(n, 1)) & (columns >= pool_skip)
    filler_mask = np.zeros((num_texts - n, row_length), bool)
    filler_mask[:, 0] = True  # unpack_index 0: the first position's state, finite for every pooler
    batch = {
        "input_ids": input_ids,
        "attention_mask": (segments > 0).astype(np.int32),
        "position_ids": positions,
        "segment_ids": segments,
        "unpack_index": unpack_index,
        "pool_mask": np.concatenate([pool_mask, filler_mask]).astype(np.int32),
    }
    if token_type_ids:
        batch["token_type_ids"] = np.zeros((total, row_length), np.int32)
    return batch


def pack_planned(ids: Sequence[Sequence[int]], rows: Sequence[Sequence[int]], **kwargs):
    """The texts of a corpus's token id lists ``ids`` that the planned ``rows`` hold (indices into
    ``ids``, as `Encoder.encode`'s plan gives them) -> (those indices in the batch's text order,
    `pack_rows`' batch of them; ``kwargs`` go to `pack_rows`)."""
    members = [i for row in rows for i in row]
    starts = np.cumsum([0] + [len(row) for row in rows])
    layout = [list(range(a, b)) for a, b in zip(starts[:-1], starts[1:])]
    return members, pack_rows([ids[i] for i in members], layout, **kwargs)


def shard_slice(batch: dict[str, np.ndarray], shards: int, first: int, count: int) -> dict[str, np.ndarray]:
    """Shards ``first .. first + count - 1`` of a packed batch (their rows and their texts), as one
    process of ``shards // count`` holds them; ``unpack_index`` keeps pointing into the global rows."""
    def part(array):
        size = array.shape[0] // shards
        return array[first * size:(first + count) * size]

    return {name: part(array) for name, array in batch.items()}


def is_packed(tokens) -> bool:
    """Whether a token batch is packed (it carries segment ids and the unpacking index)."""
    return all(key in tokens for key in PACKED_KEYS)


def unpack_states(states_rpd, unpack_index_np):
    """Token states of the packed rows [R, P, D] -> one row per text [N, P, D] (past a text's end:
    some token's state, which ``pool_mask`` leaves out)."""
    import jax.numpy as jnp

    r, p, d = states_rpd.shape
    return jnp.take(states_rpd.reshape(r * p, d), unpack_index_np, axis=0)

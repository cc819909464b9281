"""Fine-tune only the new rows of an interpolated position table, with PoSE position skips.

LongEmbed's E5-Base-4k recipe: stretch a 512-row table to L rows by interpolation (the original
rows keep their places at multiples of s = L / 512), then train only the rows in between, everything
else frozen. Training inputs stay short (at most the trained length), and PoSE (Zhu et al. 2023)
spreads their positions over [0, L) with random skips (`embedjax.models.position_extension.
pose_position_ids`), so every new row is reached without long inputs.

The objective is InfoNCE over (anchor, positive[, hard negative]) texts with in-batch negatives,
the recipe the notes give (lr 5e-4) at whatever batch and step count the caller can afford. The
gradient is taken with respect to the position table alone and the update is masked to the new
rows, so the original rows and every other weight are bit-for-bit unchanged: inputs that fit the
trained length embed exactly as before.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from embedjax.models import position_extension as ext

TABLE_PATH = ("backbone", "position_embeddings", "embedding")


@dataclasses.dataclass(frozen=True)
class TuningResult:
    params: dict  # the encoder's parameter tree with the tuned table
    losses: list  # one per step
    trainable_rows: int
    positions_reached: int  # distinct table rows the PoSE positions touched over the run


def _table(params):
    node = params
    for key in TABLE_PATH:
        node = node[key]
    return node


def _with_table(params, table):
    backbone = dict(params["backbone"])
    backbone["position_embeddings"] = {**backbone["position_embeddings"], "embedding": table}
    return {**params, "backbone": backbone}


def check_tunable(config) -> dict:
    """The interpolate extension of ``config``, or a clear error."""
    extension = getattr(config, "extension", None)
    if not extension or extension["type"] != "interpolate":
        raise ValueError(f"position fine-tuning trains the new rows of an interpolated table; load the model with "
                         f"position_extension={{'type': 'interpolate', 'max_length': L}} (got {extension})")
    return extension


def tune_new_positions(encoder, examples: Sequence[Sequence[str]], *, steps: int, batch_size: int = 32,
                       learning_rate: float = 5e-4, temperature: float = 0.05, pose_chunks: int = 2,
                       train_length: int | None = None, seed: int = 0,
                       progress: bool = True, log: Callable[[int, float], None] | None = None) -> TuningResult:
    """Train the new rows of ``encoder``'s interpolated position table; returns the new params.

    ``examples``: (anchor, positive) or (anchor, positive, hard negative) texts, drawn with
    replacement in seeded order. ``train_length``: tokens per training input (default: the
    trained length of the table); PoSE places them within the extension's max_length.
    """
    extension = check_tunable(encoder.config)
    trained = encoder.config.max_position_embeddings
    target = extension["max_length"]
    train_length = train_length or trained
    if not 2 <= train_length <= trained:
        raise ValueError(f"train_length={train_length} must be between 2 and the trained length {trained}")
    if steps < 1 or batch_size < 2:
        raise ValueError(f"steps={steps} must be >= 1 and batch_size={batch_size} >= 2 (in-batch negatives)")
    widths = {len(e) for e in examples}
    if not examples or not widths <= {2, 3} or len(widths) != 1:
        raise ValueError("examples must all be (anchor, positive) or all (anchor, positive, hard negative) tuples")
    from embedjax.losses import infonce

    tokenizer = copy.copy(encoder.tokenizer)  # the same framing, truncating at the training length
    tokenizer.max_length = train_length
    new_rows = jnp.asarray(ext.new_rows(trained, target))[:, None]
    params = jax.tree.map(jnp.asarray, encoder.params)
    optimizer = optax.adam(learning_rate)
    table = _table(params)
    opt_state = optimizer.init(table)

    def loss_fn(table, batches, key):
        tuned = _with_table(params, table)
        keys = jax.random.split(key, len(batches))
        embeddings = []
        for batch, k in zip(batches, keys):
            batch = {**batch, "position_ids": ext.pose_position_ids(batch["attention_mask"], target, k,
                                                                      chunks=pose_chunks)}
            embeddings.append(encoder.embed_fn(tuned, batch))
        hard = embeddings[2][:, None, :] if len(embeddings) == 3 else None
        return infonce(embeddings[0], embeddings[1], temperature=temperature, hard_negatives_bkd=hard)

    @jax.jit
    def step(table, opt_state, batches, key):
        loss, grad = jax.value_and_grad(loss_fn)(table, batches, key)
        updates, opt_state = optimizer.update(grad, opt_state, table)
        return optax.apply_updates(table, updates * new_rows), opt_state, loss  # original rows never move

    rng = np.random.default_rng(seed)
    key = jax.random.PRNGKey(seed)
    losses, reached = [], np.zeros(target, bool)
    from tqdm.auto import tqdm

    for i in tqdm(range(steps), desc="tune positions", unit="step", disable=not progress):
        chosen = rng.integers(0, len(examples), size=batch_size)
        batches = tuple(tokenizer.pad(tokenizer.token_ids([examples[j][side] for j in chosen]), length=train_length)
                        for side in range(len(examples[0])))
        key, sub = jax.random.split(key)
        table, opt_state, loss = step(table, opt_state, batches, sub)
        losses.append(float(loss))
        reached |= _rows_reached(batches, sub, target, pose_chunks)
        if log is not None:
            log(i + 1, losses[-1])
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"the loss became {losses[-1]} at step {i + 1}; lower learning_rate")
    return TuningResult(_with_table(params, table), losses, int(np.asarray(new_rows).sum()), int(reached.sum()))


def _rows_reached(batches, key, target: int, chunks: int) -> np.ndarray:
    """Which table rows this step's PoSE positions read (for the run's coverage figure)."""
    seen = np.zeros(target, bool)
    for batch, k in zip(batches, jax.random.split(key, len(batches))):
        ids = np.asarray(ext.pose_position_ids(batch["attention_mask"], target, k, chunks=chunks))
        seen[ids[np.asarray(batch["attention_mask"]).astype(bool)]] = True
    return seen

"""Checkpoints with orbax: the train state plus the data iterator's position.

One `orbax.checkpoint.CheckpointManager` in ``WORKDIR/checkpoints`` keeps the last
``keep`` steps. Each step folder holds two items: ``state`` (the sharded
TrainState, written by every process for its shards) and ``data`` (the grain
iterator state as JSON: the next step's index), so a resumed run continues with
exactly the batch an uninterrupted run would have used. Orbax writes a step into a
temporary folder and renames it only after every item is complete, so a crash in
the middle of a write leaves the previous step as the latest restorable one; the
temporary leftovers are removed when the next manager opens the folder.
"""
from __future__ import annotations

import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp

_SHOWN_DIFFERENCES = 6  # leaves named in a mismatch error (the rest are counted)


def leaf_name(path) -> str:
    """A state leaf's key path as orbax names it in a checkpoint's metadata (``opt_state.0.mu.w``)."""
    def part(key):
        for attribute in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
            if hasattr(key, attribute):
                return str(getattr(key, attribute))
        return str(key)

    return ".".join(part(key) for key in path)


def state_mismatches(saved: dict, expected: dict) -> list[str]:
    """How two ``{leaf name: (shape, dtype)}`` maps differ, one line per leaf, sorted by name."""
    lines = []
    for name in sorted(saved.keys() | expected.keys()):
        if name not in saved:
            lines.append(f"{name}: not in the checkpoint, this run {_shape_text(expected[name])}")
        elif name not in expected:
            lines.append(f"{name}: saved {_shape_text(saved[name])}, not in this run's state")
        elif saved[name] != expected[name]:
            lines.append(f"{name}: saved {_shape_text(saved[name])}, this run {_shape_text(expected[name])}")
    return lines


def _shape_text(shape_dtype) -> str:
    shape, dtype = shape_dtype
    return f"{shape} {dtype}"


class Checkpointer:
    """Save / restore ``(TrainState, data_state)`` pairs under ``directory``."""

    def __init__(self, directory: str | pathlib.Path, *, keep: int = 3, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"checkpoint.keep={keep} must be at least 1 (the latest checkpoint is kept)")
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        # Handlers named up front: a reopened manager then reads a step's metadata before any restore.
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict, *, force: bool = True) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
            force=force,
        )

    def check_fits(self, step: int, abstract_state) -> None:
        """ValueError naming the leaves where checkpoint ``step`` differs from ``abstract_state``
        (a name, shape or dtype), and the settings that cause it; orbax's own error names neither."""
        saved = {meta.name: (tuple(meta.shape), np.dtype(meta.dtype))
                 for meta in jax.tree.leaves(self.manager.item_metadata(step)["state"].tree) if hasattr(meta, "shape")}
        expected = {leaf_name(path): (tuple(leaf.shape), np.dtype(leaf.dtype))
                    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
        lines = state_mismatches(saved, expected)
        if lines:
            more = len(lines) - _SHOWN_DIFFERENCES
            shown = "; ".join(lines[:_SHOWN_DIFFERENCES]) + (f"; and {more} more" if more > 0 else "")
            raise ValueError(
                f"checkpoint {self.directory / str(step)} does not fit this run's train state ({shown}). It was "
                "written with other settings (the model, model.lora, model.head, the optimizer or "
                "train.dropout_rng change the state): resume with those settings, or train in a new --workdir")

    def restore(self, step: int, abstract_state, shardings):
        """-> (state placed with ``shardings``, data_state dict) of checkpoint ``step``; a ValueError
        naming the differing leaves if it does not fit ``abstract_state`` (`check_fits`)."""
        self.check_fits(step, abstract_state)
        target = jax.tree.map(
            lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
            abstract_state,
            shardings,
        )
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()),
        )
        return restored["state"], dict(restored["data"])

    def wait(self) -> None:
        """Block until pending asynchronous writes are committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

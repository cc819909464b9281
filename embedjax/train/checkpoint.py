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
import orbax.checkpoint as ocp


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
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

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

    def restore(self, step: int, abstract_state, shardings):
        """-> (state placed with ``shardings``, data_state dict) of checkpoint ``step``."""
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

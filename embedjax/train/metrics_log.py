"""Metric sinks of a training run: a JSONL log and TensorBoard event files.

Only process 0 writes. The JSONL file (``WORKDIR/metrics.jsonl``) gets one object
per logged step (``{"step": s, "loss": ..., ...}``) and one per evaluation; it is
appended to on resume, so a step that ran before an interruption and again after
it appears twice (the later line is the one that counts).
"""
from __future__ import annotations

import json
import math
import pathlib


class MetricLog:
    def __init__(self, workdir: pathlib.Path, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.jsonl_path = workdir / "metrics.jsonl"
        self.tensorboard_dir = workdir / "tensorboard"
        self._file = None
        self._writer = None
        if enabled:
            self._file = open(self.jsonl_path, "a", encoding="utf-8")
            if tensorboard:
                from tensorboardX import SummaryWriter

                self._writer = SummaryWriter(str(self.tensorboard_dir))

    def write(self, step: int, metrics: dict, *, prefix: str = "train") -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "kind": prefix}
        row.update({k: (float(v) if isinstance(v, (int, float)) or hasattr(v, "__float__") else v)
                    for k, v in metrics.items()})
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._writer is not None:
            for name, value in row.items():
                if name in ("step", "kind") or not isinstance(value, float) or not math.isfinite(value):
                    continue
                self._writer.add_scalar(f"{prefix}/{name}", value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._writer is not None:
            self._writer.close()

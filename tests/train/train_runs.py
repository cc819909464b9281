"""Helpers of the training tests: the tiny retrieval config and how to run it.

The tiny config (`configs/retrieval_infonce.py:tiny`) is a 2-layer, 32-wide random
BERT on the scifact train (query, abstract) pairs, padded to one shape so each
run compiles its step once.
"""
import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "retrieval_infonce.py") + ":tiny"


def tiny_config(*overrides):
    from embedjax.train.config import apply_overrides, load_config_file

    return apply_overrides(load_config_file(TINY), ["train.progress=False", *overrides])


def read_losses(workdir) -> dict[int, list[float]]:
    """step -> every loss logged for it (a step run twice, before and after a crash, appears twice)."""
    out: dict[int, list[float]] = {}
    path = pathlib.Path(workdir) / "metrics.jsonl"
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row["kind"] == "train":
            out.setdefault(row["step"], []).append(row["loss"])
    return out


def train_command(workdir, *overrides):
    return [sys.executable, "-m", "embedjax.train.cli", "--config", TINY, "--workdir", str(workdir),
            "--config.train.progress=False", *[f"--config.{o}" for o in overrides]]


def start_training(workdir, *overrides) -> subprocess.Popen:
    return subprocess.Popen(train_command(workdir, *overrides), cwd=REPO, env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

"""``python -m embedjax train-ctr --config configs/ctr_tables.py:ARG --workdir DIR [--config.KEY=VALUE ...]``.

Same flags and override rules as ``train`` (`embedjax.train.cli`), with the CTR config schema
(`embedjax.ctr.config`); returns the summary dict the CLI prints as its last stdout line.
"""
from __future__ import annotations

import argparse
import sys

from embedjax.train.cli import add_arguments, split_overrides

__all__ = ["add_arguments", "load_config", "main"]


def load_config(spec: str, overrides=()):
    from embedjax.ctr.config import default_config
    from embedjax.train.config import apply_overrides, load_config_file

    cfg = load_config_file(spec, schema=default_config)
    return apply_overrides(cfg, split_overrides(list(overrides)), schema=default_config)


def main(args: argparse.Namespace) -> dict:
    from embedjax.ctr.train import train_ctr

    cfg = load_config(args.config, getattr(args, "overrides", None) or [])
    return train_ctr(cfg, args.workdir, log=lambda message: print(message, file=sys.stderr, flush=True))

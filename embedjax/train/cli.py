"""``python -m embedjax train --config FILE[:ARG] --workdir DIR [--config.KEY=VALUE ...]``.

`add_arguments` registers the flags on the CLI's ``train`` subparser; `main` loads
the config file, applies the overrides (an unknown key is an error), runs or
resumes the training and returns the summary dict (the CLI prints it as the last
stdout line). A SIGTERM makes the run save and return normally (exit status 0).
"""
from __future__ import annotations

import argparse
import sys

CONFIG_PREFIX = "--config."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``train``. The ``--config.KEY=VALUE`` overrides are not argparse options (their
    names are open-ended): parse with ``parse_known_args`` and hand the leftovers to `main`
    as ``args.overrides`` (see `parse_args`)."""
    parser.add_argument("--config", required=True, help="configs/<name>.py[:ARG] (an ml-collections get_config file)")
    parser.add_argument("--workdir", required=True, help="run folder: checkpoints, logs, export; reused to resume")
    parser.set_defaults(overrides=[])


def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """``parse_known_args`` + the leftovers as ``args.overrides`` (each must be --config.KEY[=VALUE])."""
    args, extra = parser.parse_known_args(argv)
    args.overrides = list(args.overrides or []) + extra
    return args


def split_overrides(items) -> list[str]:
    """``["--config.a.b=1", "--config.c", "2"]`` -> ``["a.b=1", "c=2"]`` (both spellings accepted)."""
    out, items = [], list(items)
    i = 0
    while i < len(items):
        item = items[i]
        if not item.startswith(CONFIG_PREFIX):
            raise ValueError(f"unexpected argument {item!r}: overrides look like --config.KEY=VALUE")
        body = item[len(CONFIG_PREFIX):]
        if "=" not in body:
            if i + 1 >= len(items):
                raise ValueError(f"{item} needs a value: --config.KEY=VALUE")
            body = f"{body}={items[i + 1]}"
            i += 1
        out.append(body)
        i += 1
    return out


def distributed_from_environment(cfg, environ=None) -> list[str]:
    """Overrides of ``cfg.distributed`` from a launcher's environment (launch/local.sh, SLURM, TPU pods).

    A config that already names a multi-process job (a coordinator or num_processes != 1) wins.
    """
    import os

    from embedjax.launch_env import config_overrides, distributed_init_kwargs

    if cfg.distributed.coordinator or cfg.distributed.num_processes != 1:
        return []
    overrides = config_overrides(distributed_init_kwargs(os.environ if environ is None else environ))
    return [f"{key}={value}" for key, value in overrides.items()]


def main(args: argparse.Namespace) -> dict:
    from embedjax.train.config import apply_overrides, load_config_file
    from embedjax.train.loop import train

    cfg = apply_overrides(load_config_file(args.config), split_overrides(getattr(args, "overrides", None) or []))
    cfg = apply_overrides(cfg, distributed_from_environment(cfg))
    return train(cfg, args.workdir, log=lambda message: print(message, file=sys.stderr, flush=True))


if __name__ == "__main__":  # `python -m embedjax.train.cli ...` works without the top-level CLI
    import json

    _parser = argparse.ArgumentParser(prog="python -m embedjax train")
    add_arguments(_parser)
    print(json.dumps(main(parse_args(_parser))), flush=True)

"""``python -m embedjax sweep``: expand a config family's ablation grid into named runs and run or submit them.

A config file may define ``get_sweep()`` (or ``get_sweep(arg)``, called with the
``FILE:ARG`` argument) returning a list of override dicts ``{"model.pooling": "cls",
"seed": 1, ...}``; `product`, `zip_axes`, `with_seeds` and `cross` build such lists.
Each dict becomes one run with its own workdir ``ROOT/<name>``, the name spelled
from the overrides (`run_name`). A run whose workdir holds a ``summary.json`` with a
finished status is skipped, so rerunning the sweep command completes an interrupted
sweep. ``ROOT/sweep.json`` records the runs in sweep order (the first run holds the
baseline value of every axis; `embedjax.results` reads it).

    python -m embedjax sweep --config configs/ablation_pooling_matryoshka.py:small --workdir runs/abl
    python -m embedjax sweep --config FILE:full --workdir gs://B/abl --launcher tpu_pod \\
        --launcher_args "--name v5e --zone us-west4-a" --dry_run

Extra ``--config.KEY=VALUE`` flags apply to every run (after the sweep's own overrides
they would conflict with, which is an error).

``--launcher inprocess`` runs each local run inside the sweep's own process (no interpreter start-up
and imports per run: they dominate runs of seconds); ``local`` starts one process per run.

Runs train with ``python -m embedjax train`` unless the config file names another trainer in a
module-level ``TRAIN_COMMAND`` (one of `TRAIN_COMMANDS`, e.g. ``"train-ctr"`` for
``configs/ctr_tables.py``); overrides are then checked against that trainer's schema.
"""
from __future__ import annotations

import argparse
import inspect
import itertools
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
from typing import Any, Iterable, Mapping, Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCHERS = ("local", "inprocess", "tpu_pod", "gpu_slurm")
FINISHED_STATUSES = ("completed", "stopped_after")
RUN_RECORD = "sweep_run.json"  # written into each run's workdir: its name and overrides
MANIFEST = "sweep.json"
# trainer command -> the module whose default_config() is its config schema
TRAIN_COMMANDS = {"train": "embedjax.train.config", "train-ctr": "embedjax.ctr.config"}


# ---------------------------------------------------------------- building grids


def _check_axes(axes: Mapping[str, Sequence[Any]], what: str) -> dict[str, list]:
    if not isinstance(axes, Mapping) or not axes:
        raise ValueError(f"{what} takes a non-empty dict {{'config.key': [values, ...]}}; got {axes!r}")
    out = {}
    for key, values in axes.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{what}: axis names must be dotted config keys like 'model.pooling'; got {key!r}")
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
            raise ValueError(f"{what}: axis {key!r} needs a non-empty list of values; got {values!r}")
        out[key] = list(values)
    return out


def product(axes: Mapping[str, Sequence[Any]]) -> list[dict]:
    """Every combination of the axes' values, the first axis varying slowest.

    ``product({"a": [1, 2], "b": ["x", "y"]})`` -> ``[{a:1,b:x}, {a:1,b:y}, {a:2,b:x}, {a:2,b:y}]``.
    """
    axes = _check_axes(axes, "product")
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def zip_axes(axes: Mapping[str, Sequence[Any]]) -> list[dict]:
    """The i-th values of every axis together (axes that change as one: e.g. dims and their weights)."""
    axes = _check_axes(axes, "zip_axes")
    lengths = {k: len(v) for k, v in axes.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"zip_axes needs axes of equal length; got {lengths}")
    return [dict(zip(axes, combo)) for combo in zip(*axes.values())]


def cross(*grids: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Cartesian product of lists of override dicts (e.g. a `product` and a `zip_axes`), merged."""
    out = []
    for parts in itertools.product(*grids):
        merged: dict = {}
        for part in parts:
            clash = set(merged) & set(part)
            if clash:
                raise ValueError(f"cross: the grids both set {sorted(clash)}; each key may come from one grid only")
            merged.update(part)
        out.append(merged)
    return out


def with_seeds(grid: Sequence[Mapping[str, Any]], seeds: Iterable[int]) -> list[dict]:
    """Each run of ``grid`` once per seed (``seed`` is the config's top-level seed key), seeds innermost."""
    seeds = list(seeds)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"with_seeds needs a non-empty list of int seeds; got {seeds!r}")
    return cross(grid, [{"seed": s} for s in seeds])


# ---------------------------------------------------------------- names and commands


def format_value(value: Any) -> str:
    """An override value as ``--config.KEY=VALUE`` spells it: tuples as ``(8,16)``, bools lower-case."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        inner = ",".join(format_value(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    return str(value)


def _name_value(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return "-".join(_name_value(v) for v in value) if value else "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    text = re.sub(r"[^A-Za-z0-9.+@-]+", "_", text).strip("_")  # folder-safe, no '/', ',' or '='
    return text or "empty"


def run_name(overrides: Mapping[str, Any]) -> str:
    """Folder name of a run: ``pooling=cls,matryoshka_dims=8-16-32,seed=1``.

    Keys are shortened to their last dotted part unless two keys of the run share it.
    """
    if not overrides:
        return "default"
    leaves = [k.rsplit(".", 1)[-1] for k in overrides]
    parts = []
    for key, leaf in zip(overrides, leaves):
        label = leaf if leaves.count(leaf) == 1 else key
        parts.append(f"{label}={_name_value(overrides[key])}")
    return ",".join(parts)


def expand(grid: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Override dicts -> ``[{"name", "overrides"}]`` in sweep order; duplicate names are an error."""
    if not isinstance(grid, (list, tuple)) or not grid:
        raise ValueError(f"get_sweep() must return a non-empty list of override dicts; got {grid!r}")
    runs, seen = [], {}
    for i, overrides in enumerate(grid):
        if not isinstance(overrides, Mapping):
            raise ValueError(f"get_sweep() item {i} is {overrides!r}; each item must be a dict of overrides")
        name = run_name(overrides)
        if name in seen:
            raise ValueError(f"get_sweep() items {seen[name]} and {i} both make the run {name!r}; "
                             "every run needs different overrides")
        seen[name] = i
        runs.append({"name": name, "overrides": dict(overrides)})
    return runs


def override_flags(overrides: Mapping[str, Any]) -> list[str]:
    return [f"--config.{key}={format_value(value)}" for key, value in overrides.items()]


def train_command(config_spec: str, workdir: str, overrides: Mapping[str, Any], extra: Sequence[str] = (),
                  python: str = "python", with_workdir: bool = True, command: str = "train") -> list[str]:
    """argv of ``python -m embedjax COMMAND`` for one run (``extra``: the sweep's common ``--config.*`` flags)."""
    cmd = [python, "-m", "embedjax", command, "--config", config_spec]
    if with_workdir:
        cmd += ["--workdir", workdir]
    return cmd + override_flags(overrides) + list(extra)


def launch_command(launcher: str, run: Mapping[str, Any], root: str, config_spec: str,
                   extra: Sequence[str] = (), launcher_args: Sequence[str] = (), command: str = "train") -> list[str]:
    """argv that runs (local) or submits (tpu_pod, gpu_slurm) one run."""
    workdir = join_path(root, run["name"])
    if launcher in ("local", "inprocess"):
        return train_command(config_spec, workdir, run["overrides"], extra, python=sys.executable, command=command)
    if launcher == "tpu_pod":
        # tpu_pod.sh appends --workdir itself (it must be the bucket path every worker shares)
        inner = train_command(config_spec, workdir, run["overrides"], extra, python="python3", with_workdir=False,
                              command=command)
        return ["bash", str(REPO / "launch" / "tpu_pod.sh"), *launcher_args, "--workdir", workdir, "--", *inner]
    if launcher == "gpu_slurm":
        job = re.sub(r"[^A-Za-z0-9._-]+", "_", run["name"])[:120]
        inner = train_command(config_spec, workdir, run["overrides"], extra, command=command)
        script = join_path(root, run["name"], "job.sbatch") if is_local(root) else f"launch_logs/{job}.sbatch"
        return ["bash", str(REPO / "launch" / "gpu_slurm.sh"), *launcher_args, "--job_name", job,
                "--script", script, "--", *inner]
    raise ValueError(f"--launcher {launcher!r}: use one of {', '.join(LAUNCHERS)}")


# ---------------------------------------------------------------- workdirs


def is_local(path: str) -> bool:
    return "://" not in str(path)


def join_path(root: str, *parts: str) -> str:
    if is_local(root):
        return str(pathlib.Path(root, *parts))
    return "/".join([str(root).rstrip("/"), *parts])


def run_status(workdir: str) -> str:
    """``finished`` (summary.json with a finished status), ``incomplete`` (summary of a preempted or
    failed run: resumes), ``pending`` (no summary) or ``unknown`` (a bucket path: not inspected here)."""
    if not is_local(workdir):
        return "unknown"
    summary = pathlib.Path(workdir) / "summary.json"
    if not summary.is_file():
        return "pending"
    try:
        status = json.loads(summary.read_text()).get("status")
    except (json.JSONDecodeError, OSError):
        return "incomplete"
    return "finished" if status in FINISHED_STATUSES else "incomplete"


def _write_json(path: pathlib.Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=list))
    os.replace(tmp, path)


# ---------------------------------------------------------------- config files


def load_sweep(config_spec: str) -> list[dict]:
    """``FILE[:ARG]`` -> the file's ``get_sweep()`` (``get_sweep(ARG)`` when it takes an argument)."""
    from embedjax.train.config import load_config_module

    module, path_str, arg = load_config_module(config_spec, prefix="embedjax_sweep")
    if not hasattr(module, "get_sweep"):
        raise ValueError(f"config file {path_str!r} defines no get_sweep(); add one returning a list of "
                         "override dicts (see embedjax.sweep.product / with_seeds)")
    takes_arg = len(inspect.signature(module.get_sweep).parameters) > 0
    if arg and not takes_arg:
        raise ValueError(f"{path_str}: get_sweep() takes no argument but the spec passes {arg!r}")
    return module.get_sweep(arg) if (takes_arg and arg) else module.get_sweep()


def train_entry(config_spec: str) -> tuple[str, Any]:
    """-> (the trainer command of the config file, that trainer's schema function ``default_config``)."""
    import importlib

    from embedjax.train.config import load_config_module

    module, path_str, _ = load_config_module(config_spec, prefix="embedjax_sweep_entry")
    command = getattr(module, "TRAIN_COMMAND", "train")
    if command not in TRAIN_COMMANDS:
        raise ValueError(f"{path_str}: TRAIN_COMMAND={command!r} is not a trainer; use one of {sorted(TRAIN_COMMANDS)}")
    return command, importlib.import_module(TRAIN_COMMANDS[command]).default_config


def check_overrides(config_spec: str, runs: Sequence[Mapping], extra: Sequence[str], schema=None) -> None:
    """Resolve every run's config once, so a typo in get_sweep() fails before anything starts."""
    from embedjax.train.config import apply_overrides, default_config, load_config_file

    schema = schema or default_config
    base = load_config_file(config_spec, schema=schema)
    for run in runs:
        flags = [f[len("--config."):] for f in override_flags(run["overrides"])]
        try:
            apply_overrides(base, flags + list(extra), schema=schema)
        except (ValueError, TypeError) as err:
            raise ValueError(f"sweep run {run['name']!r}: {err}") from None


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="configs/<name>.py[:ARG] defining get_config and get_sweep")
    parser.add_argument("--workdir", required=True, help="sweep root: one subfolder per run (a gs:// path for tpu_pod)")
    parser.add_argument("--launcher", default="local", choices=LAUNCHERS)
    parser.add_argument("--launcher_args", default="",
                        help="options for launch/<launcher>.sh as one string, e.g. \"--name v5e --zone us-west4-a\"")
    parser.add_argument("--dry_run", action="store_true", help="print each run's command; run nothing")
    parser.add_argument("--only", default="", help="run only runs whose name contains this text (a run's exact "
                        "name selects that run alone, even where it is part of another run's name)")
    # --config.KEY=VALUE flags apply to every run; the CLI hands them over as args.overrides
    parser.set_defaults(overrides=[], accepts_overrides=True)


def plan(args) -> tuple[list[dict], list[str], list[dict]]:
    """-> (the selected runs with name, overrides, workdir, status, command; the common override
    flags; every run of the sweep, selected or not, as name and overrides)."""
    from embedjax.train.cli import split_overrides

    extra = [f"--config.{o}" for o in split_overrides(getattr(args, "overrides", None) or [])]
    runs = expand(load_sweep(args.config))
    whole = [{"name": r["name"], "overrides": r["overrides"]} for r in runs]
    if args.only:
        exact = [r for r in runs if r["name"] == args.only]
        runs = exact or [r for r in runs if args.only in r["name"]]
        if not runs:
            raise ValueError(f"--only {args.only!r} matches no run of the sweep")
    if args.launcher == "inprocess" and not is_local(args.workdir):
        raise ValueError(f"--launcher inprocess writes run folders on this machine; {args.workdir} is not local")
    command, schema = train_entry(args.config)
    check_overrides(args.config, runs, [e[len("--config."):] for e in extra], schema=schema)
    clash = {e.split("=", 1)[0][len("--config."):] for e in extra} & {k for r in runs for k in r["overrides"]}
    if clash:
        raise ValueError(f"--config.{sorted(clash)[0]} is an axis of the sweep; change it in get_sweep() instead")
    launcher_args = shlex.split(args.launcher_args)
    for run in runs:
        run["workdir"] = join_path(args.workdir, run["name"])
        run["status"] = run_status(run["workdir"])
        run["command"] = launch_command(args.launcher, run, args.workdir, args.config, extra, launcher_args,
                                        command=command)
    return runs, extra, whole


def run_in_process(argv: Sequence[str], log_path: pathlib.Path) -> int:
    """Run ``python -m embedjax COMMAND ...`` (``argv`` as `launch_command` builds it) in this process, its
    stdout and stderr into ``log_path``: no interpreter start-up or imports per run (they dominate short
    runs). Compiled functions are dropped afterwards. -> the exit status the command would have had."""
    import contextlib
    import traceback

    import jax

    from embedjax.cli import main as cli_main

    with open(log_path, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            code = cli_main(list(argv[3:]))  # argv = [python, -m, embedjax, COMMAND, ...]
        except Exception:  # noqa: BLE001 - a failed run is recorded, the sweep goes on
            traceback.print_exc()
            code = 1
    jax.clear_caches()
    return code


def main(args) -> dict:
    runs, extra, whole = plan(args)
    todo = [r for r in runs if r["status"] != "finished"]
    for run in runs:
        mark = "skip (finished)" if run["status"] == "finished" else run["status"]
        print(f"# {run['name']}: {mark}", file=sys.stderr if not args.dry_run else sys.stdout)
        if args.dry_run and run["status"] != "finished":
            print(shlex.join(run["command"]), flush=True)
    result = {"command": "sweep", "workdir": str(args.workdir), "launcher": args.launcher, "dry_run": args.dry_run,
              "runs": len(runs), "skipped": len(runs) - len(todo), "to_run": len(todo)}
    if args.dry_run:
        return result
    if is_local(args.workdir):
        root = pathlib.Path(args.workdir)
        # The manifest lists the whole sweep, also when --only runs part of it: readers of the
        # sweep (results, experiment reports) find every run there, started or not.
        manifest = {"config": args.config, "common_overrides": extra, "runs": whole}
        _write_json(root / MANIFEST, manifest)
        for run in runs:
            _write_json(pathlib.Path(run["workdir"]) / RUN_RECORD, {"name": run["name"], "overrides": run["overrides"]})
    failed = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    for i, run in enumerate(todo):
        print(f"# [{i + 1}/{len(todo)}] {run['name']}: {shlex.join(run['command'])}", file=sys.stderr, flush=True)
        log_path = pathlib.Path(run["workdir"]) / "sweep_stdout.log" if is_local(run["workdir"]) else None
        if args.launcher == "inprocess":
            code = run_in_process(run["command"], log_path)
        elif log_path is not None:
            with open(log_path, "w") as log:
                code = subprocess.call(run["command"], stdout=log, stderr=subprocess.STDOUT, env=env)
        else:
            code = subprocess.call(run["command"], env=env)
        if code != 0:
            where = f"; see {log_path}" if log_path else ""
            print(f"# {run['name']} failed with exit status {code}{where}", file=sys.stderr, flush=True)
            failed.append(run["name"])
    result.update({"failed": failed, "ran": len(todo) - len(failed)})
    if args.launcher in ("local", "inprocess"):
        result["finished"] = sum(run_status(r["workdir"]) == "finished" for r in runs)
    if failed:
        raise RuntimeError(f"{len(failed)} sweep run(s) failed: {', '.join(failed)}")
    return result

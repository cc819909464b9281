"""What every bench shares: the provenance of its numbers, waiting for an idle machine, recording.

A bench prints its JSON line and changes no file. With ``--record`` it also appends, per row,

* the full record (the row plus commit, dirty flag, 1-minute load average at the start, device,
  library versions and the command) to ``benchmarks/<bench>.jsonl``: the row's artifact;
* a Markdown row linking that record to the table under ``## <section>`` of ``BENCHMARKS.md``
  (``tests/docs/test_figure_artifacts.py`` checks that the row's figures are in the record).

Both paths are relative to the working directory (run benches from the repository root).
Speed ratios are only meaningful on an idle machine: ``--wait-idle [LOAD]`` waits (up to
``--wait-timeout`` seconds, else the bench fails) until the 1-minute load average is below LOAD,
and every row says whether it was measured idle or under load. Files are rewritten through a
temporary file and ``os.replace``, so a crash never leaves one half-written.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
import time

from embedjax import provenance

DEFAULT_IDLE_LOAD = 0.5  # 1-minute load average below which a 2-core machine counts as idle
BENCHMARKS_MD = "BENCHMARKS.md"
RECORDS_DIR = "benchmarks"
HISTORY_HEADING = "## Earlier rows (before provenance was recorded)"
# Short names of the versions shown in a row (the record holds all of them).
_SHOWN_VERSIONS = {"jax": "jax", "torch": "torch", "sentence-transformers": "st", "faiss-cpu": "faiss"}


class BenchFailed(RuntimeError):
    """A bench finished but found an error (a failed cell, a mismatch): the CLI prints its result, exits 1."""

    def __init__(self, message: str, result: dict):
        super().__init__(message)
        self.bench_result = {**result, "error": message}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every bench takes: --record, --wait-idle, --wait-timeout."""
    parser.add_argument("--record", action="store_true",
                        help=f"append the rows to {BENCHMARKS_MD} and their records to {RECORDS_DIR}/NAME.jsonl "
                             "(default: only print the JSON line)")
    parser.add_argument("--wait-idle", type=float, nargs="?", const=DEFAULT_IDLE_LOAD, default=None, metavar="LOAD",
                        help=f"wait until the 1-minute load average is below LOAD (default {DEFAULT_IDLE_LOAD}) "
                             "before measuring")
    parser.add_argument("--wait-timeout", type=float, default=3600.0,
                        help="seconds --wait-idle may wait before the bench fails (default 3600)")


def add_cpu_gemm_argument(parser: argparse.ArgumentParser) -> None:
    """--cpu-gemm: the kernel libraries XLA:CPU calls for embedjax's programs (`embedjax.xla_cpu`)."""
    from embedjax import xla_cpu  # stdlib only at import: the CLI's help stays light

    parser.add_argument("--cpu-gemm", choices=xla_cpu.CHOICES, default=None,
                        help="kernel libraries XLA:CPU calls for embedjax's programs (embedjax.xla_cpu; default: "
                             f"${xla_cpu.ENV} or auto: oneDNN's dots on x86-64)")


def apply_cpu_gemm(args: argparse.Namespace) -> str:
    """Put ``--cpu-gemm`` (if given) where the programs read it; the library they will use
    (``onednn`` or ``xla``) on JAX's default device, for the row."""
    import jax

    from embedjax import xla_cpu

    if args.cpu_gemm is not None:  # read when the programs are compiled
        os.environ[xla_cpu.ENV] = args.cpu_gemm
    return xla_cpu.resolved(jax.devices()[0].platform)


def wait_for_idle(threshold: float, timeout_s: float, *, poll_s: float = 15.0, load=provenance.load_average_1min,
                  sleep=time.sleep, clock=time.monotonic) -> float:
    """Block until ``load() < threshold``; return that load. TimeoutError after ``timeout_s``."""
    if not threshold > 0:
        raise ValueError(f"--wait-idle LOAD must be > 0; got {threshold}")
    deadline = clock() + timeout_s
    while True:
        now = load()
        if now < threshold:
            return now
        if clock() >= deadline:
            raise TimeoutError(f"the 1-minute load average stayed at or above {threshold} for {timeout_s:.0f} s "
                               f"(last {now}); not measuring. Stop other jobs or raise --wait-timeout")
        print(f"waiting for an idle machine: load {now} >= {threshold}", file=sys.stderr, flush=True)
        sleep(min(poll_s, max(0.0, deadline - clock())))


def start(args: argparse.Namespace) -> dict:
    """Call before measuring: waits for idle if asked; returns the provenance of this run's rows."""
    threshold = args.wait_idle if args.wait_idle is not None else DEFAULT_IDLE_LOAD
    if args.wait_idle is not None:
        wait_for_idle(args.wait_idle, args.wait_timeout)
    info = provenance.provenance()
    info["command"] = getattr(args, "command_line", None) or info["command"]  # set by the CLI
    info["measured"] = "idle" if info["load_1min"] < threshold else "under load"
    info["idle_threshold"] = threshold
    return info


def cpu_description(cpuinfo: str, cores: int) -> str:
    """The CPU as ``/proc/cpuinfo`` text describes it: model name, then family and model numbers and
    the widest vector ISA it exposes (hosts behind one model name differ: a hypervisor may hide
    AVX-512 from one AMD EPYC and not another), then ``cores``."""
    fields = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())  # the first processor's
    model = fields.get("model name") or platform.processor() or "cpu"
    flags = set(fields.get("flags", "").split())
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None
    detail = [f"family {fields['cpu family']} model {fields['model']}"] if "cpu family" in fields and "model" in fields else []
    detail += [isa] if isa else []
    return f"{model}{' (' + ', '.join(detail) + ')' if detail else ''}, {cores} cores"


def device_description() -> str:
    """The machine a number was measured on: accelerator if JAX has one, else `cpu_description`."""
    import jax

    dev = jax.devices()[0]
    if dev.platform != "cpu":
        return f"{dev.device_kind} x{jax.device_count()}"
    try:
        cpuinfo = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    return cpu_description(cpuinfo, os.cpu_count())


def _shown_versions(versions: dict) -> str:
    return ", ".join(f"{short} {versions[name]}" for name, short in _SHOWN_VERSIONS.items() if name in versions)


def _format(value) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value).replace("|", "/")


def _atomic_write(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def append_record(name: str, record: dict, directory: str | os.PathLike = RECORDS_DIR) -> tuple[pathlib.Path, int]:
    """Append ``record`` to ``directory/name.jsonl``; returns the file and the record's index in it."""
    path = pathlib.Path(directory) / f"{name}.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    lines = [line for line in lines if line.strip()]
    _atomic_write(path, "\n".join([*lines, json.dumps(record, default=float)]) + "\n")
    return path, len(lines)


def append_row(section: str, row: dict, path: str | os.PathLike = BENCHMARKS_MD) -> pathlib.Path:
    """Add ``row`` to the table under ``## {section}`` (created before the history section if missing).

    A new row follows the table's column order; keys the table lacks are not shown (they stay in
    the record), so keep a bench's keys stable.
    """
    path = pathlib.Path(path)
    lines = path.read_text().splitlines() if path.exists() else ["# Benchmarks", ""]
    heading = f"## {section}"
    if heading not in lines:
        columns = list(row)
        block = [heading, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        if HISTORY_HEADING in lines:
            at = lines.index(HISTORY_HEADING)
            lines[at:at] = [*block, ""]
        else:
            lines += ["", *block]
        insert_at = lines.index(heading) + len(block)
    else:
        start_at = lines.index(heading)
        header_at = next(i for i in range(start_at + 1, len(lines)) if lines[i].startswith("|"))
        columns = [c.strip() for c in lines[header_at].strip("|").split("|")]
        insert_at = header_at + 2
        while insert_at < len(lines) and lines[insert_at].startswith("|"):
            insert_at += 1
    lines.insert(insert_at, "| " + " | ".join(_format(row.get(c, "")) for c in columns) + " |")
    _atomic_write(path, "\n".join(lines) + "\n")
    return path


def finish(args: argparse.Namespace, name: str, section: str, rows: list[dict], started: dict,
           shown: list[str] | None = None) -> list[dict]:
    """Attach the run's provenance to each row; with ``--record`` append records and Markdown rows.

    ``shown`` names the row keys the Markdown table shows (default: all); the record keeps all.
    """
    records = []
    for row in rows:
        record = {"date": datetime.date.today().isoformat(), "bench": name, **row,
                  "commit": started["commit"], "dirty": started["dirty"], "load_1min": started["load_1min"],
                  "measured": started["measured"], "idle_threshold": started["idle_threshold"],
                  "versions": started["versions"], "command": started["command"]}
        records.append(record)
        if args.record:
            jsonl, index = append_record(name, record)
            shown = {"date": record["date"], "commit": record["commit"], "dirty": record["dirty"],
                     "load_1min": record["load_1min"], "measured": record["measured"],
                     **{k: v for k, v in row.items() if shown is None or k in shown},
                     "versions": _shown_versions(record["versions"]),
                     "artifact": f"[json]({jsonl.as_posix()}#/{index})"}
            append_row(section, shown)
    return records

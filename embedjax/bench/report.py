"""Append benchmark rows to the Markdown tables of ``BENCHMARKS.md``.

Each benchmark owns one section (``## <section>``) holding one table; a new row goes
under the table's last row, in the table's column order (new keys add no columns:
they are left out, so keep a benchmark's keys stable). The file is rewritten through a
temporary file and ``os.replace`` so a crash never leaves it half-written.
"""
from __future__ import annotations

import datetime
import os
import pathlib
import platform
import subprocess


def device_description() -> str:
    """The machine a number was measured on: accelerator if JAX has one, else CPU model and cores."""
    import jax

    dev = jax.devices()[0]
    if dev.platform != "cpu":
        return f"{dev.device_kind} x{jax.device_count()}"
    model = platform.processor() or "cpu"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def git_commit() -> str:
    """Short hash of HEAD; ``EMBEDJAX_COMMIT`` names it where the tree travels without .git (a lent GPU)."""
    if os.environ.get("EMBEDJAX_COMMIT"):
        return os.environ["EMBEDJAX_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value).replace("|", "/")


def append_row(section: str, row: dict, path: str | os.PathLike = "BENCHMARKS.md") -> pathlib.Path:
    """Add ``row`` (plus date and commit) to the table under ``## {section}``, creating either if needed."""
    path = pathlib.Path(path)
    row = {"date": datetime.date.today().isoformat(), "commit": git_commit(), **row}
    lines = path.read_text().splitlines() if path.exists() else ["# Benchmarks", "",
                                                                 "Rows are appended by `python -m embedjax bench ...`."]
    heading = f"## {section}"
    if heading not in lines:
        columns = list(row)
        lines += ["", heading, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        insert_at = len(lines)
    else:
        start = lines.index(heading)
        header_at = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("|")), None)
        next_heading = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        if header_at is None or header_at > next_heading:
            columns = list(row)
            lines[start + 1:start + 1] = ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            insert_at = start + 4
        else:
            columns = [c.strip() for c in lines[header_at].strip("|").split("|")]
            insert_at = header_at + 2
            while insert_at < len(lines) and lines[insert_at].startswith("|"):
                insert_at += 1
    lines.insert(insert_at, "| " + " | ".join(_format(row.get(c, "")) for c in columns) + " |")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path

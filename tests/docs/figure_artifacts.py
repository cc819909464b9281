"""Check that every figure in a Markdown results table is held by the artifact its row links to.

The convention (experiments/README.md states it for writers):

- A *results table* is any Markdown table (outside code fences) in README.md, BENCHMARKS.md or
  experiments/*/README.md whose body holds a number, unless the line just above it is
  ``<!-- not-results: WHY -->`` (a table of settings or method) or
  ``<!-- unverified: WHY -->`` (figures kept for the record that no artifact backs; WHY says why).
- Every body row with a number links at least one artifact: ``[label](path#/json/pointer)``
  where path (relative to the Markdown file) ends in .json, .jsonl or .csv, is committed to git and
  is under 1 MB. The optional fragment is an RFC 6901 JSON pointer into the artifact (a .jsonl file
  reads as a list of its records, a .csv file as a list of row dicts) selecting the part that
  holds the row.
- Every number in the row (links and `code spans` left out, dates skipped) must equal a number in
  the selected part to the precision shown: "79.77" is held by 79.7664 (within half a unit of the
  last digit shown). Numbers inside strings and keys of the artifact count too, so labels such as
  "(8,16,32)" or "T = 0.02" match the configuration the artifact records.
- A JSON artifact whose top level is an object names the command that made it under
  ``"command"``; every record of a .jsonl artifact does too.

``check_markdown(path, repo_root)`` returns the list of problems (empty when all is well).
"""
from __future__ import annotations

import bisect
import csv
import dataclasses
import functools
import io
import json
import math
import pathlib
import re
import subprocess
import urllib.parse

MAX_ARTIFACT_BYTES = 1_000_000
ARTIFACT_SUFFIXES = (".json", ".jsonl", ".csv")
MARKER = re.compile(r"^<!--\s*(not-results|unverified):\s*(\S.*?)\s*-->$")
LINK = re.compile(r"\[([^\]]*)\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`[^`]*`")
DATE = re.compile(r"\b\d{4}-\d{2}-\d{2}\b")
# A number not glued to a word, an @ (recall@10), a ^ (d^3) or a decimal point; an optional
# ratio suffix "x" (1.59x); thousands separators (4,288) are read both ways (see _candidates).
NUMBER = re.compile(
    r"(?<![\w.@^])([-+\u2212]?)(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?(?:[eE]([-+]?\d+))?(?:x|\u00d7)?(?![\w@])"
)


@dataclasses.dataclass(frozen=True)
class Figure:
    """A number as shown: its value and the half-unit of its last shown digit."""

    text: str
    value: float
    tolerance: float


def parse_figures(text: str) -> list[list[Figure]]:
    """Numbers in ``text``; each as a list of readings (a thousands-separated token has two)."""
    text = DATE.sub(" ", text)
    found = []
    for m in NUMBER.finditer(text):
        sign = -1.0 if m.group(1) in ("-", "\u2212") else 1.0
        whole, decimals, exponent = m.group(2), m.group(3) or "", m.group(4)
        scale = 10.0 ** int(exponent) if exponent else 1.0
        half_unit = 0.5 * 10.0 ** -len(decimals) * scale
        literal = whole.replace(",", "") + (f".{decimals}" if decimals else "") + (f"e{exponent}" if exponent else "")
        readings = [Figure(m.group(0), sign * float(literal), half_unit)]
        if "," in whole and not decimals and not exponent:
            # "(64,128,256)" is a tuple, "65,536" a thousands-separated number: accept either.
            parts = [Figure(p, float(p), 0.5) for p in whole.split(",")]
            readings.append(parts)  # type: ignore[arg-type]
        found.append(readings)
    return found


def _numbers_in(value, out: list[float]) -> None:
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, (int, float)):
        if math.isfinite(value):
            out.append(float(value))
        return
    if isinstance(value, str):
        try:
            out.append(float(value))
            return
        except ValueError:
            pass
        for readings in parse_figures(value):
            first = readings[0]
            out.append(first.value)
            if len(readings) > 1:
                out.extend(f.value for f in readings[1])
        return
    if isinstance(value, dict):
        for key, item in value.items():
            _numbers_in(key, out)
            _numbers_in(item, out)
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            _numbers_in(item, out)


def load_artifact(path: pathlib.Path):
    """JSON -> its value; JSONL -> list of records; CSV -> list of row dicts."""
    text = path.read_text()
    if path.suffix == ".json":
        return json.loads(text)
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return list(csv.DictReader(io.StringIO(text)))


def resolve_pointer(doc, pointer: str):
    """RFC 6901 JSON pointer ("" is the whole document); KeyError/IndexError when it selects nothing."""
    if pointer in ("", "/"):
        return doc
    if not pointer.startswith("/"):
        raise KeyError(f"a JSON pointer starts with '/': {pointer!r}")
    for raw in pointer[1:].split("/"):
        token = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(doc, list):
            doc = doc[int(token)]
        elif isinstance(doc, dict):
            doc = doc[token]
        else:
            raise KeyError(f"{token!r} indexes a {type(doc).__name__}")
    return doc


def holds(figure_readings: list, numbers_sorted: list[float]) -> bool:
    """Whether some reading of a shown number is in ``numbers_sorted`` to its shown precision."""
    def near(fig: Figure) -> bool:
        tol = fig.tolerance + 1e-9 * abs(fig.value)
        i = bisect.bisect_left(numbers_sorted, fig.value - tol)
        return i < len(numbers_sorted) and numbers_sorted[i] <= fig.value + tol

    first = figure_readings[0]
    if near(first):
        return True
    return len(figure_readings) > 1 and all(near(f) for f in figure_readings[1])


@dataclasses.dataclass
class Table:
    start_line: int  # 1-based line of the header row
    marker: tuple[str, str] | None
    rows: list[tuple[int, list[str]]]  # (1-based line, cells) of the body


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def markdown_tables(text: str) -> list[Table]:
    """Tables outside fenced code blocks, with the marker comment on the line above (if any)."""
    lines = text.splitlines()
    tables, in_fence, i = [], False, 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            i += 1
            continue
        is_table = (not in_fence and line.lstrip().startswith("|") and i + 1 < len(lines)
                    and re.match(r"^\s*\|?\s*:?-{3,}", lines[i + 1]))
        if not is_table:
            i += 1
            continue
        above = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        m = MARKER.match(above)
        table = Table(start_line=i + 1, marker=(m.group(1), m.group(2)) if m else None, rows=[])
        i += 2
        while i < len(lines) and lines[i].lstrip().startswith("|"):
            table.rows.append((i + 1, _cells(lines[i])))
            i += 1
        tables.append(table)
    return tables


@functools.lru_cache(maxsize=None)
def tracked_files(repo_root: pathlib.Path) -> frozenset[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=repo_root, capture_output=True, text=True, check=True)
    return frozenset(p for p in out.stdout.split("\0") if p)


def _artifact_problem(path: pathlib.Path, repo_root: pathlib.Path) -> str | None:
    if not path.is_file():
        return f"artifact {path} does not exist"
    try:
        rel = path.resolve().relative_to(repo_root.resolve()).as_posix()
    except ValueError:
        return f"artifact {path} is outside the repository"
    if rel not in tracked_files(repo_root):
        return f"artifact {rel} is not committed (git add it)"
    if path.stat().st_size >= MAX_ARTIFACT_BYTES:
        return f"artifact {rel} is {path.stat().st_size:,} bytes; keep artifacts under 1 MB"
    return None


def _command_problem(doc, rel: str) -> str | None:
    if isinstance(doc, dict) and not (isinstance(doc.get("command"), str) and doc["command"].strip()):
        return f"artifact {rel} does not name the command that made it (top-level \"command\")"
    if rel.endswith(".jsonl"):
        missing = [i for i, r in enumerate(doc) if not (isinstance(r, dict) and r.get("command"))]
        if missing:
            return f"artifact {rel}: records {missing[:5]} do not name their \"command\""
    return None


def check_markdown(md_path: pathlib.Path, repo_root: pathlib.Path) -> list[str]:
    """Problems of one Markdown file, each as 'FILE:LINE: what is wrong'."""
    md_path = pathlib.Path(md_path)
    repo_root = pathlib.Path(repo_root)
    where = md_path.resolve().relative_to(repo_root.resolve()).as_posix()
    problems: list[str] = []
    loaded: dict[pathlib.Path, object] = {}
    for table in markdown_tables(md_path.read_text()):
        if table.marker is not None:
            continue
        for line_no, cells in table.rows:
            row = " | ".join(cells)
            links = [(m.group(1), m.group(2)) for m in LINK.finditer(row)]
            bare = CODE_SPAN.sub(" ", LINK.sub(" ", row))
            figures = parse_figures(bare)
            if not figures:
                continue
            targets = [t for _, t in links if urllib.parse.urlsplit(t).path.endswith(ARTIFACT_SUFFIXES)]
            if not targets:
                shown = ", ".join(r[0].text for r in figures[:4])
                problems.append(f"{where}:{line_no}: row shows figures ({shown}, ...) but links no artifact "
                                "(.json/.jsonl/.csv); see experiments/README.md")
                continue
            numbers: list[float] = []
            for target in targets:
                parts = urllib.parse.urlsplit(target)
                path = (md_path.parent / urllib.parse.unquote(parts.path)).resolve()
                problem = _artifact_problem(path, repo_root)
                if problem:
                    problems.append(f"{where}:{line_no}: {problem}")
                    continue
                if path not in loaded:
                    try:
                        loaded[path] = load_artifact(path)
                    except (ValueError, UnicodeDecodeError) as err:
                        problems.append(f"{where}:{line_no}: artifact {path.name} does not parse: {err}")
                        continue
                    rel = path.relative_to(repo_root.resolve()).as_posix()
                    problem = _command_problem(loaded[path], rel)
                    if problem:
                        problems.append(f"{where}:{line_no}: {problem}")
                try:
                    part = resolve_pointer(loaded[path], urllib.parse.unquote(parts.fragment))
                except (KeyError, IndexError, ValueError) as err:
                    problems.append(f"{where}:{line_no}: pointer #{parts.fragment} selects nothing in "
                                    f"{path.name} ({err})")
                    continue
                _numbers_in(part, numbers)
            if not numbers:
                continue
            numbers.sort()
            missing = [r[0].text for r in figures if not holds(r, numbers)]
            if missing:
                problems.append(f"{where}:{line_no}: figures {missing} are not in the linked artifact part(s) "
                                f"{targets}")
    return problems


def results_markdown_files(repo_root: pathlib.Path) -> list[pathlib.Path]:
    """README.md, BENCHMARKS.md and every experiments/*/README.md."""
    root = pathlib.Path(repo_root)
    files = [root / "README.md", root / "BENCHMARKS.md", *sorted(root.glob("experiments/*/README.md"))]
    return [f for f in files if f.is_file()]


def exempt_tables(md_path: pathlib.Path) -> list[tuple[int, str, str]]:
    """(line, kind, reason) of each table marked not-results or unverified."""
    return [(t.start_line, *t.marker) for t in markdown_tables(pathlib.Path(md_path).read_text()) if t.marker]

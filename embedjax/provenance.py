"""Where a number came from: commit, dirty tree, machine load, device, library versions, command.

Benchmarks (``embedjax.bench``) and experiment scripts record ``provenance()`` next to every
figure they write, so a reader can tell what code measured it, on what, and under what load.
"""
from __future__ import annotations

import importlib.metadata
import os
import pathlib
import shlex
import subprocess
import sys

# Libraries whose versions change numbers or speed; absent ones are left out.
LIBRARIES = ("jax", "jaxlib", "flax", "optax", "numpy", "tokenizers", "torch", "sentence-transformers",
             "transformers", "faiss-cpu")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str:
    """Short hash of HEAD; ``EMBEDJAX_COMMIT`` names it where the tree travels without .git (a lent GPU)."""
    return os.environ.get("EMBEDJAX_COMMIT") or _git("rev-parse", "--short", "HEAD") or "unknown"


def git_dirty() -> bool | None:
    """Whether tracked files differ from HEAD (None when unknown, e.g. no .git)."""
    if os.environ.get("EMBEDJAX_COMMIT"):  # a copied tree: the launcher says (EMBEDJAX_DIRTY=0/1) or nobody knows
        flag = os.environ.get("EMBEDJAX_DIRTY")
        return None if flag is None else flag.lower() in ("1", "true", "yes")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def load_average_1min() -> float:
    """The machine's 1-minute load average (runnable processes, all cores together)."""
    return round(os.getloadavg()[0], 2)


def library_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed: ``python -m embedjax ...`` or ``python path/to/script.py ...``."""
    argv = list(sys.argv if argv is None else argv)
    script = pathlib.Path(argv[0]) if argv else pathlib.Path("python")
    try:
        rel = script.resolve().relative_to(REPO_ROOT)
    except ValueError:
        rel = None
    if rel is not None and rel.parts[0] == "embedjax":  # run as a module: python -m embedjax[.bench.encode]
        parts = rel.with_suffix("").parts
        head = "python -m " + ".".join(parts[:-1] if parts[-1] == "__main__" else parts)
    else:
        head = f"python {rel.as_posix() if rel is not None else argv[0]}"
    return " ".join([head, *(shlex.quote(a) for a in argv[1:])])


def provenance() -> dict:
    """commit, dirty, load_1min, versions and command of this process, now."""
    return {"commit": git_commit(), "dirty": git_dirty(), "load_1min": load_average_1min(),
            "versions": library_versions(), "command": command_line()}


def write_artifact(path, record: dict) -> pathlib.Path:
    """Write ``{**provenance(), **record}`` as indented JSON through a temporary file (atomic)."""
    import json

    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({**provenance(), **record}, indent=1, default=float) + "\n")
    os.replace(tmp, path)
    return path

"""Provenance of a figure: commit, dirty flag, load, versions and the command as typed."""
import subprocess

from embedjax import provenance


def test_commit_and_dirty_flag_come_from_git(monkeypatch):
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=provenance.REPO_ROOT, capture_output=True,
                          text=True).stdout.strip()
    assert provenance.git_commit() == head
    assert provenance.git_dirty() in (True, False)
    monkeypatch.setenv("EMBEDJAX_COMMIT", "abc1234")
    assert provenance.git_commit() == "abc1234" and provenance.git_dirty() is None
    monkeypatch.setenv("EMBEDJAX_DIRTY", "1")
    assert provenance.git_dirty() is True


def test_command_line_is_what_a_user_types():
    root = provenance.REPO_ROOT
    assert provenance.command_line([str(root / "embedjax/__main__.py"), "bench", "search", "--k", "10"]) == \
        "python -m embedjax bench search --k 10"
    assert provenance.command_line([str(root / "embedjax/bench/encode.py"), "--batch-size", "64"]) == \
        "python -m embedjax.bench.encode --batch-size 64"
    assert provenance.command_line([str(root / "experiments/limit/run.py"), "sweep", "--dims", "4 5"]) == \
        "python experiments/limit/run.py sweep --dims '4 5'"


def test_provenance_record():
    record = provenance.provenance()
    assert set(record) == {"commit", "dirty", "load_1min", "versions", "command"}
    assert record["load_1min"] >= 0 and "jax" in record["versions"] and "python" in record["versions"]

"""Every figure in a README/BENCHMARKS results table is held by a committed artifact (issue 10).

The convention is in experiments/README.md; the checker in figure_artifacts.py. The first test
reads the repository's own Markdown; the others show the checker fails on what it must catch.
"""
import json
import pathlib
import subprocess

import pytest

import figure_artifacts as fa  # sibling helper (tests/docs is on sys.path)

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_every_results_row_in_the_repository_is_held_by_its_artifact():
    files = fa.results_markdown_files(REPO)
    assert REPO / "README.md" in files and REPO / "BENCHMARKS.md" in files
    problems = [p for f in files for p in fa.check_markdown(f, REPO)]
    assert not problems, "\n".join(problems)


def test_exemptions_say_why():
    for f in fa.results_markdown_files(REPO):
        for line, kind, reason in fa.exempt_tables(f):
            assert len(reason.split()) >= 3, f"{f.name}:{line}: <!-- {kind}: ... --> needs a reason, got {reason!r}"


@pytest.fixture()
def repo(tmp_path):
    """A scratch git repository with one artifact and one README that cites it."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    exp = tmp_path / "experiments" / "demo"
    exp.mkdir(parents=True)
    (exp / "results.json").write_text(json.dumps({
        "command": "python experiments/demo/run.py",
        "rows": [{"setting": "int8", "dims": 384, "ndcg@10": 79.7664, "p": 9.999e-05},
                 {"setting": "binary", "dims": 256, "ndcg@10": 78.981, "p": 0.0312}],
    }))
    (exp / "runs.csv").write_text("name,seconds\nmean (8,16,32),219.4\n")
    subprocess.run(["git", "-C", str(tmp_path), "add", "-A"], check=True)
    fa.tracked_files.cache_clear()
    return tmp_path


def _write_readme(repo, body: str) -> pathlib.Path:
    path = repo / "experiments" / "demo" / "README.md"
    path.write_text(body)
    return path


def _check(repo, body):
    fa.tracked_files.cache_clear()
    return fa.check_markdown(_write_readme(repo, body), repo)


TABLE = """# demo

| setting | dims | nDCG@10 | p | artifact |
|---|---:|---:|---:|---|
| int8 | 384 | {a} | 9.999e-05 | [json](results.json#/rows/0) |
| binary | 256 | 78.98 | 0.031 | [json](results.json#/rows/1) |
"""


def test_a_table_whose_figures_are_in_its_artifact_passes(repo):
    assert _check(repo, TABLE.format(a="79.77")) == []


def test_a_figure_edited_without_its_artifact_fails(repo):
    problems = _check(repo, TABLE.format(a="79.87"))
    assert len(problems) == 1 and "79.87" in problems[0] and "README.md:5" in problems[0]


def test_a_figure_of_another_row_does_not_count(repo):
    # 78.98 is in the artifact, but not in the part row 0 points at.
    problems = _check(repo, TABLE.format(a="78.98"))
    assert len(problems) == 1 and "78.98" in problems[0]


def test_precision_is_the_one_shown(repo):
    assert _check(repo, TABLE.format(a="79.8")) == []  # 79.7664 rounds to 79.8
    assert _check(repo, TABLE.format(a="79.766")) == []
    assert len(_check(repo, TABLE.format(a="79.760"))) == 1  # three decimals claim 79.760 +- 0.0005


def test_a_row_with_figures_and_no_artifact_fails(repo):
    problems = _check(repo, "| what | figure |\n|---|---|\n| STS-B test | 83.28 |\n")
    assert len(problems) == 1 and "links no artifact" in problems[0]


def test_missing_uncommitted_or_unpointed_artifacts_fail(repo):
    row = "| a | b |\n|---|---|\n| x | 79.77 [j]({target}) |\n"
    assert "does not exist" in _check(repo, row.format(target="nope.json"))[0]
    (repo / "experiments" / "demo" / "new.json").write_text('{"command": "c", "v": 79.77}')
    assert "not committed" in _check(repo, row.format(target="new.json"))[0]
    assert "selects nothing" in _check(repo, row.format(target="results.json#/rows/7"))[0]


def test_an_artifact_must_name_its_command(repo):
    (repo / "experiments" / "demo" / "bare.json").write_text('{"v": 79.77}')
    subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True)
    problems = _check(repo, "| a | b |\n|---|---|\n| x | 79.77 [j](bare.json) |\n")
    assert len(problems) == 1 and "command" in problems[0]


def test_csv_rows_labels_and_thousands(repo):
    body = "| run | seconds |\n|---|---:|\n| mean (8,16,32) | 219 [csv](runs.csv#/0) |\n"
    assert _check(repo, body) == []
    assert len(_check(repo, body.replace("219", "229"))) == 1
    assert len(_check(repo, body.replace("(8,16,32)", "(8,16,64)"))) == 1


def test_marked_tables_code_and_settings_are_not_checked(repo):
    body = ("<!-- not-results: settings of the method, not measurements -->\n"
            "| lr | 0.01 |\n|---|---|\n| steps | 5000 |\n\n"
            "```\n| fenced | 1.23 |\n|---|---|\n| x | 4.56 |\n```\n")
    assert _check(repo, body) == []


def test_number_parsing():
    def values(text):
        return [r[0].value for r in fa.parse_figures(text)]

    assert values("1.8-3.4x, 65,536 x 768 on 2026-11-28") == [1.8, 3.4, 65536.0, 768.0]
    assert values("recall@10 float32 H200 e569e52+ 4b07225 x86_64 2D d^3") == []
    assert values("-13.96 [-15.47, +0.02] 9.999e-05**") == [-13.96, -15.47, 0.02, 9.999e-05]

"""The multi-vector experiment runner end to end at its check scale (a 2-step ColBERT-MiniLM on 64
scifact train pairs; 60 scifact test documents): every method row, the curves and the plot."""
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_runner_check_scale(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run([sys.executable, str(ROOT / "experiments/multivector/run.py"), "--scale", "check",
                    "--runs", str(tmp_path / "runs"), "--out", str(out)], check=True, cwd=ROOT)
    results = json.loads((out / "results.json").read_text())
    methods = [r["method"] for r in results["rows"]]
    assert methods[0] == "ColBERT, full MaxSim" and any(m.startswith("MUVERA") for m in methods)
    assert {"clustered after training (2, 4)", "tail pruning (first 4)", "k-spacing (every 2)"} <= set(methods)
    for row in results["rows"]:
        assert 0 <= row["ndcg@10"] <= 100 and len(row["per_query_ndcg@10"]) == 8
        if row["method"] != methods[0]:
            assert 0 < row["p_vs_maxsim"] <= 1
    muvera = next(r for r in results["rows"] if r["method"].startswith("MUVERA"))
    assert muvera["bytes_per_doc"] > results["rows"][0]["bytes_per_doc"]  # FDE codes + the tokens it re-ranks
    curves = json.loads((out / "curve.json").read_text())["curves"]["scifact-test"]
    assert set(curves) == {"single-vector heuristic", "MUVERA (2, 2, 8)"}
    assert (out / "recall_curve.png").stat().st_size > 1000
    table = (out / "table.md").read_text().splitlines()
    method_rows = [line for line in table if "](results.json#/rows/" in line]
    assert len(method_rows) == len(results["rows"])
    assert f"| {results['rows'][0]['ndcg@10']:.2f} |" in method_rows[0]
    curve_rows = [line for line in table if "](curve.json#/curves/scifact-test)" in line]
    assert len(curve_rows) == 2 and f"{curves['MUVERA (2, 2, 8)']['10']:.3f}" in curve_rows[1]

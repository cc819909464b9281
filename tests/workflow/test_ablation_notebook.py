"""notebooks/ablation_report.ipynb executed headless on a synthetic results folder: its PNGs exist,
are not blank, and carry the significance marks of significance.csv."""
import contextlib
import csv
import io
import json
import pathlib

import numpy as np
import pytest

from workflow_synthetic_runs import synthetic_root

# nbclient, nbformat, ipykernel and matplotlib come with the [dev] extra; a missing one fails loudly here.
import nbclient  # noqa: E402
import nbformat  # noqa: E402

NOTEBOOK = pathlib.Path(__file__).resolve().parents[2] / "notebooks" / "ablation_report.ipynb"


def _stars(p):
    return "**" if p < 0.01 else "*" if p < 0.05 else "n.s."


def test_ablation_report_notebook_renders_marked_plots(tmp_path, monkeypatch):
    from embedjax import cli
    import matplotlib.image

    root, _ = synthetic_root(tmp_path)
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["results", str(root), "--no_score", "--samples", "2000"]) == 0
    plots = tmp_path / "plots"
    monkeypatch.setenv("EMBEDJAX_RESULTS_DIR", str(root))
    monkeypatch.setenv("EMBEDJAX_PLOTS_DIR", str(plots))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)

    index = json.loads((plots / "plots.json").read_text())
    # 2 axes x (the tested nDCG@10 + final_loss), and the forest plot of all tests
    assert sorted((e["axis"], e["metric"]) for e in index) == [
        ("all", "mean_difference"),
        ("model.pooling", "final_loss"), ("model.pooling", "limit-small-test/ndcg@10"),
        ("train.matryoshka_dims", "final_loss"), ("train.matryoshka_dims", "limit-small-test/ndcg@10")]
    for entry in index:
        image = matplotlib.image.imread(entry["png"])[..., :3]
        assert image.shape[0] > 200 and image.shape[1] > 200
        ink = np.any(image < 0.9, axis=-1).mean()  # share of pixels that are not (near) white
        assert 0.02 < ink < 0.9, (entry["png"], ink)
        assert len(np.unique(image.reshape(-1, 3), axis=0)) > 20  # bars, text, error bars: not one flat fill

    with open(root / "significance.csv") as f:
        sig = {(r["axis"], r["value"], r["context"]): float(r["p_value"])
               for r in csv.DictReader(f) if r["score"] == "limit-small-test/ndcg@10"}
    marked = {(e["axis"], m["value"], m["context"]): m
              for e in index if e["metric"] == "limit-small-test/ndcg@10" for m in e["marks"]}
    assert marked.keys() == sig.keys()  # one mark per paired test, on the bar of the tested value
    for key, p_value in sig.items():
        assert marked[key]["p_value"] == pytest.approx(p_value)
        assert marked[key]["mark"] == _stars(p_value)
    assert all(m["mark"] == "**" for k, m in marked.items() if k[0] == "model.pooling")  # the planted effect

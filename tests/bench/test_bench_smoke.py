"""Every ``python -m embedjax bench ...`` command runs end to end at tiny sizes (issue 10: benches can't rot).

Each runs in-process through the CLI (the suite's 8 fake CPU devices serve bench loss), from a
scratch working directory: by default a bench prints its JSON line and writes no file; with
--record it writes BENCHMARKS.md rows whose figures the artifact checker finds in the JSONL
records. Sizes are tiny: the numbers mean nothing, the code paths are the point.
"""
import argparse
import json
import pathlib
import subprocess
import sys

import pytest

from embedjax import cli
from embedjax.bench import report

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "docs"))
import figure_artifacts  # noqa: E402  (the README/BENCHMARKS artifact checker)

TINY = {
    "attention": ["--batch", "3", "--lengths", "8,21", "--heads", "2", "--head-dim", "4", "--repeats", "1",
                  "--chunk-size", "8"],
    "attention_train": ["--train", "--batch", "3", "--lengths", "21", "--heads", "2", "--head-dim", "4", "--repeats",
                        "1", "--chunk-size", "8", "--impls", "explicit,chunked,flash", "--matmul-size", "64"],
    "search": ["--n", "2000", "--bits", "64", "--dim", "16", "--queries", "3", "--k", "5", "--repeats", "1",
               "--bandwidth-mib", "8"],
    "kernels": ["--n", "300", "--bits", "64", "--dim", "20", "--queries", "7", "--k", "5", "--blocks", "8x128",
                "--repeats", "1", "--bandwidth-mib", "4", "--matmul-size", "64", "--popcount-mib", "1"],
    "kernels_words": ["--paths", "hamming", "--layout", "words", "--n", "300", "--bits", "64", "--queries", "1,7",
                      "--k", "5", "--blocks", "8x128", "--select", "two_pass", "--repeats", "1", "--bandwidth-mib", "4",
                      "--matmul-size", "64", "--popcount-mib", "1"],
    "loss": ["--batch", "64", "--dim", "16", "--time-batch", "512", "--time-dim", "64", "--repeats", "1",
             "--budget-gib", "0.0005", "--max-search-batch", "4096", "--row-block", "24"],
    "loss_pallas": ["--batch", "128", "--dim", "16", "--time-batch", "128", "--time-dim", "16", "--repeats", "1",
                    "--skip-max-batch", "--ring-impl", "pallas"],
    "train_step": ["--layers", "1", "--hidden", "16", "--heads", "2", "--intermediate", "32", "--vocab", "1200",
                   "--batch", "4", "--seq", "8", "--steps", "2", "--matmul-size", "64"],
    "matmul": ["--tokens", "37", "--hidden", "12", "--heads", "3", "--intermediate", "20", "--repeats", "1"],
    "encode": ["--num-texts", "6", "--batch-size", "4", "--repeats", "1"],
    "encode_scifact": ["--corpus", "scifact", "--num-texts", "3", "--batch-size", "4", "--repeats", "1",
                       "--attention-impl", "xla"],
    "train": ["--steps", "3", "--batch-size", "2", "--length-buckets", "64", "--set", "model.remat=dots"],
    "scan": ["--batch-size", "2", "--length", "8", "--repeats", "1"],
    "long_context": ["--lengths", "1024,4096", "--ratio-from", "1024", "--position-extension", "grouped"],
    "lora": ["--batch-size", "2", "--length", "8", "--rank", "2"],
}
NEEDS_MODEL = ("encode", "encode_scifact", "train", "scan", "long_context", "lora")  # run on the tiny random BERT folder
VARIANTS = {"encode_scifact": "encode", "loss_pallas": "loss", "attention_train": "attention",
            "kernels_words": "kernels"}  # a second configuration of one bench


def _module(name):
    return VARIANTS.get(name, name)


def _bench(capsys, name, *extra):
    argv = ["bench", _module(name), *TINY[name], *extra]
    code = cli.main(argv)
    out = capsys.readouterr().out.strip().splitlines()
    return code, json.loads(out[-1])


def test_every_bench_module_has_a_smoke_test():
    assert {_module(n) for n in TINY} == set(cli._bench_modules())


# lora compiles two training steps (~140 s on 2 loaded cores): run by `make test-all`
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "lora" else n for n in sorted(TINY)])
def test_bench_runs_and_writes_nothing_by_default(name, capsys, tmp_path, monkeypatch, data_dir, request):
    extra = ["--model", str(request.getfixturevalue("tiny_st_model"))] if name in NEEDS_MODEL else []
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    code, result = _bench(capsys, name, *extra)
    assert code == 0, result
    assert list(work.iterdir()) == [], "a bench without --record must not write files"
    records = result["rows"] if "rows" in result else [result]
    for record in records:
        assert record["commit"] and record["load_1min"] >= 0 and "jax" in record["versions"]
        assert record["measured"] in ("idle", "under load") and record["command"].startswith("python -m embedjax")
    if name.startswith("kernels"):
        assert result["all_match_xla"] is True
    if name == "kernels_words":  # a word-major corpus at scan_rows; one query runs with a block of 1
        assert {r["layout"] for r in result["rows"]} == {"words"} and result["popcount_T_per_s"] > 0
        pallas = {r["queries"]: r for r in result["rows"] if r["impl"] != "xla"}
        assert pallas[1]["block_q"] == 1 and pallas[7]["block_q"] == 8
        assert all(r["fraction_of_popcount_rate"] > 0 for r in result["rows"])
    if name == "loss_pallas":  # the fused tiles (interpret mode) in the bench: exact, and their FLOP count
        assert result["ring_impl"] == "pallas" and result["ring_grad_rel_err_vs_f64"] < 1e-5
        assert result["ring_flops_over_6B2d"] == pytest.approx(10 / 6, abs=1e-3)
        assert result["time_shape"] == "128x16, pallas tiles"
    if name == "loss":  # the stripes (24 rows of 64 per device: one padded) are exact, and timed
        assert result["stripes_grad_rel_err_vs_f64"] < 1e-5 and result["row_block"] == 24
        assert result["stripes_step_ms"] > 0 and result["stripes_achieved_gflops"] > 0
    if name.startswith("loss"):  # the step times' ratio is the FLOP ratio over the rates' ratio
        ratio = result["ring_step_ms"] / result["allgather_step_ms"]  # rounded to 0.1 ms: loose
        assert ratio == pytest.approx(result["ring_flops_over_6B2d"] / result["ring_rate_over_allgather_rate"], rel=0.1)
    if name.startswith("encode"):
        assert result["texts"] == int(TINY[name][TINY[name].index("--num-texts") + 1]) and result["ratio"] > 0
        assert result["attention_impl"] == ("xla" if name == "encode_scifact" else "auto")
    if name == "train":
        assert result["batch"] == 2 and result["steps"] == 3 and result["sentence-transformers pairs/s"] > 0
        assert result["length buckets"] == "64" and result["overrides"] == "model.remat=dots"
    if name == "attention":  # every kernel agrees with PyTorch's SDPA on the real tokens
        assert [r["shape"] for r in result["rows"]] == ["3x8x2x4", "3x21x2x4"]
        assert all(r["max_abs_diff_vs_torch"] < 1e-5 and r["ratio_blocked"] > 0 for r in result["rows"])
    if name == "attention_train":  # the gradients of each kernel equal SDPA's backward pass's
        (row,) = result["rows"]
        assert row["mode"] == "train" and row["torch_device"] == "cpu" and row["max_abs_grad_diff_vs_torch"] < 1e-5
        assert row["ratio_flash"] > 0 and row["xla_ms"] is None  # columns of the implementations not run
        # the rates' fractions: the same FLOPs over each time, so their ratio is the time ratio
        assert row["flash_fraction_of_matmul"] / row["torch_fraction_of_matmul"] == pytest.approx(
            row["ratio_flash"], rel=2e-2)
    if name == "matmul":  # XLA's products equal PyTorch's (float32 sums of 12-20 terms)
        assert [r["product"] for r in result["rows"]] == ["qkv_heads", "qkv", "mlp_up", "mlp_down"]
        assert all(r["max_abs_diff"] < 1e-4 and r["xla_gflops"] > 0 and r["ratio"] > 0 for r in result["rows"])
    if name == "scan":
        assert result["layers"] == 2 and result["max_abs_embedding_diff"] < 1e-5
    if name == "long_context":  # 4x the tokens: chunked temporaries ~4x, dense ones ~16x
        growth = {r["impl"]: r["temp_ratio"] for r in result["rows"] if r["length"] == 4096}
        assert growth["chunked"] == result["chunked_growth"] < 6 and growth["explicit"] > 10, growth
    if name == "lora":  # the adapters (4 kernels x 2 layers x (16 x 2 + 2 x 16)) are all LoRA trains
        assert result["lora_trainable_params"] == 4 * 2 * 64 and result["full_trainable_params"] > 500_000
        assert result["lora_optimizer_state_mib"] < result["full_optimizer_state_mib"] / 100


def test_record_appends_rows_whose_figures_are_in_their_records(capsys, tmp_path, monkeypatch):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "BENCHMARKS.md").write_text(f"# Benchmarks\n\n{report.HISTORY_HEADING}\n\nold text\n")
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        code, result = _bench(capsys, "search", "--paths", "hamming", "--record")
        assert code == 0
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert text.index("## Search") < text.index(report.HISTORY_HEADING), "new sections go above the history"
    records = [json.loads(line) for line in (tmp_path / "benchmarks" / "search.jsonl").read_text().splitlines()]
    # 2 runs x (row-major, word-major corpus) x (two-pass, running selection) x (IndexBinaryFlat, knn_hamming)
    assert len(records) == 16 and records[15]["ratio_numpy_vs_faiss"] > 0
    assert [r["path"] for r in records[:8:2]] == ["hamming", "hamming-running", "hamming-words",
                                                  "hamming-words-running"]
    assert "[json](benchmarks/search.jsonl#/15)" in text
    subprocess.run(["git", "-C", str(tmp_path), "add", "-A"], check=True)
    figure_artifacts.tracked_files.cache_clear()
    assert figure_artifacts.check_markdown(tmp_path / "BENCHMARKS.md", tmp_path) == []
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| date |"))
    column = [c.strip() for c in lines[header].strip("|").split("|")].index("embedjax_qps")
    cells = lines[header + 2].strip("|").split("|")
    cells[column] = " 123456 "  # a figure edited without its record
    lines[header + 2] = "|" + "|".join(cells) + "|"
    (tmp_path / "BENCHMARKS.md").write_text("\n".join(lines) + "\n")
    assert len(figure_artifacts.check_markdown(tmp_path / "BENCHMARKS.md", tmp_path)) == 1


def test_a_failing_bench_exits_non_zero_with_its_json(capsys, monkeypatch):
    code, result = _bench(capsys, "search", "--k", "5000")  # k larger than the corpus
    assert code == 2 and "larger than --n" in result["error"]
    from embedjax.bench import search

    def finished_with_errors(args):
        raise report.BenchFailed("2 cells failed", {"bench": "search", "rows": []})

    monkeypatch.setattr(search, "run", finished_with_errors)
    code, result = _bench(capsys, "search")
    assert code == 1 and result["error"] == "2 cells failed" and result["bench"] == "search"


def test_a_bench_subprocess_exits_non_zero_on_bad_input(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "embedjax", "bench", "search", "--n", "10", "--k", "50"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode != 0 and "error" in json.loads(proc.stdout.strip().splitlines()[-1])


def test_wait_for_idle_waits_then_measures_or_times_out():
    loads = iter([3.0, 2.0, 0.2])
    now = [0.0]

    def sleep(s):
        now[0] += s

    assert report.wait_for_idle(0.5, 100, poll_s=10, load=lambda: next(loads), sleep=sleep,
                                clock=lambda: now[0]) == 0.2
    assert now[0] == 20
    with pytest.raises(TimeoutError, match="stayed at or above 0.5 for 30 s"):
        report.wait_for_idle(0.5, 30, poll_s=10, load=lambda: 4.0, sleep=sleep, clock=lambda: now[0])


def test_rows_say_whether_they_were_measured_under_load(monkeypatch):
    import argparse

    args = argparse.Namespace(wait_idle=None, wait_timeout=1.0, record=False)
    monkeypatch.setattr(report.provenance, "load_average_1min", lambda: 7.5)
    assert report.start(args)["measured"] == "under load"
    monkeypatch.setattr(report.provenance, "load_average_1min", lambda: 0.1)
    assert report.start(args)["measured"] == "idle"


def test_the_cpu_description_tells_hosts_behind_one_model_name_apart():
    """Two AMD EPYC hosts measured days apart differed 2x in speed and in the ISA their hypervisor
    exposed; the row must say which one it was (the first processor's fields, the widest ISA)."""
    def cpuinfo(family, model, flags):
        one = f"processor\t: 0\nvendor_id\t: x\ncpu family\t: {family}\nmodel\t\t: {model}\nmodel name\t: AMD EPYC\nflags\t\t: {flags}\n"
        return one + one.replace("processor\t: 0", "processor\t: 1").replace("avx512f", "")
    assert report.cpu_description(cpuinfo(25, 17, "fma avx2 avx512f avx512bw"), 2) == \
        "AMD EPYC (family 25 model 17, AVX-512), 2 cores"
    assert report.cpu_description(cpuinfo(25, 1, "fma avx2"), 2) == "AMD EPYC (family 25 model 1, AVX2), 2 cores"
    assert report.cpu_description("processor\t: 0\nmodel name\t: Some ARM\n", 4) == "Some ARM, 4 cores"


def test_attention_bench_refuses_dropout_it_cannot_apply():
    """--dropout needs --train and implementations that drop (xla and blocked have no dropout)."""
    from embedjax.bench import attention

    parser = argparse.ArgumentParser()
    attention.add_arguments(parser)
    with pytest.raises(ValueError, match="no attention dropout of their own"):
        attention._parse(parser.parse_args(["--train", "--dropout", "0.1", "--impls", "chunked,xla"]))
    with pytest.raises(ValueError, match="--train only"):
        attention._parse(parser.parse_args(["--dropout", "0.1", "--impls", "chunked"]))
    assert attention._parse(parser.parse_args(["--train", "--dropout", "0.1", "--impls", "flash"]))[1] == ["flash"]

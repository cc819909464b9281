"""The command line: last stdout line is JSON; errors are clear; bench flags do not leak."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from embedjax import cli


def test_encode_writes_npy_and_prints_json(tmp_path, minilm_dir, capsys):
    src = tmp_path / "texts.txt"
    src.write_text("A man is playing a flute.\n\nsecond line\n")
    out = tmp_path / "emb.npy"
    assert cli.main(["encode", "--model", str(minilm_dir), "--input", str(src), "--output", str(out)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    emb = np.load(out)
    assert result == {"command": "encode", "output": str(out), "rows": 3, "dim": 384}
    assert emb.shape == (3, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # A second run refuses to overwrite what the first wrote.
    assert cli.main(["encode", "--model", str(minilm_dir), "--input", str(src), "--output", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    np.testing.assert_array_equal(np.load(out), emb)


def test_eval_sts_prints_scores(tmp_path, data_dir, minilm_dir, capsys):
    lines = (data_dir / "stsb" / "sts-test.csv").read_text(encoding="utf-8").splitlines()[:40]
    small = tmp_path / "sts.csv"
    small.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert cli.main(["eval", "--model", str(minilm_dir), "--sts", str(small)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 50.0 < result["sts"]["spearman_cosine"] <= 100.0


def test_eval_without_data_is_a_clear_error(minilm_dir, capsys):
    assert cli.main(["eval", "--model", str(minilm_dir)]) == 2
    assert "needs --sts FILE and/or --beir DIR" in capsys.readouterr().err


def test_unknown_arguments_are_rejected():
    with pytest.raises(SystemExit):
        cli.main(["eval", "--model", "x", "--stss", "y"])


def test_non_bench_commands_do_not_import_bench_modules():
    code = ("import sys; from embedjax import cli; cli.build_parser(['eval']); "
            "print(sorted(m for m in sys.modules if m.startswith('embedjax.bench.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_bench_command_imports_only_its_own_module():
    # bench.kernels imports JAX; were it imported before bench.loss, loss could no longer set
    # its 8 fake CPU devices (JAX reads XLA_FLAGS once).
    code = ("import sys; from embedjax import cli; cli.build_parser(['bench', 'loss']); "
            "print(sorted(m for m in sys.modules if m.startswith('embedjax.bench.') and m != 'embedjax.bench.report'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
    assert out.stdout.strip() == "['embedjax.bench.loss', 'embedjax.bench.timing']"

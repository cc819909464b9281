"""The accelerator benchmarks (`bench kernels`, `bench train_step`) on tiny CPU sizes.

Their numbers only mean something on a GPU (launch/device_benchmarks.sh); here we
check that they run end to end through the CLI, that the Pallas-vs-XLA check they
report really compares results, and the FLOP count they divide by.
"""
import argparse
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from embedjax.bench import kernels, timing, train_step


def _bench(*argv):
    proc = subprocess.run([sys.executable, "-m", "embedjax", "bench", *argv],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # a subprocess compiling four searches (~16 s); the kernel tests cover the numerics
def test_kernels_bench_runs_pallas_against_the_xla_twin_and_finds_them_equal():
    # 1,000 rows (not a multiple of block_n) and 7 queries (not a multiple of block_q).
    out = _bench("kernels", "--n", "1000", "--bits", "96", "--dim", "20", "--queries", "7", "--k", "5",
                 "--blocks", "8x128", "--repeats", "1", "--bandwidth-mib", "4", "--matmul-size", "64",
                 "--popcount-mib", "1")
    assert out["all_match_xla"] is True
    impls = {(r["kernel"], r["impl"]) for r in out["rows"]}
    assert impls == {(kind, impl) for kind in ("hamming", "int8")
                     for impl in ("xla", "pallas 8x128", "pallas 8x128 two_pass")}
    for row in out["rows"]:
        assert row["error"] == "" and row["rows_differing_from_xla"] == 0 and row["ms"] > 0
    assert out["bandwidth_GBps"] > 0 and out["bf16_matmul_TFLOPs"] > 0


def test_mismatch_count_sees_a_single_changed_id():
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    ids = np.arange(12, dtype=np.int32).reshape(3, 4)
    other = ids.copy()
    other[1, 3] += 100
    assert kernels._mismatches((values, ids), (values, ids)) == 0
    assert kernels._mismatches((values, other), (values, ids)) == 1


def test_block_settings_are_validated():
    assert kernels.parse_blocks("16x128,64x64") == [(16, 128), (64, 64)]
    for bad in ("16", "12x128", "16x0", "axb"):
        with pytest.raises(ValueError, match="--blocks"):
            kernels.parse_blocks(bad)


def test_train_flops_by_hand():
    # batch 2 pairs -> 4 sequences of 8 tokens, 1 layer, hidden 4, intermediate 8:
    # projections 8*16 + MLP 4*4*8 = 256 per token -> 4*8*256 = 8192; attention 4 * 4*64*4 = 4096.
    assert train_step.train_flops(2, 8, 1, 4, 8) == 3 * (8192 + 4096)
    # GQA with a key/value width of 2 and a gated MLP (3 matrices): per token 4*16 + 4*4*2 + 2*3*4*8 = 288.
    assert train_step.train_flops(2, 8, 1, 4, 8, kv_width=2, mlp_matrices=3) == 3 * (32 * 288 + 4096)


def test_train_step_arch_builds_its_shape_through_the_registry():
    """--arch llama builds the decoder (SmolLM2's shape unless flags say otherwise): GQA key/value
    projections, a gated MLP, no LayerNorm biases; shape flags override the preset."""
    import jax

    parser = argparse.ArgumentParser()
    train_step.add_arguments(parser)
    args = train_step.resolve_shape(parser.parse_args(["--arch", "llama"]))
    assert (args.layers, args.hidden, args.heads, args.kv_heads, args.vocab) == (30, 576, 9, 3, 49152)
    args = train_step.resolve_shape(parser.parse_args(["--heads", "2"]))  # bert with its heads changed
    assert (args.heads, args.kv_heads, args.layers) == (2, 2, 6)
    args = parser.parse_args(["--arch", "llama", "--layers", "2", "--hidden", "16", "--heads", "4", "--kv-heads", "2",
                              "--intermediate", "24", "--vocab", "1200", "--batch", "2", "--seq", "8",
                              "--dtype", "float32"])
    ids, mask = train_step.random_batch(2, 8, 1200)
    import flax.linen as nn

    step, params, opt_state = train_step.embedjax_step(args, ids, mask)
    layer = nn.unbox(params)["layers"]
    assert layer["attention"]["k"]["kernel"].shape == (2, 16, 2, 4)  # [layers, hidden, kv heads, head dim]
    assert layer["attention"]["q"]["kernel"].shape == (2, 16, 4, 4)
    assert {"gate", "up", "down"} <= set(layer["mlp"])
    loss = float(step(params, opt_state, jax.random.key(0))[2])
    assert 0 < loss < 2 / train_step.TEMPERATURE + np.log(2)
    with pytest.raises(ValueError, match="--kv-heads"):
        train_step.run(parser.parse_args(["--arch", "bert", "--kv-heads", "3"]))


def test_random_batch_is_right_padded_and_starts_with_cls():
    ids, mask = train_step.random_batch(5, 16, 3000, seed=1)
    assert ids.shape == mask.shape == (10, 16)
    assert (ids[:, 0] == 101).all() and (mask[:, 0] == 1).all()
    assert (np.diff(mask, axis=1) <= 0).all(), "padding must be on the right"
    assert ((ids == 0) == (mask == 0)).all()
    assert mask.sum(1).min() >= 4


@pytest.mark.slow  # a subprocess importing JAX and torch per architecture: ~50 s on 2 cores
@pytest.mark.parametrize("arch, kv_heads", [("bert", "2"), ("llama", "1")])
def test_train_step_bench_trains_both_sides(arch, kv_heads):
    out = _bench("train_step", "--arch", arch, "--layers", "1", "--hidden", "16", "--heads", "2", "--kv-heads",
                 kv_heads, "--intermediate", "32", "--vocab", "1200", "--batch", "4", "--seq", "8", "--steps", "2",
                 "--matmul-size", "64")
    assert out["torch_device"] == "cpu" and out["arch"] == arch and out["kv_heads"] == int(kv_heads)
    # With unit-norm embeddings every logit lies in [-1/T, 1/T], so in-batch InfoNCE over 4 pairs
    # is bounded by 2/T + ln 4 (a missing normalisation or temperature would break the bound).
    bound = 2 / train_step.TEMPERATURE + np.log(4)
    for side in ("embedjax", "torch"):
        assert 0 < out[f"{side}_final_loss"] < bound
        assert out[f"{side}_ms"] > 0
    assert out["speedup_vs_torch"] == pytest.approx(out["torch_ms"] / out["embedjax_ms"], rel=1e-2)


def _tiny_step_losses(flag: str, values) -> dict:
    """value -> the loss of one embedjax training step of the tiny model, ``flag`` set to ``value``
    (the same step index, so the same dropout key seed, for every value)."""
    parser = argparse.ArgumentParser()
    train_step.add_arguments(parser)
    ids, mask = train_step.random_batch(4, 8, 1200)
    losses = {}
    for value in values:
        args = parser.parse_args(["--layers", "1", "--hidden", "16", "--heads", "2", "--intermediate", "32",
                                  "--vocab", "1200", "--batch", "4", "--seq", "8", "--steps", "1", "--dtype",
                                  "float32", flag, value])
        losses[value] = train_step._embedjax_step_seconds(args, ids, mask)[1]
    assert all(0 < x < 2 / train_step.TEMPERATURE + np.log(4) for x in losses.values())
    return losses


def test_train_step_attention_impl_reaches_the_model():
    """--attention-impl picks the attention kernel: under dropout, the chunked kernel draws its masks
    per key block and the flash kernel (interpret mode here) hashes its own inside its tiles, so the
    same step's loss differs."""
    losses = _tiny_step_losses("--attention-impl", ("chunked", "flash"))
    assert losses["chunked"] != losses["flash"], losses


def test_train_step_dropout_rng_reaches_the_masks():
    """--dropout-rng picks the dropout key's PRNG: the same step index draws other masks under rbg, so
    the loss differs."""
    losses = _tiny_step_losses("--dropout-rng", ("threefry2x32", "rbg"))
    assert losses["rbg"] != losses["threefry2x32"]
    parser = argparse.ArgumentParser()
    train_step.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--dropout-rng", "philox"])


def test_train_step_scan_unroll_removes_the_layer_loop_and_keeps_the_loss():
    """--scan-unroll reaches the model: at --layers the compiled step has no loop over the layers (the
    unrolled BERT of 2026-11-28), at 1 it loops twice (forward and backward, two trips each; the
    other loops are threefry's five rounds); the arithmetic is the same, so the first step's loss agrees."""
    import jax

    parser = argparse.ArgumentParser()
    train_step.add_arguments(parser)
    ids, mask = train_step.random_batch(4, 8, 1200)
    texts, losses = {}, {}
    for unroll in ("1", "2"):
        args = parser.parse_args(["--layers", "2", "--hidden", "16", "--heads", "2", "--intermediate", "32",
                                  "--vocab", "1200", "--batch", "4", "--seq", "8", "--dtype", "float32",
                                  "--scan-unroll", unroll])
        step, params, opt_state = train_step.embedjax_step(args, ids, mask)
        key = jax.random.key(1)
        hlo = step.lower(params, opt_state, key).compile().as_text()
        texts[unroll] = re.findall(r'known_trip_count":\{"n":"(\d+)"', hlo)
        losses[unroll] = float(step(params, opt_state, key)[2])
    assert texts["1"].count("2") == 2 and "2" not in texts["2"]
    assert losses["2"] == pytest.approx(losses["1"], rel=1e-5)
    with pytest.raises(ValueError, match="--scan-unroll"):
        train_step.run(parser.parse_args(["--layers", "2", "--scan-unroll", "3"]))


def test_significant_digits_keep_tiny_rates_visible():
    assert timing.sig(0.000123456) == 0.0001235
    assert timing.sig(3588.04) == 3588.0


def test_every_bench_line_of_the_device_script_parses_with_its_bench():
    """A lent GPU's minutes are few: each `bench NAME LIMIT MODULE ARGS...` line of
    launch/device_benchmarks.sh must name a bench module whose parser takes its arguments."""
    import importlib
    import pathlib
    import shlex

    script = pathlib.Path(__file__).resolve().parents[2] / "launch" / "device_benchmarks.sh"
    bench_line = r'\s*(\w+="[^"]*"\s+)*bench \w+ \d+ \w+'  # environment settings may precede a bench
    lines = [line for line in script.read_text().splitlines() if re.match(bench_line, line)]
    assert len(lines) >= 15, lines
    names = []
    for line in lines:
        words = shlex.split(line.strip())
        words = words[words.index("bench"):]
        _, name, limit, module, *args = words
        names.append(name)
        bench = importlib.import_module(f"embedjax.bench.{module}")
        parser = argparse.ArgumentParser(exit_on_error=False)
        bench.add_arguments(parser)
        args = [a.replace("$MODEL_DIR", "m").replace("$STS_FILE", "s") for a in args]  # shlex took the quotes
        parsed = parser.parse_args([*args, "--record"])  # argparse exits (SystemExit) on a bad flag
        assert parsed.record and int(limit) > 0, line
    assert len(set(names)) == len(names), "two benches would write the same OUT files"

"""``python -m embedjax bench attention``: the attention kernels against PyTorch's SDPA, same inputs.

One row per padded length: bidirectional attention over ``--batch`` rows of ``--heads`` heads of
``--head-dim`` (default MiniLM's 12 x 32), keys padded at random to between half and all of the
length. Each of embedjax's implementations (`embedjax.models.attention`: ``xla`` is
`jax.nn.dot_product_attention` (what ``auto`` picks up to 512 tokens on CPU), ``blocked`` the
batch-blocked dense kernel, ``explicit`` the dense reference, ``chunked`` the online-softmax kernel) is jitted and timed
(median of ``--repeats`` after a warm-up), alternating with
``torch.nn.functional.scaled_dot_product_attention`` on the same numbers in PyTorch's [B, H, L, D]
layout (the transposes are made before timing). ``ratio_<impl>`` is SDPA's time over the
implementation's (above 1: embedjax faster). Every output is checked against SDPA's on the real
tokens. The programs are compiled as `Encoder`'s are (`embedjax.xla_cpu.inference_jit`; the row's
``cpu_gemm``): on x86-64 CPUs oneDNN takes the products and ``blocked`` runs its oneDNN blocks.
``flash`` is the Pallas kernel (`embedjax.kernels.flash_attention`; interpret mode on CPU, slow).

``--train`` times what a training step asks of attention instead: the loss ``sum(out * c)`` for a
fixed random ``c`` and its gradients in q, k and v (`embedjax.models.layers.attend`, jitted),
against SDPA's forward and backward on the same device (CUDA when torch sees one), in
``--dtype``, with ``--dropout`` applied by both sides with their own masks (embedjax's
``xla`` and ``blocked`` have none, so they are refused there). Without dropout the gradients are
checked against SDPA's. Each implementation's rate counts FlashAttention's convention of 3.5x the
forward's 4 B H L^2 D FLOPs (the backward as 2.5 forwards; padded length, dropout and masks
ignored), reported as TFLOP/s and as a fraction of a bf16 matmul's rate measured in the same run.
"""
from __future__ import annotations

import argparse

from embedjax.bench import report

SECTION = "Attention kernels vs PyTorch SDPA (issue 17)"
TRAIN_SECTION = "Attention in training (loss and gradients) vs PyTorch SDPA (issue 17)"
IMPLS = ("xla", "blocked", "explicit", "chunked", "flash")
OWN_DROPOUT = ("explicit", "chunked", "flash")  # the implementations that drop in --train mode


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lengths", default="32,128,256", help="comma-separated padded lengths, one row each")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated, from {IMPLS}")
    parser.add_argument("--chunk-size", type=int, default=128, help="key block of the chunked kernel")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per implementation (median)")
    parser.add_argument("--train", action="store_true",
                        help="time the loss and its gradients in q, k and v instead of the forward pass")
    parser.add_argument("--dropout", type=float, default=0.0, help="attention dropout (--train only)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="--train only")
    parser.add_argument("--matmul-size", type=int, default=4096,
                        help="--train only: size of the bf16 matmul ceiling measured in the same run")
    report.add_cpu_gemm_argument(parser)
    report.add_arguments(parser)


def _parse(args) -> tuple[list[int], list[str]]:
    lengths = [int(x) for x in str(args.lengths).split(",") if x]
    impls = [x for x in str(args.impls).split(",") if x]
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown or not impls:
        raise ValueError(f"--impls {args.impls!r}: choose from {IMPLS}")
    if not lengths or min(lengths) < 1 or min(args.batch, args.heads, args.head_dim) < 1:
        raise ValueError("--lengths, --batch, --heads and --head-dim must be positive")
    if not args.train and (args.dropout or args.dtype != "float32"):
        raise ValueError("--dropout and --dtype apply to --train only")
    if not 0.0 <= args.dropout < 1.0:
        raise ValueError(f"--dropout {args.dropout}: must be in [0, 1)")
    no_dropout = sorted(set(impls) - set(OWN_DROPOUT))
    if args.dropout and no_dropout:
        raise ValueError(f"--impls {no_dropout} have no attention dropout of their own; with --dropout choose from "
                         f"{OWN_DROPOUT}")
    return lengths, impls


def _inputs(batch: int, length: int, heads: int, head_dim: int):
    import numpy as np

    rng = np.random.default_rng(length)
    q, k, v = (rng.standard_normal((batch, length, heads, head_dim)).astype(np.float32) for _ in range(3))
    keep = rng.integers(max(1, length // 2), length + 1, batch)
    mask = np.arange(length)[None, :] < keep[:, None]
    return q, k, v, mask


def _jax_fn(impl: str, chunk_size: int):
    import jax
    import jax.numpy as jnp

    from embedjax import xla_cpu
    from embedjax.models import attention as kernels

    masking = kernels.Masking()

    def fn(q, k, v, mask):
        positions = jnp.zeros(mask.shape, jnp.int32)
        if impl == "xla":
            return kernels.xla_attention(q, k, v, mask, masking)
        if impl == "blocked":
            return kernels.blocked_attention((q,), (k,), v, mask, positions, masking)
        if impl == "chunked":
            return kernels.chunked_attention((q,), (k,), v, mask, positions, masking, chunk_size=chunk_size)
        if impl == "flash":
            return kernels.flash_attention((q,), (k,), v, mask, positions, masking)
        return kernels.explicit_attention((q,), (k,), v, mask, positions, masking)

    return xla_cpu.inference_jit(fn, jax.devices()[0].platform)


def _alternating_ms(torch_call, programs: dict, device_args, repeats: int) -> dict[str, float]:
    """Median ms of SDPA ("torch") and of each program, two alternating rounds of ``repeats`` calls
    each, so that background load falls on all of them."""
    import numpy as np

    from embedjax.bench.timing import median_seconds

    times = {name: [] for name in ("torch", *programs)}
    for _ in range(2):
        times["torch"].append(median_seconds(torch_call, repeats))
        for impl, program in programs.items():
            times[impl].append(median_seconds(lambda p=program: p(*device_args), repeats))
    return {name: 1e3 * float(np.median(values)) for name, values in times.items()}


def _jax_train_fn(impl: str, chunk_size: int, rate: float):
    """jitted (q, k, v, mask, c, key) -> (sum(attention * c), (dq, dk, dv)) through `layers.attend`."""
    import jax
    import jax.numpy as jnp

    from embedjax.models import layers

    def loss(q, k, v, mask, c, key):
        out = layers.attend(q, k, v, mask, causal=False, dropout_rate=rate, dropout_rng=key if rate else None,
                            impl=impl, chunk_size=chunk_size)
        return jnp.sum(out.astype(jnp.float32) * c)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def _torch_train_fn(q, k, v, mask, c, rate: float, dtype: str):
    """(fn, device): fn runs SDPA's forward and backward for sum(out * c) and returns (dq, dk, dv) as
    [B, L, H, D] tensors, synchronised."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    tq, tk, tv = (torch.from_numpy(x).transpose(1, 2).contiguous().to(device, tdtype).requires_grad_()
                  for x in (q, k, v))
    tmask = torch.from_numpy(mask)[:, None, None, :].to(device)
    tc = torch.from_numpy(c).transpose(1, 2).contiguous().to(device)

    def fn():
        for t in (tq, tk, tv):
            t.grad = None
        out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=tmask, dropout_p=rate)
        (out.float() * tc).sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return tuple(t.grad.transpose(1, 2) for t in (tq, tk, tv))

    return fn, device


def _train_row(args, impls, q, k, v, mask) -> dict:
    """One --train row: median ms of each implementation's loss and gradients and of SDPA's."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from embedjax.bench.timing import matmul_tflops, sig

    c = np.random.default_rng(1).standard_normal(q.shape).astype(np.float32)
    torch_call, torch_device = _torch_train_fn(q, k, v, mask, c, args.dropout, args.dtype)
    qkv = tuple(jax.device_put(x).astype(args.dtype) for x in (q, k, v))
    device_args = (*qkv, jax.device_put(mask), jax.device_put(c), jax.random.key(0))
    programs = {impl: _jax_train_fn(impl, args.chunk_size, args.dropout) for impl in impls}
    times = _alternating_ms(torch_call, programs, device_args, args.repeats)
    torch_ms = times["torch"]
    flops = 3.5 * 4 * q.shape[0] * q.shape[2] * q.shape[1] ** 2 * q.shape[3]
    ceiling = matmul_tflops(args.matmul_size)

    def fraction_of_matmul(ms):
        return sig(flops / (ms * 1e-3) / 1e12 / ceiling, 3)

    row = {"mode": "train", "dtype": args.dtype, "dropout": args.dropout, "torch_device": torch_device,
           "bf16_matmul_TFLOPs": sig(ceiling), "torch_sdpa_ms": sig(torch_ms),
           "torch_fraction_of_matmul": fraction_of_matmul(torch_ms)}
    for impl in IMPLS:  # every implementation's columns, empty when not run: one table for all runs
        row[f"{impl}_ms"] = row[f"ratio_{impl}"] = row[f"{impl}_fraction_of_matmul"] = None
    reference = [g.float().cpu().numpy() for g in torch_call()]
    worst = 0.0
    for impl, program in programs.items():
        ms = times[impl]
        row[f"{impl}_ms"] = sig(ms)
        row[f"ratio_{impl}"] = sig(torch_ms / ms, 3)
        row[f"{impl}_fraction_of_matmul"] = fraction_of_matmul(ms)
        grads = program(*device_args)[1]
        worst = max(worst, max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - r))) for g, r in zip(grads, reference)))
    # with dropout the two sides drop different entries: their gradients are not comparable
    row["max_abs_grad_diff_vs_torch"] = None if args.dropout else sig(worst, 3)
    return row


def _torch_fn(q, k, v, mask):
    import torch

    tq, tk, tv = (torch.from_numpy(x).transpose(1, 2).contiguous() for x in (q, k, v))
    tmask = torch.from_numpy(mask)[:, None, None, :]

    def fn():
        with torch.inference_mode():
            return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=tmask)

    return fn


def run(args: argparse.Namespace) -> dict:
    import jax
    import numpy as np

    from embedjax.bench.timing import sig
    from embedjax.models.attention import batch_block

    lengths, impls = _parse(args)
    cpu_gemm = report.apply_cpu_gemm(args)
    started = report.start(args)
    rows = []
    for length in lengths:
        q, k, v, mask = _inputs(args.batch, length, args.heads, args.head_dim)
        if args.train:
            row = {"shape": f"{args.batch}x{length}x{args.heads}x{args.head_dim}",
                   **_train_row(args, impls, q, k, v, mask), "device": report.device_description()}
            rows.append(row)
            continue
        torch_call = _torch_fn(q, k, v, mask)
        reference = torch_call().transpose(1, 2).numpy()
        device_args = tuple(jax.device_put(x) for x in (q, k, v, mask))
        programs = {impl: _jax_fn(impl, args.chunk_size) for impl in impls}
        times = _alternating_ms(torch_call, programs, device_args, args.repeats)
        torch_ms = times["torch"]
        row = {"shape": f"{args.batch}x{length}x{args.heads}x{args.head_dim}", "torch_sdpa_ms": sig(torch_ms),
               "blocked_rows": batch_block(args.batch, args.heads, length, shards=jax.device_count()),
               "cpu_gemm": cpu_gemm}
        worst = 0.0
        for impl, program in programs.items():
            ms = times[impl]
            row[f"{impl}_ms"] = sig(ms)
            row[f"ratio_{impl}"] = sig(torch_ms / ms, 3)
            out = np.asarray(program(*device_args))
            worst = max(worst, float(np.abs(out - reference)[mask].max()))
        row["max_abs_diff_vs_torch"] = sig(worst, 3)
        row["device"] = report.device_description()
        rows.append(row)
    records = report.finish(args, "attention", TRAIN_SECTION if args.train else SECTION, rows, started)
    return {"bench": "attention", "rows": records}


if __name__ == "__main__":  # runnable without the CLI's optional imports
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    import json

    print(json.dumps(run(parser.parse_args())))

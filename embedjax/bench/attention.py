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
"""
from __future__ import annotations

import argparse

from embedjax.bench import report

SECTION = "Attention kernels vs PyTorch SDPA (issue 17)"
IMPLS = ("xla", "blocked", "explicit", "chunked")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lengths", default="32,128,256", help="comma-separated padded lengths, one row each")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated, from {IMPLS}")
    parser.add_argument("--chunk-size", type=int, default=128, help="key block of the chunked kernel")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per implementation (median)")
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
        return kernels.explicit_attention((q,), (k,), v, mask, positions, masking)

    return xla_cpu.inference_jit(fn, jax.devices()[0].platform)


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

    from embedjax.bench.timing import median_seconds, sig
    from embedjax.models.attention import batch_block

    lengths, impls = _parse(args)
    cpu_gemm = report.apply_cpu_gemm(args)
    started = report.start(args)
    rows = []
    for length in lengths:
        q, k, v, mask = _inputs(args.batch, length, args.heads, args.head_dim)
        torch_call = _torch_fn(q, k, v, mask)
        reference = torch_call().transpose(1, 2).numpy()
        device_args = tuple(jax.device_put(x) for x in (q, k, v, mask))
        programs = {impl: _jax_fn(impl, args.chunk_size) for impl in impls}
        times = {name: [] for name in ("torch", *impls)}
        for _ in range(2):  # alternate the contenders so background load falls on all of them
            times["torch"].append(median_seconds(torch_call, args.repeats))
            for impl, program in programs.items():
                times[impl].append(median_seconds(lambda p=program: p(*device_args), args.repeats))
        torch_ms = 1e3 * float(np.median(times["torch"]))
        row = {"shape": f"{args.batch}x{length}x{args.heads}x{args.head_dim}", "torch_sdpa_ms": sig(torch_ms),
               "blocked_rows": batch_block(args.batch, args.heads, length, shards=jax.device_count()),
               "cpu_gemm": cpu_gemm}
        worst = 0.0
        for impl, program in programs.items():
            ms = 1e3 * float(np.median(times[impl]))
            row[f"{impl}_ms"] = sig(ms)
            row[f"ratio_{impl}"] = sig(torch_ms / ms, 3)
            out = np.asarray(program(*device_args))
            worst = max(worst, float(np.abs(out - reference)[mask].max()))
        row["max_abs_diff_vs_torch"] = sig(worst, 3)
        row["device"] = report.device_description()
        rows.append(row)
    records = report.finish(args, "attention", SECTION, rows, started)
    return {"bench": "attention", "rows": records}


if __name__ == "__main__":  # runnable without the CLI's optional imports
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    import json

    print(json.dumps(run(parser.parse_args())))

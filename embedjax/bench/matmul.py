"""``python -m embedjax bench matmul``: XLA's dense products against PyTorch's at an encoder's shapes.

An encoder layer's time outside attention is four products per token: the q/k/v/o projections
(``hidden x hidden``, spelled by Flax's ``DenseGeneral`` as a contraction into ``[heads, head_dim]``)
and the MLP's up and down projections (``hidden x intermediate`` and back). Each is timed in float32
for ``--tokens`` rows (default 64 x 256, a batch of long documents) under ``jax.jit`` and under
PyTorch (``torch.matmul`` on the same numbers, same thread count), alternating the two; one row per
product with both rates in GFLOP/s and ``ratio`` = XLA's rate over PyTorch's. The ``qkv_heads`` row
is the ``DenseGeneral`` spelling ([T, d] x [d, H, K]); ``qkv`` the same product as a plain 2-D one.
On CPUs each product is also compiled with `embedjax.xla_cpu`'s oneDNN options (``onednn_gflops``,
``onednn_ratio``: what `Encoder` and the training step run on x86-64 CPUs; XLA's default library is the ``xla`` column).
"""
from __future__ import annotations

import argparse

from embedjax.bench import report

SECTION = "Dense products: XLA vs PyTorch on CPU (issue 17)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=64 * 256, help="rows of every product (batch x length)")
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per product (median)")
    report.add_arguments(parser)


def _products(args) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], str]]:
    """name -> (lhs shape, rhs shape, einsum)."""
    t, d, f = args.tokens, args.hidden, args.intermediate
    if args.hidden % args.heads:
        raise ValueError(f"--hidden {args.hidden} is not a multiple of --heads {args.heads}")
    if min(t, d, f, args.heads) < 1:
        raise ValueError("--tokens, --hidden, --heads and --intermediate must be positive")
    return {"qkv_heads": ((t, d), (d, args.heads, d // args.heads), "td,dhk->thk"),
            "qkv": ((t, d), (d, d), "td,de->te"), "mlp_up": ((t, d), (d, f), "td,df->tf"),
            "mlp_down": ((t, f), (f, d), "tf,fd->td")}


def run(args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from embedjax import xla_cpu
    from embedjax.bench.timing import median_seconds, sig

    products = _products(args)
    started = report.start(args)
    rng = np.random.default_rng(0)
    rows = []
    for name, (lhs_shape, rhs_shape, spec) in products.items():
        lhs = rng.standard_normal(lhs_shape).astype(np.float32)
        rhs = rng.standard_normal(rhs_shape).astype(np.float32)
        programs = {"xla": jax.jit(lambda a, b, spec=spec: jnp.einsum(spec, a, b))}
        if jax.default_backend() == "cpu":
            programs["onednn"] = jax.jit(lambda a, b, spec=spec: jnp.einsum(spec, a, b),
                                         compiler_options=xla_cpu.compiler_options("cpu", "onednn"))
        a, b = jax.device_put(lhs), jax.device_put(rhs)
        ta, tb = torch.from_numpy(lhs), torch.from_numpy(rhs.reshape(rhs_shape[0], -1))

        def torch_call():
            with torch.inference_mode():
                return ta @ tb

        times = {name: [] for name in (*programs, "torch")}
        for _ in range(2):  # alternate so background load falls on all
            for library, program in programs.items():
                times[library].append(median_seconds(lambda p=program: p(a, b), args.repeats))
            times["torch"].append(median_seconds(torch_call, args.repeats))
        flops = 2 * lhs_shape[0] * lhs_shape[1] * int(np.prod(rhs_shape[1:]))
        rate = {library: flops / float(np.median(t)) / 1e9 for library, t in times.items()}
        diff = max(float(np.abs(np.asarray(p(a, b)).reshape(lhs_shape[0], -1) - torch_call().numpy()).max())
                   for p in programs.values())
        row = {"product": name, "shape": f"{'x'.join(map(str, lhs_shape))} @ {'x'.join(map(str, rhs_shape))}",
               "xla_gflops": sig(rate["xla"]), "torch_gflops": sig(rate["torch"]),
               "ratio": sig(rate["xla"] / rate["torch"], 3)}
        if "onednn" in rate:
            row.update(onednn_gflops=sig(rate["onednn"]), onednn_ratio=sig(rate["onednn"] / rate["torch"], 3))
        rows.append({**row, "max_abs_diff": sig(diff, 3), "torch_threads": torch.get_num_threads(),
                     "device": report.device_description()})
    return {"bench": "matmul", "rows": report.finish(args, "matmul", SECTION, rows, started)}


if __name__ == "__main__":  # runnable without the CLI's optional imports
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    import json

    print(json.dumps(run(parser.parse_args())))

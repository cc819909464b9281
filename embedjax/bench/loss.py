"""``python -m embedjax bench loss``: the ring InfoNCE against the all-gather InfoNCE (and, with
``--row-block``, the InfoNCE in row stripes with its gradients formed in the scoring pass,
`embedjax.losses.stripes`).

On the devices JAX sees (8 fake CPU devices by default: the bench sets
``--xla_force_host_platform_device_count`` when JAX is not yet imported), it reports
for loss + gradient w.r.t. queries and documents:

* compiled temp memory per device (``compiled.memory_analysis()``) of both at
  ``--batch`` x ``--dim`` (default 65,536 x 768), and their ratio;
* the largest global batch whose compiled footprint per device (temp + arguments +
  outputs) fits ``--budget-gib`` (default 16) at ``--dim``: found by *compiling* at
  doubling sizes and then bisecting (nothing is executed at those sizes);
* step-time medians of both at ``--time-batch`` x ``--time-dim`` (executed);
* gradient error of both against a float64 NumPy gradient at a small size;
* FLOPs per step: the ring's tile count (one forward tile pass, a backward pass that
  recomputes each tile and pulls it back to both sides: 8 B^2 d) against 6 B^2 d, and
  XLA's own count for the all-gather version; each one's achieved rate over its count, and the
  ring's rate over the all-gather's (the time ratio is the FLOP ratio over this rate ratio).
"""
from __future__ import annotations

import os
import sys

if "jax" not in sys.modules and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from embedjax.bench import report  # noqa: E402
from embedjax.bench.timing import median_seconds  # noqa: E402
from embedjax.kernels import ring_tiles as tiles  # noqa: E402
from embedjax.losses import allgather, ring, stripes  # noqa: E402

SECTION = "Loss: ring vs all-gather InfoNCE"
GIB = 2 ** 30


def add_arguments(parser) -> None:
    parser.add_argument("--batch", type=int, default=65_536, help="global batch for the memory comparison")
    parser.add_argument("--dim", type=int, default=768, help="embedding dim")
    parser.add_argument("--tile", type=int, default=None, help="ring tile size (default: the ring's default)")
    parser.add_argument("--ring-impl", choices=ring.TILE_IMPLS, default="xla",
                        help="the ring's tiles: XLA fori_loop tiles or the fused Pallas kernels "
                             "(embedjax.kernels.ring_tiles; interpret mode on CPU: slow)")
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--budget-gib", type=float, default=16.0, help="per-device memory budget for the max-batch search")
    parser.add_argument("--max-search-batch", type=int, default=2 ** 24, help="stop the doubling search here")
    parser.add_argument("--time-batch", type=int, default=4096, help="global batch for step timing")
    parser.add_argument("--time-dim", type=int, default=128, help="embedding dim for step timing")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--row-block", type=int, default=None,
                        help="also run the InfoNCE in stripes of this many query rows with its gradients "
                             "formed in the scoring pass (losses.striped_infonce; keys 'stripes_*')")
    parser.add_argument("--skip-max-batch", action="store_true",
                        help="skip the largest-batch search (dozens of compiles: minutes on a GPU)")
    report.add_arguments(parser)


def _loss_fns(mesh, temperature, tile, impl="xla", row_block=None):
    fns = {
        "ring": lambda q, d: ring.ring_infonce(q, d, mesh=mesh, temperature=temperature, tile=tile, impl=impl),
        "allgather": lambda q, d: allgather.allgather_infonce(q, d, mesh=mesh, temperature=temperature),
    }
    if row_block is not None:
        fns["stripes"] = lambda q, d: stripes.striped_infonce(q, d, mesh=mesh, temperature=temperature,
                                                              row_block=row_block)
    return fns


def _compile(loss_fn, batch, dim):
    spec = jax.ShapeDtypeStruct((batch, dim), jnp.float32)
    return jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1))).lower(spec, spec).compile()


def _footprint(compiled):
    m = compiled.memory_analysis()
    return dict(temp=m.temp_size_in_bytes, total=m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes)


def largest_batch(loss_fn, dim, budget_bytes, step, limit):
    """Largest multiple of ``step`` (<= limit) whose compiled per-device footprint fits the
    budget: double from ``step`` until it does not fit, then bisect. Returns (batch, bytes, tried)."""
    tried = {}

    def fits(batch):
        if batch not in tried:
            tried[batch] = _footprint(_compile(loss_fn, batch, dim))["total"]
        return tried[batch] <= budget_bytes

    if not fits(step):
        return 0, tried[step], tried
    lo = step
    while lo * 2 <= limit and fits(lo * 2):
        lo *= 2
    hi = lo * 2
    if hi > limit:
        return lo, tried[lo], tried
    while hi - lo > step:   # invariant: lo fits, hi does not
        mid = (lo + hi) // 2 // step * step
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, tried[lo], tried


def _median_step_seconds(loss_fn, q, d, repeats):
    step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))
    return median_seconds(lambda: step(q, d), repeats)  # one untimed call compiles


def float64_infonce_grads(q, d, temperature):
    """Gradient of mean_i -log softmax_i(q_i . D^T / T)[i] in float64 (closed form)."""
    q, d = q.astype(np.float64), d.astype(np.float64)
    logits = q @ d.T / temperature
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    delta = (p - np.eye(len(q))) / (temperature * len(q))
    return delta @ d, delta.T @ q


def _grad_error(loss_fn, q, d, temperature):
    got = jax.jit(jax.grad(loss_fn, argnums=(0, 1)))(q, d)
    want = float64_infonce_grads(np.asarray(q), np.asarray(d), temperature)
    return max(float(np.max(np.abs(np.asarray(g, np.float64) - w)) / np.max(np.abs(w))) for g, w in zip(got, want))


def run(args) -> dict:
    started = report.start(args)
    devices = jax.devices()
    mesh = jax.make_mesh((len(devices),), ("data",))
    n = len(devices)
    fns = _loss_fns(mesh, args.temperature, args.tile, args.ring_impl, args.row_block)
    result = dict(device=f"{n} x {devices[0].device_kind}", platform=devices[0].platform,
                  batch=args.batch, dim=args.dim, ring_impl=args.ring_impl)

    # 1. Compiled memory at the headline size.
    temp = {name: _footprint(_compile(fn, args.batch, args.dim))["temp"] for name, fn in fns.items()}
    for name, nbytes in temp.items():
        result[f"{name}_temp_mib_per_device"] = round(nbytes / 2 ** 20, 1)
    # From bytes, not the rounded MiB (tiny smoke sizes round to 0); None when the ring needs no temp.
    result["temp_ratio_allgather_over_ring"] = round(temp["allgather"] / temp["ring"], 1) if temp["ring"] else None

    # 2. Largest global batch under the per-device budget (compiled, not executed).
    budget = int(args.budget_gib * GIB)
    result["budget_gib"] = args.budget_gib
    tile = args.tile or (ring.default_tile() if args.ring_impl == "xla" else tiles.DEFAULT_BLOCK)
    for name, fn in ({} if args.skip_max_batch else fns).items():
        step = n * tile
        batch, used, tried = largest_batch(fn, args.dim, budget, step, args.max_search_batch)
        result[f"{name}_max_batch_{args.budget_gib:g}gib"] = batch
        result[f"{name}_max_batch_footprint_gib"] = round(used / GIB, 2)
        result[f"{name}_max_batch_compiles"] = len(tried)
    result["max_batch_method"] = "skipped" if args.skip_max_batch else "compiled at doubling sizes then bisected (multiples of devices x tile); footprint = temp + args + outputs per device"

    # 3. Step time medians (executed).
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(args.time_batch, args.time_dim)), jnp.float32)
    d = jnp.asarray(rng.normal(size=(args.time_batch, args.time_dim)), jnp.float32)
    q, d = q / jnp.linalg.norm(q, axis=1, keepdims=True), d / jnp.linalg.norm(d, axis=1, keepdims=True)
    step_s = {name: _median_step_seconds(fn, q, d, args.repeats) for name, fn in fns.items()}
    for name, seconds in step_s.items():
        result[f"{name}_step_ms"] = round(1e3 * seconds, 1)
    result["time_batch"], result["time_dim"] = args.time_batch, args.time_dim

    # 4. Gradient error against float64 (small size).
    small_q, small_d = q[: 64 * n, :64], d[: 64 * n, :64]
    # 24 does not divide the 64 local rows; the Pallas blocks are powers of two (16: 4 x 4 blocks)
    small = _loss_fns(mesh, args.temperature, 24 if args.ring_impl == "xla" else 16, args.ring_impl,
                      None if args.row_block is None else 24)  # 24 rows leave a padded stripe of the 64
    for name, fn in small.items():
        result[f"{name}_grad_rel_err_vs_f64"] = float(f"{_grad_error(fn, small_q, small_d, args.temperature):.2e}")

    # 5. FLOPs per step at the timing size.
    b, dim = args.time_batch, args.time_dim
    reference = 6 * b * b * dim
    # XLA tiles: fwd tile matmul 2, bwd recompute 2 + two pullback matmuls 4 (x B^2 d); the fused
    # kernels recompute the scores in each of their two backward kernels: 2 + 2 x (2 + 2)
    ring_flops = (8 if args.ring_impl == "xla" else 10) * b * b * dim
    result["ring_flops_over_6B2d"] = round(ring_flops / reference, 3)
    cost = _compile(fns["allgather"], b, dim).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and "flops" in cost:
        result["allgather_xla_flops_over_6B2d"] = round(n * float(cost["flops"]) / reference, 3)
    # The dense loss keeps its B x B logits and needs 6 B^2 d. A tiled loss keeps no row of them
    # whole, so a key's gradient (which needs its rows' final log-sum-exp) recomputes its tile:
    # 8 B^2 d at least. Its time ratio is then the FLOP ratio over the rate ratio, and 1.3x the
    # dense time at 8 B^2 d asks for a rate >= 1.026x the dense loss's.
    # The stripes form the gradients in the forward pass: 6 B^2 d, as the dense loss.
    flops = {"ring": ring_flops, "allgather": reference, "stripes": reference}
    rates = {name: flops[name] / seconds for name, seconds in step_s.items()}
    for name, rate in rates.items():
        result[f"{name}_achieved_gflops"] = round(rate / 1e9, 2)
    result["ring_rate_over_allgather_rate"] = round(rates["ring"] / rates["allgather"], 3)
    result["ring_step_over_allgather_step"] = round(step_s["ring"] / step_s["allgather"], 3)
    if "stripes" in rates:
        result["row_block"] = args.row_block
        result["stripes_step_over_allgather_step"] = round(step_s["stripes"] / step_s["allgather"], 3)

    # The section's table predates ring_impl (a new key is not shown there): the shape cell names it.
    impl_note = ("" if args.ring_impl == "xla" else f", {args.ring_impl} tiles") + (
        "" if args.row_block is None else f", stripes of {args.row_block}")
    result["time_shape"] = f"{result['time_batch']}x{result['time_dim']}{impl_note}"
    shown = [k for k in result if k in ("device", "batch", "dim", "ring_impl", "ring_temp_mib_per_device",
                                          "allgather_temp_mib_per_device", "stripes_temp_mib_per_device",
                                          "temp_ratio_allgather_over_ring",
                                          "time_shape")
             or "max_batch_16" in k or k.endswith("_step_ms") or "grad_rel_err" in k or "over_6B2d" in k]
    return report.finish(args, "loss", SECTION, [result], started, shown=shown)[0]


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    print(json.dumps(run(parser.parse_args())))

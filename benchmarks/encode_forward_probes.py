"""Two probes of MiniLM's long-document embedding program on the CPU (issue 17), both dropped ideas.

    python benchmarks/encode_forward_probes.py [--out benchmarks/encode_forward_probes.json]

The program is `Encoder`'s (oneDNN dots on x86-64, `embedjax.xla_cpu`) on the first 64 scifact
abstracts padded to 256 tokens.

1. **One q/k/v product.** A trace puts the q and k projections at ~1.5x the v projection's kernel
   time, all three the same [16384, 384] x [384, 384] product: the three are independent, so XLA:CPU
   runs them side by side and each oneDNN call shares the two cores. The probe builds a second
   encoder whose attention projects q, k and v with one [384, 1152] product of the same weights
   (`FusedQKVAttention`, put into `layers.Attention` while that encoder traces) and times the two
   programs alternately, every round kept; the per-round ratio is paired, so the VM's drift between
   rounds cancels. Their embeddings are compared too.
2. **Page faults of the temporary buffer.** Each call's minor page faults and system time
   (`getrusage`) beside its wall time. XLA:CPU allocates the program's temporary buffer (~229 MB
   here) for every call; glibc serves it with a fresh ``mmap`` from the worker thread that
   allocates it, so every page faults in again. The probe runs in two child processes, one with
   ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (transparent huge pages for such mappings), one
   without; the environment variable is read at process start, so a library cannot set it.

A diagnostic, not a speed claim: run it idle.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np


def fused_qkv_attention_class():
    """`layers.Attention` with q, k and v projected by one product over their concatenated
    kernels; same parameters, same tree (plain BERT attention only: no RoPE, no q/k norm)."""
    import flax.linen as nn
    import jax.numpy as jnp

    from embedjax.models import layers

    class FusedQKVAttention(layers.Attention):
        @nn.compact
        def __call__(self, x_bld, key_mask_bl, rope, deterministic: bool):
            s = self.spec
            if rope is not None or s.qk_norm or (s.dropout > 0.0 and not deterministic):
                raise ValueError("the probe fuses plain BERT attention only")
            heads = (("q", s.num_heads), ("k", s.num_kv_heads), ("v", s.num_kv_heads))
            projections = [nn.DenseGeneral((h, s.head_dim), dtype=self.dtype, use_bias=s.qkv_bias, name=name)
                           for name, h in heads]
            if self.is_initializing():
                q, k, v = (p(x_bld) for p in projections)
            else:
                params = [self.variables["params"][name] for name, _ in heads]
                width = x_bld.shape[-1]
                kernel = jnp.concatenate([p["kernel"].reshape(width, -1) for p in params], axis=-1)
                y = jnp.einsum("bld,dn->bln", x_bld, kernel.astype(self.dtype))
                if s.qkv_bias:
                    y = y + jnp.concatenate([p["bias"].reshape(-1) for p in params]).astype(self.dtype)
                cuts = np.cumsum([h * s.head_dim for _, h in heads])[:-1]
                q, k, v = (part.reshape(*part.shape[:-1], h, s.head_dim)
                           for part, (_, h) in zip(jnp.split(y, cuts, axis=-1), heads))
            ctx = layers.attend(q, k, v, key_mask_bl, causal=s.mask == "causal", impl=s.impl, chunk_size=s.chunk_size)
            return nn.DenseGeneral(self.hidden_size, axis=(-2, -1), dtype=self.dtype, use_bias=s.out_bias,
                                   name="o")(ctx)

    return FusedQKVAttention


def qkv_rounds(texts, rounds: int) -> dict:
    import jax

    from embedjax.bench.timing import interleaved_seconds
    from embedjax.encoder import Encoder
    from embedjax.models import layers

    programs, outputs = {}, {}
    original = layers.Attention
    for name in ("separate q, k, v", "one q/k/v product"):
        layers.Attention = fused_qkv_attention_class() if name == "one q/k/v product" else original
        try:
            encoder = Encoder.from_pretrained("all-MiniLM-L6-v2", max_length=256)
            batch = jax.device_put(encoder.tokenizer.pad(encoder.tokenizer.token_ids(texts), rows=len(texts)))
            outputs[name] = np.asarray(encoder._jitted(encoder.params, batch))  # traces here, under the swap
        finally:
            layers.Attention = original
        programs[name] = (encoder, batch)
    calls = {name: (lambda e=e, b=b: jax.block_until_ready(e._jitted(e.params, b)))
             for name, (e, b) in programs.items()}
    seconds = interleaved_seconds(calls, rounds)
    ratio = np.asarray(seconds["separate q, k, v"]) / np.asarray(seconds["one q/k/v product"])
    return {"seconds": {k: [round(x, 4) for x in v] for k, v in seconds.items()},
            "median_s": {k: round(float(np.median(v)), 4) for k, v in seconds.items()},
            "separate_over_fused_per_round": [round(float(r), 4) for r in ratio],
            "separate_over_fused_median": round(float(np.median(ratio)), 4),
            "rounds_fused_faster": int((ratio > 1).sum()),
            "max_abs_embedding_difference": float(np.abs(outputs["separate q, k, v"]
                                                         - outputs["one q/k/v product"]).max())}


def fault_calls(texts, calls: int) -> dict:
    import jax

    from embedjax.encoder import Encoder

    encoder = Encoder.from_pretrained("all-MiniLM-L6-v2", max_length=256)
    batch = jax.device_put(encoder.tokenizer.pad(encoder.tokenizer.token_ids(texts), rows=len(texts)))
    run = lambda: jax.block_until_ready(encoder._jitted(encoder.params, batch))  # noqa: E731
    run()
    stats = encoder._jitted.lower(encoder.params, batch).compile().memory_analysis()
    rows = []
    for _ in range(calls):
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        run()
        wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
        rows.append({"wall_s": round(wall, 4), "minor_faults": after.ru_minflt - before.ru_minflt,
                     "system_s": round(after.ru_stime - before.ru_stime, 4)})
    return {"glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
            "temp_bytes": int(stats.temp_size_in_bytes) if stats is not None else None, "calls": rows,
            "median_wall_s": round(float(np.median([r["wall_s"] for r in rows])), 4),
            "median_minor_faults": int(np.median([r["minor_faults"] for r in rows])),
            "median_system_s": round(float(np.median([r["system_s"] for r in rows])), 4)}


def _fault_child(args, tunables: str | None) -> dict:
    """`fault_calls` in a fresh process with ``GLIBC_TUNABLES`` set to ``tunables`` (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables:
        env["GLIBC_TUNABLES"] = tunables
    proc = subprocess.run([sys.executable, __file__, "--faults-child", "--texts", str(args.texts), "--calls",
                           str(args.calls)], env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    from embedjax import provenance
    from embedjax.bench.encode import load_texts
    from embedjax.bench.report import device_description

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/encode_forward_probes.json")
    parser.add_argument("--texts", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=11, help="alternating rounds of the q/k/v comparison")
    parser.add_argument("--calls", type=int, default=7, help="calls of the page-fault probe")
    parser.add_argument("--only", choices=("qkv", "faults"), help="run one probe")
    parser.add_argument("--faults-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    texts = load_texts("scifact", None, args.texts)
    if args.faults_child:
        print(json.dumps(fault_calls(texts, args.calls)))
        return
    record = {"what": "MiniLM's long-document embedding program (oneDNN): one q/k/v product against three, "
                      "and the page faults of its temporary buffer",
              "batch": f"{args.texts}x256", "load_1min": provenance.load_average_1min()}
    if args.only != "faults":
        record["qkv"] = qkv_rounds(texts, args.rounds)
    if args.only != "qkv":
        record["faults"] = {name: _fault_child(args, tunables) for name, tunables in
                            (("default", None), ("hugetlb", "glibc.malloc.hugetlb=1"))}
    record.update(device=device_description(), commit=provenance.git_commit(), dirty=provenance.git_dirty(),
                  command="python benchmarks/encode_forward_probes.py")
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps({k: v for k, v in record.items() if k in ("qkv", "faults")})[:2000])


if __name__ == "__main__":
    main()

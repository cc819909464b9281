#!/usr/bin/env bash
# The accelerator benchmarks in one call, for a lent GPU (or any machine with one):
# ceilings, Pallas kernels compiled for the device vs their XLA twins, the ring loss,
# and a training step against PyTorch. Each bench records its rows (--record: BENCHMARKS.md rows
# linking their JSON records in benchmarks/NAME.jsonl, with commit, load, device and versions);
# a failed bench is reported and the others still run.
#
#   EMBEDJAX_COMMIT=$(git rev-parse --short HEAD) launch/device_benchmarks.sh [OUT_DIR]
#
# ONLY="loss loss_stripes ..." runs just the named benches; BUDGET=SECONDS bounds the whole run.
# The whole set takes over 15 minutes, more than one 10-minute call on a lent machine; it runs in
# order of need, so BUDGET cuts the least wanted. The Pallas kernels compile through Triton
# (`embedjax.kernels.dispatch.pallas_compiler_params`).
#
# With MODEL_DIR (a sentence-transformers folder) and STS_FILE (STS-B format) set, the
# encode comparison with sentence-transformers runs too. OUT_DIR (default: bench_out) receives each bench's JSON line, its log and a copy of
# BENCHMARKS.md and benchmarks/ (set EMBEDJAX_DIRTY=0/1 with EMBEDJAX_COMMIT where the tree travels without .git). Runs with the python3 on PATH and the repo on PYTHONPATH (no install:
# the modules used need only jax, flax, optax, numpy, torch and transformers).
set -uo pipefail
out="${1:-bench_out}"
mkdir -p "$out"
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # torch and JAX share the card in train_step
py="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
"$py" -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee -a "$out/gpu.txt"

budget="${BUDGET:-100000}"  # seconds for the whole run: a bench gets what is left of it, none under 30 s
bench() {  # bench TAG SECONDS NAME ARGS...: run one bench module under a time limit, keep its JSON line and log
  local name="$1" limit="$2" module="$3"; shift 3
  if [[ -n "${ONLY:-}" && " $ONLY " != *" $name "* ]]; then return; fi
  local left=$((budget - SECONDS))
  if ((left < 30)); then echo "== $name skipped (${left} s of BUDGET left)"; return; fi
  limit=$((limit < left ? limit : left))
  local start=$SECONDS
  if timeout "$limit" "$py" -m "embedjax.bench.$module" "$@" --record >"$out/$name.json" 2>"$out/$name.log"; then
    echo "== $name ok ($((SECONDS - start)) s)"
  else
    echo "== $name FAILED ($((SECONDS - start)) s); last lines of its log:"; tail -n 15 "$out/$name.log"
  fi
}

# Issue 17's checks first, most wanted first, so that a lease that ends early still returns them
# (order of 2026-12-04, sixth sitting): the training step against PyTorch and the same step with the
# Pallas flash attention; the Hamming scan over 10M codes stored where its kernel reads them; the
# striped InfoNCE against the dense loss; attention alone against SDPA (forward and backward); the
# step unrolled and with cuDNN's norms; the SmolLM2 shape (default and flash); int8 over 10M codes
# (in pieces under its 32-bit offsets); dropout masks from RngBitGenerator; the XLA ring at its 4096
# GPU tile; last the fused Pallas ring tiles (39x the dense loss on 2026-12-04).
bench train_step_b256 80 train_step --batch 256 --seq 128 --steps 20
# The Pallas flash attention with its dropout hashed inside the kernels (embedjax/kernels/flash_attention.py,
# 2026-12-04, sixth sitting): no [L, L] scores or mask in memory, as PyTorch's SDPA; never run on a GPU yet.
bench train_step_b256_flash 80 train_step --batch 256 --seq 128 --steps 20 --attention-impl flash
# Hamming over a word-major corpus stored at scan_rows (read in place: the row-major runs of 2026-12-04 copied the
# 1.28 GB corpus on every search), one query scanning with a block of 1 (it was padded to 16 rows of popcounts),
# and the popcount ceiling that bounds 64 queries (one popcount per query and corpus word). Two-pass only (the
# running scan lost at 10M on 2026-12-04); wider tiles and 64-query blocks too (all compile for sm_90 offline
# without spills, benchmarks/triton_resources.py).
bench kernels_hamming_10m 150 kernels --paths hamming --layout words --n 10000000 --queries 1,64 --k 10,100 --blocks 16x128,16x1024,64x128 --select two_pass --repeats 5
# The InfoNCE in stripes of 4096 query rows with its gradients formed in the scoring pass
# (embedjax.losses.striped_infonce): 6 B^2 d like the dense loss, where the ring's tiles need 8 B^2 d
# (so <= 1.3x the dense time asks the ring for 1.026x the dense loss's rate). 0.90x the dense step on
# the 2-core CPU (8 fake devices, 4096 x 128) on 2026-12-04.
bench loss_stripes 100 loss --row-block 4096 --batch 65536 --dim 768 --time-batch 32768 --time-dim 768 --skip-max-batch --repeats 5
# Attention alone as the step asks it (loss and gradients, bf16, the step's 512 texts x 128 tokens, MiniLM's
# 12 x 32 heads) against SDPA's forward and backward: with dropout 0.1, and without (cuDNN's kernel in xla).
bench attention_train_dropout 60 attention --train --dtype bfloat16 --dropout 0.1 --batch 512 --lengths 128 --impls explicit,chunked,flash --matmul-size 8192
bench attention_train 60 attention --train --dtype bfloat16 --batch 512 --lengths 128 --impls xla,chunked,flash --matmul-size 8192
# The step of 2026-11-28 (0.90x PyTorch) came from a BERT whose six layers were a Python loop; today's
# layers are one nn.scan (0.67x on 2026-12-04). The same step with the loop unrolled:
bench train_step_b256_unrolled 80 train_step --batch 256 --seq 128 --steps 20 --scan-unroll 6
# XLA's rewrite of layer norms into cuDNN's fused norm kernels (issue 17's "fused norms"; off by default in XLA):
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_cudnn_layer_norm=true" bench train_step_b256_cudnn_norm 80 train_step --batch 256 --seq 128 --steps 20
# Issue 17's second training shape: SmolLM2-135M (30 layers, GQA 9/3, SwiGLU, causal, no dropout: auto takes
# cuDNN's fused attention in bf16) against transformers' LlamaModel with SDPA, 64 pairs x 256 tokens.
bench train_step_smollm2 120 train_step --arch llama --batch 64 --seq 256 --steps 10
bench train_step_smollm2_flash 120 train_step --arch llama --batch 64 --seq 256 --steps 10 --attention-impl flash
bench kernels_int8_10m 150 kernels --paths int8 --n 10000000 --queries 1,64 --k 10,100 --blocks 16x128 --select running,two_pass --repeats 5
# Dropout masks from XLA's RngBitGenerator (train.dropout_rng=rbg) instead of threefry: the H200 step was
# bound by elementwise work, the masks among it.
bench train_step_b256_rbg 80 train_step --batch 256 --seq 128 --steps 20 --dropout-rng rbg
# The XLA ring at 4096 tiles (64 per pass at 32k; the GPU default since 2026-12-04, 1.66x the dense loss).
bench loss_tile4096 80 loss --batch 65536 --dim 768 --tile 4096 --time-batch 32768 --time-dim 768 --skip-max-batch --repeats 5
# The fused Pallas tiles (embedjax/kernels/ring_tiles.py): one launch per pass, 10 B^2 d FLOPs; block 64
# asks for more shared memory than an H200 has (416-608 KiB of 227: the H200 on 2026-12-04, and the offline
# sm_90 compile of benchmarks/triton_resources.py), so only block 32 runs (39x the dense loss on 2026-12-04).
bench loss_pallas_tile32 80 loss --ring-impl pallas --tile 32 --batch 65536 --dim 768 --time-batch 32768 --time-dim 768 --skip-max-batch --repeats 5
# Earlier checks (issue 3, 10): the block shapes at 2M codes, bigger training batches, the ring's memory search.
bench kernels 330 kernels --n 2000000 --queries 64,512 --k 10,100 --blocks 16x128,32x128,64x64 --select running,two_pass --repeats 5
bench train_step_b1024 80 train_step --batch 1024 --seq 128 --steps 10
# The explicit softmax with its [L, L] dropout mask (auto's choice under dropout before 2026-12-04; auto
# now takes the chunked kernel there, 47.2 against 50.3 ms on the H200).
bench train_step_b256_explicit 80 train_step --batch 256 --seq 128 --steps 20 --attention-impl explicit
bench loss 150 loss --batch 65536 --dim 768 --time-batch 32768 --time-dim 768 --budget-gib 120 --max-search-batch 1048576 --repeats 5
if [[ -n "${MODEL_DIR:-}" && -n "${STS_FILE:-}" ]]; then
  bench encode_b64 110 encode --model "$MODEL_DIR" --data "$STS_FILE" --batch-size 64 --repeats 5
fi
cp BENCHMARKS.md "$out/BENCHMARKS.md"
cp -r benchmarks "$out/benchmarks" 2>/dev/null || true
"$py" - "$out" <<'PY'
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    text = path.read_text().strip().splitlines()
    if not text:
        continue
    res = json.loads(text[-1])
    rows = res.pop("rows", [])
    print(path.stem, {k: v for k, v in res.items() if not isinstance(v, dict)})
    for r in rows:
        print("  ", {k: r.get(k) for k in ("kernel", "impl", "queries", "k", "ms", "speedup_vs_xla", "rows_differing_from_xla", "fraction_of_bandwidth", "tera_ops_per_s", "error") if k in r})
PY

#!/usr/bin/env bash
# Run N local processes of `python -m embedjax train` as one multi-host JAX job on CPU
# (gloo collectives over localhost), so multi-host code paths run on one machine.
#
#   launch/multiprocess_cpu.sh N --config configs/retrieval_infonce.py:tiny --workdir /tmp/run [--config.k=v ...]
#
# Environment: DEVICES_PER_PROCESS (default 4 fake CPU devices each), COORDINATOR_PORT
# (default: a free port), PYTHON (default: .venv/bin/python if present, else python).
# Process 0's stdout (the summary JSON line) is this script's stdout; every process's
# stderr is passed through. The exit status is the first non-zero status of any process.
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ || "$1" -lt 1 ]]; then
  echo "usage: $0 N --config FILE[:ARG] --workdir DIR [--config.KEY=VALUE ...]" >&2
  exit 2
fi
N=$1
shift
DEVICES=${DEVICES_PER_PROCESS:-4}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python; fi
fi
if [[ -z "${COORDINATOR_PORT:-}" ]]; then
  COORDINATOR_PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')
fi

pids=()
cleanup() { for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done; }
trap cleanup TERM INT

for ((i = 0; i < N; i++)); do
  out=/dev/null
  [[ $i -eq 0 ]] && out=/dev/stdout
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES" \
    "$PYTHON" -m embedjax.train.cli "$@" \
      --config.distributed.coordinator="localhost:$COORDINATOR_PORT" \
      --config.distributed.num_processes="$N" \
      --config.distributed.process_id="$i" >"$out" &
  pids+=($!)
done

status=0
for pid in "${pids[@]}"; do
  if ! wait "$pid"; then
    code=$?
    [[ $status -eq 0 ]] && status=$code
    cleanup
  fi
done
exit $status

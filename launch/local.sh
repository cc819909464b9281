#!/usr/bin/env bash
# Run an embedjax command on this machine as one process or as N cooperating processes.
#
#   launch/local.sh [--num_processes N] [--port P] [--devices_per_process K] [--log_dir DIR] [--dry_run] -- COMMAND...
#
# With N > 1 every process gets the environment that embedjax.launch_env reads
# (EMBEDJAX_COORDINATOR=127.0.0.1:P, EMBEDJAX_NUM_PROCESSES=N, EMBEDJAX_PROCESS_ID=i)
# and, with --devices_per_process K, K fake CPU devices (XLA_FLAGS), so a
# multi-host job can be rehearsed on one CPU machine. Process i logs to
# DIR/process_i.log; the launcher waits for all and fails if any fails.
# --dry_run prints the exact commands, one per process, and runs nothing.
# Example:
#   launch/local.sh --num_processes 2 --devices_per_process 4 -- \
#     python -m embedjax train --config configs/retrieval.py:small --workdir runs/retrieval-2proc
set -euo pipefail

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }

num_processes=1
port=12355
devices_per_process=""
log_dir="launch_logs"
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --num_processes) num_processes="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --devices_per_process) devices_per_process="$2"; shift 2 ;;
    --log_dir) log_dir="$2"; shift 2 ;;
    --dry_run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "local.sh: unknown option '$1' (put the command after --; see --help)" >&2; exit 2 ;;
  esac
done
if [[ $# -eq 0 ]]; then
  echo "local.sh: no command given: launch/local.sh [options] -- python -m embedjax ..." >&2; exit 2
fi
if ! [[ "$num_processes" =~ ^[1-9][0-9]*$ ]]; then
  echo "local.sh: --num_processes must be a positive integer; got '$num_processes'" >&2; exit 2
fi
if ! [[ "$port" =~ ^[0-9]+$ ]] || (( port < 1 || port > 65535 )); then
  echo "local.sh: --port must be in 1..65535; got '$port'" >&2; exit 2
fi
if [[ -n "$devices_per_process" ]] && ! [[ "$devices_per_process" =~ ^[1-9][0-9]*$ ]]; then
  echo "local.sh: --devices_per_process must be a positive integer; got '$devices_per_process'" >&2; exit 2
fi

command_str="$(printf '%q ' "$@")"
command_str="${command_str% }"

# The environment of process $1, as NAME=VALUE words.
process_env() {
  local i="$1"
  if (( num_processes > 1 )); then
    printf '%s ' "EMBEDJAX_COORDINATOR=127.0.0.1:${port}" "EMBEDJAX_NUM_PROCESSES=${num_processes}" "EMBEDJAX_PROCESS_ID=${i}"
  fi
  if [[ -n "$devices_per_process" ]]; then
    printf '%q ' "XLA_FLAGS=--xla_force_host_platform_device_count=${devices_per_process}"
    printf '%s ' "JAX_PLATFORMS=cpu"
  fi
}

if (( num_processes == 1 )); then
  line="$(process_env 0)${command_str}"
  if (( dry_run )); then
    echo "env ${line}"
    exit 0
  fi
  eval "exec env ${line}"
fi

set -m  # each process in its own process group, so stopping it stops its children too
declare -A live=()  # pid (= process group id) -> process index
stop_all() { for pid in "${!live[@]}"; do kill -- "-$pid" 2>/dev/null || true; done; }
trap 'stop_all; exit 143' TERM INT
for (( i = 0; i < num_processes; i++ )); do
  line="env $(process_env "$i")${command_str} > $(printf '%q' "${log_dir}/process_${i}.log") 2>&1"
  if (( dry_run )); then
    echo "$line"
    continue
  fi
  mkdir -p "$log_dir"
  eval "$line &"
  live[$!]=$i
done
(( dry_run )) && exit 0

# Wait for all; when one fails, stop the others (they would wait for it forever).
status=0
while (( ${#live[@]} > 0 )); do
  finished=""
  if wait -n -p finished "${!live[@]}"; then rc=0; else rc=$?; fi
  [[ -z "$finished" ]] && break
  i="${live[$finished]}"
  unset "live[$finished]"
  if (( rc != 0 && status == 0 )); then
    echo "local.sh: process $i exited with status $rc; stopping the others; see ${log_dir}/process_${i}.log" >&2
    status=$rc
    stop_all
  fi
done
exit "$status"

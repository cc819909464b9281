#!/usr/bin/env bash
# Submit an embedjax command to a SLURM GPU cluster as one JAX process per node (or per GPU).
#
#   launch/gpu_slurm.sh --nodes N --gpus_per_node G [--processes_per_node 1|G] [--partition P]
#       [--account A] [--time HH:MM:SS] [--job_name NAME] [--port 12355] [--script PATH] [--dry_run] -- COMMAND...
#
# Writes an sbatch script that exports, for every process started by srun,
#   EMBEDJAX_COORDINATOR=<first node of the allocation>:PORT
#   EMBEDJAX_NUM_PROCESSES=$SLURM_NTASKS
#   EMBEDJAX_PROCESS_ID=$SLURM_PROCID
# (what embedjax.launch_env.distributed_init_kwargs reads), then submits it with
# sbatch. With --processes_per_node equal to --gpus_per_node each process sees one
# GPU (CUDA_VISIBLE_DEVICES=$SLURM_LOCALID); the default, one process per node
# driving all of its GPUs, is what JAX recommends.
# --dry_run prints the script and the sbatch command, and submits nothing.
set -euo pipefail

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "gpu_slurm.sh: $*" >&2; exit 2; }

nodes=""
gpus_per_node=""
processes_per_node=1
partition=""
account=""
time_limit="04:00:00"
job_name="embedjax"
port=12355
script=""
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) nodes="$2"; shift 2 ;;
    --gpus_per_node) gpus_per_node="$2"; shift 2 ;;
    --processes_per_node) processes_per_node="$2"; shift 2 ;;
    --partition) partition="$2"; shift 2 ;;
    --account) account="$2"; shift 2 ;;
    --time) time_limit="$2"; shift 2 ;;
    --job_name) job_name="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --script) script="$2"; shift 2 ;;
    --dry_run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (put the command after --; see --help)" ;;
  esac
done
[[ $# -gt 0 ]] || die "no command given: launch/gpu_slurm.sh [options] -- python -m embedjax ..."
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer; got '$nodes'"
[[ "$gpus_per_node" =~ ^[1-9][0-9]*$ ]] || die "--gpus_per_node must be a positive integer; got '$gpus_per_node'"
[[ "$processes_per_node" =~ ^[1-9][0-9]*$ ]] || die "--processes_per_node must be a positive integer; got '$processes_per_node'"
if (( processes_per_node != 1 && processes_per_node != gpus_per_node )); then
  die "--processes_per_node must be 1 (one process drives all GPUs of a node) or --gpus_per_node ($gpus_per_node, one GPU each); got $processes_per_node"
fi
[[ "$port" =~ ^[0-9]+$ ]] && (( port >= 1 && port <= 65535 )) || die "--port must be in 1..65535; got '$port'"
[[ "$time_limit" =~ ^([0-9]+-)?[0-9]{1,2}(:[0-9]{2}){1,2}$ ]] || die "--time must look like HH:MM:SS or D-HH:MM:SS; got '$time_limit'"
[[ "$job_name" =~ ^[A-Za-z0-9._-]+$ ]] || die "--job_name may hold letters, digits, '.', '_' and '-' only; got '$job_name'"
script="${script:-launch_logs/${job_name}.sbatch}"

command_str="$(printf '%q ' "$@")"
command_str="${command_str% }"

# Runs once per process: its rank comes from srun; the command follows as "$@".
per_process='export EMBEDJAX_PROCESS_ID="$SLURM_PROCID";'
if (( processes_per_node > 1 )); then
  per_process+=' export CUDA_VISIBLE_DEVICES="$SLURM_LOCALID";'
fi
per_process+=' exec "$@"'

render_script() {
  echo "#!/usr/bin/env bash"
  echo "#SBATCH --job-name=${job_name}"
  echo "#SBATCH --nodes=${nodes}"
  echo "#SBATCH --ntasks-per-node=${processes_per_node}"
  echo "#SBATCH --gpus-per-node=${gpus_per_node}"
  echo "#SBATCH --time=${time_limit}"
  echo "#SBATCH --output=launch_logs/%x-%j.out"
  [[ -n "$partition" ]] && echo "#SBATCH --partition=${partition}"
  [[ -n "$account" ]] && echo "#SBATCH --account=${account}"
  echo "set -euo pipefail"
  echo "# process 0 runs on the first node of the allocation and hosts the coordinator"
  # sed reads the whole list (head would close the pipe early: SIGPIPE fails the job under pipefail)
  echo "coordinator_host=\"\$(scontrol show hostnames \"\$SLURM_JOB_NODELIST\" | sed -n 1p)\""
  echo "[[ -n \"\$coordinator_host\" ]] || { echo \"no host in SLURM_JOB_NODELIST='\$SLURM_JOB_NODELIST'\" >&2; exit 1; }"
  echo "export EMBEDJAX_COORDINATOR=\"\${coordinator_host}:${port}\""
  echo "export EMBEDJAX_NUM_PROCESSES=\"\$SLURM_NTASKS\""
  echo "srun --kill-on-bad-exit=1 --export=ALL bash -c '${per_process}' embedjax-process ${command_str}"
}

if (( dry_run )); then
  echo "# ---- ${script} ----"
  render_script
  echo "# ---- end ----"
  echo "mkdir -p launch_logs && sbatch ${script}"
  exit 0
fi
mkdir -p "$(dirname "$script")" launch_logs
render_script > "$script"
exec sbatch "$script"

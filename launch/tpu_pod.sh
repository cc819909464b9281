#!/usr/bin/env bash
# Run an embedjax command on every worker of a Cloud TPU VM slice.
#
#   launch/tpu_pod.sh --name NAME --zone ZONE --workdir gs://BUCKET/PATH
#       [--accelerator_type v5litepod-16 --version v2-alpha-tpuv5-lite --create] [--project P]
#       [--code_dir .] [--stage_dir /tmp] [--dry_run] -- COMMAND...
#
# Steps (each printed by --dry_run, which runs nothing):
#   1. reuse the TPU VM NAME, or with --create make it when it does not exist;
#   2. pack the committed code (git archive of HEAD of --code_dir), copy it to
#      every worker (scp --worker=all) and install it there (pip install -e .[tpu]);
#   3. run COMMAND --workdir WORKDIR on all workers at once (ssh --worker=all) with
#      EMBEDJAX_NUM_PROCESSES=auto: each process calls jax.distributed.initialize()
#      with no arguments and JAX reads the slice layout from the TPU VM metadata.
# The workdir must be a gs:// bucket path: every worker writes checkpoints and logs
# to the same place, and a worker's local disk disappears with the slice.
set -euo pipefail

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

name=""
zone=""
workdir=""
accelerator_type=""
version=""
create=0
project=""
code_dir="."
stage_dir="${TMPDIR:-/tmp}"
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --accelerator_type) accelerator_type="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --create) create=1; shift ;;
    --project) project="$2"; shift 2 ;;
    --code_dir) code_dir="$2"; shift 2 ;;
    --stage_dir) stage_dir="$2"; shift 2 ;;
    --dry_run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (put the command after --; see --help)" ;;
  esac
done
[[ $# -gt 0 ]] || die "no command given: launch/tpu_pod.sh [options] -- python -m embedjax ..."
[[ "$name" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name must be a TPU VM name (lower-case letters, digits, '-'); got '$name'"
[[ -n "$zone" ]] || die "--zone is required (e.g. us-central2-b)"
[[ "$workdir" == gs://?*/* || "$workdir" == gs://?* ]] || die "--workdir must be a gs:// bucket path that all workers share; got '${workdir}'"
if (( create )); then
  [[ -n "$accelerator_type" && -n "$version" ]] || die "--create needs --accelerator_type (e.g. v5litepod-16) and --version (the TPU software version, e.g. v2-alpha-tpuv5-lite)"
fi
for arg in "$@"; do
  [[ "$arg" == --workdir || "$arg" == --workdir=* ]] && die "pass the workdir as tpu_pod.sh --workdir gs://..., not inside the command"
done
git -C "$code_dir" rev-parse --git-dir > /dev/null 2>&1 || die "--code_dir '$code_dir' is not a git checkout (the code is shipped as git archive HEAD)"

commit="$(git -C "$code_dir" rev-parse --short HEAD)"
if [[ -n "$(git -C "$code_dir" status --porcelain --untracked-files=no)" ]]; then
  echo "tpu_pod.sh: warning: uncommitted changes in $code_dir are not shipped; workers run commit $commit" >&2
fi
tarball="${stage_dir%/}/embedjax-${commit}.tar.gz"
remote_tarball="embedjax-${commit}.tar.gz"

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=("--zone=${zone}")
[[ -n "$project" ]] && where+=("--project=${project}")

# Shell-quote words for display and for the remote command line: plain words as they
# are, anything else in single quotes (a ' inside becomes '\''); for --flag=value only
# the value is quoted.
quote_word() {
  local word="$1" prefix=""
  if [[ "$word" =~ ^(--[A-Za-z0-9_-]+=)(.*)$ ]]; then
    prefix="${BASH_REMATCH[1]}"
    word="${BASH_REMATCH[2]}"
  fi
  if [[ "$word" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s%s' "$prefix" "$word"
  else
    printf "%s'%s'" "$prefix" "${word//\'/\'\\\'\'}"
  fi
}
q() {
  local out="" word
  for word in "$@"; do
    out+="$(quote_word "$word") "
  done
  echo "${out% }"
}

command_str="$(q "$@" --workdir "$workdir")"
install_cmd="set -e; rm -rf ~/embedjax && mkdir -p ~/embedjax && tar -xzf ~/${remote_tarball} -C ~/embedjax && cd ~/embedjax && python3 -m pip install -q -e '.[tpu]'"
run_cmd="cd ~/embedjax && EMBEDJAX_NUM_PROCESSES=auto ${command_str}"

describe=("${gcloud_tpu[@]}" describe "$name" "${where[@]}")
create_vm=("${gcloud_tpu[@]}" create "$name" "${where[@]}" "--accelerator-type=${accelerator_type}" "--version=${version}")
pack=(git -C "$code_dir" archive --format=tar.gz "--output=${tarball}" HEAD)
copy=("${gcloud_tpu[@]}" scp "$tarball" "${name}:~/${remote_tarball}" --worker=all "${where[@]}")
install=("${gcloud_tpu[@]}" ssh "$name" --worker=all "${where[@]}" "--command=${install_cmd}")
run=("${gcloud_tpu[@]}" ssh "$name" --worker=all "${where[@]}" "--command=${run_cmd}")

if (( dry_run )); then
  if (( create )); then
    echo "$(q "${describe[@]}") > /dev/null 2>&1 || $(q "${create_vm[@]}")"
  else
    echo "$(q "${describe[@]}") > /dev/null"
  fi
  q "${pack[@]}"
  q "${copy[@]}"
  q "${install[@]}"
  q "${run[@]}"
  exit 0
fi

if ! "${describe[@]}" > /dev/null 2>&1; then
  (( create )) || die "TPU VM '$name' not found in $zone: pass --create with --accelerator_type and --version to make it"
  "${create_vm[@]}"
fi
"${pack[@]}"
"${copy[@]}"
"${install[@]}"
exec "${run[@]}"

"""Launchers: their dry-run commands, what they really run, and the environment they hand over.

The cluster tools (srun, scontrol, sbatch, gcloud) are replaced by small stub
scripts on PATH that record their arguments and, for srun, start the command once
per task the way SLURM does; the environment each started process sees is then
fed to embedjax.launch_env.distributed_init_kwargs, the function multi-host
initialisation reads.
"""
import json
import os
import pathlib
import shlex
import signal
import socket
import subprocess
import sys
import tarfile

import pytest

from embedjax import launch_env

REPO = pathlib.Path(__file__).resolve().parents[2]
LOCAL = REPO / "launch" / "local.sh"
SLURM = REPO / "launch" / "gpu_slurm.sh"
TPU = REPO / "launch" / "tpu_pod.sh"

# A command that writes the launch-related environment of its process to a file.
DUMP_ENV = (
    "import json, os, sys; keys = [k for k in os.environ if k.startswith(('EMBEDJAX_', 'SLURM_', 'CUDA_VISIBLE'))]; "
    "open(sys.argv[1], 'a').write(json.dumps({k: os.environ[k] for k in keys}) + '\\n')"
)


def _run(args, env=None, cwd=REPO, check=True, timeout=120):
    full_env = {**os.environ, **(env or {})}
    # own session, so a launcher that hangs is stopped together with everything it started
    with subprocess.Popen([str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=full_env, cwd=cwd, start_new_session=True) as popen:
        try:
            stdout, stderr = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGTERM)  # local.sh's trap stops the process groups it started
            try:
                stdout, stderr = popen.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(popen.pid, signal.SIGKILL)
                stdout, stderr = popen.communicate()
            raise AssertionError(f"{args} timed out after {timeout}s:\n{stdout}\n{stderr}") from None
    proc = subprocess.CompletedProcess(popen.args, popen.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stub(bin_dir: pathlib.Path, name: str, body: str):
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


# ------------------------------------------------------------ launch_env itself


def test_distributed_init_kwargs_explicit_auto_and_single():
    env = {"EMBEDJAX_COORDINATOR": "10.0.0.5:9999", "EMBEDJAX_NUM_PROCESSES": "4", "EMBEDJAX_PROCESS_ID": "3"}
    assert launch_env.distributed_init_kwargs(env) == {
        "coordinator_address": "10.0.0.5:9999", "num_processes": 4, "process_id": 3,
    }
    assert launch_env.distributed_init_kwargs({"EMBEDJAX_NUM_PROCESSES": "auto"}) == {
        "coordinator_address": None, "num_processes": None, "process_id": None,
    }
    assert launch_env.distributed_init_kwargs({}) == {}
    single = {"EMBEDJAX_COORDINATOR": "h:1", "EMBEDJAX_NUM_PROCESSES": "1", "EMBEDJAX_PROCESS_ID": "0"}
    assert launch_env.distributed_init_kwargs(single) == {}


def test_distributed_init_kwargs_slurm_fallback():
    env = {"SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_JOB_NODELIST": "gpu[007-008,011],login1"}
    assert launch_env.distributed_init_kwargs(env) == {
        "coordinator_address": f"gpu007:{launch_env.DEFAULT_COORDINATOR_PORT}", "num_processes": 8, "process_id": 5,
    }
    env["EMBEDJAX_COORDINATOR_PORT"] = "4321"
    env["SLURM_STEP_NODELIST"] = "a-[3-4]"  # the step's nodes win over the job's
    assert launch_env.distributed_init_kwargs(env)["coordinator_address"] == "a-3:4321"
    assert launch_env.distributed_init_kwargs({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) == {}
    # EMBEDJAX_* take precedence over SLURM
    env.update({"EMBEDJAX_COORDINATOR": "x:1", "EMBEDJAX_NUM_PROCESSES": "2", "EMBEDJAX_PROCESS_ID": "1"})
    assert launch_env.distributed_init_kwargs(env) == {"coordinator_address": "x:1", "num_processes": 2, "process_id": 1}


@pytest.mark.parametrize(
    "nodelist, host",
    [("node1", "node1"), ("gpu[003-005,9],cpu1", "gpu003"), ("a,b", "a"), ("rack[2-3]-n[07-08]", "rack2-n07"), ("x[10]", "x10")],
)
def test_first_host(nodelist, host):
    assert launch_env.first_host(nodelist) == host


@pytest.mark.parametrize(
    "env, message",
    [
        ({"EMBEDJAX_COORDINATOR": "h:1", "EMBEDJAX_NUM_PROCESSES": "2"}, "EMBEDJAX_PROCESS_ID not"),
        ({"EMBEDJAX_COORDINATOR": "h", "EMBEDJAX_NUM_PROCESSES": "2", "EMBEDJAX_PROCESS_ID": "0"}, "host:port"),
        ({"EMBEDJAX_COORDINATOR": "h:1", "EMBEDJAX_NUM_PROCESSES": "2", "EMBEDJAX_PROCESS_ID": "2"}, r"in \[0, 2\)"),
        ({"EMBEDJAX_COORDINATOR": "h:1", "EMBEDJAX_NUM_PROCESSES": "two", "EMBEDJAX_PROCESS_ID": "0"}, "integer"),
        ({"EMBEDJAX_COORDINATOR": "h:70000", "EMBEDJAX_NUM_PROCESSES": "2", "EMBEDJAX_PROCESS_ID": "0"}, "port"),
        ({"SLURM_NTASKS": "2"}, "SLURM_PROCID"),
        ({"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "n[1-2"}, "unclosed"),
    ],
)
def test_distributed_init_kwargs_rejects_inconsistent_environments(env, message):
    with pytest.raises(ValueError, match=message):
        launch_env.distributed_init_kwargs(env)


def test_config_overrides_match_the_training_config_fields():
    assert launch_env.config_overrides({}) == {}
    assert launch_env.config_overrides({"coordinator_address": None, "num_processes": None, "process_id": None}) == {
        "distributed.num_processes": -1
    }
    assert launch_env.config_overrides({"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}) == {
        "distributed.coordinator": "h:1", "distributed.num_processes": 2, "distributed.process_id": 1,
    }


# -------------------------------------------------------------------- local.sh


def _split_env_prefix(words):
    env, i = {}, 1  # words[0] == "env"
    while "=" in words[i] and not words[i].startswith("-"):
        key, _, value = words[i].partition("=")
        env[key] = value
        i += 1
    return env, words[i:]


def test_local_dry_run_prints_one_complete_command_per_process():
    cmd = ["python", "-m", "embedjax", "train", "--config", "configs/retrieval.py:small", "--workdir", "runs/a b"]
    out = _run([LOCAL, "--dry_run", "--num_processes", "3", "--port", "23456", "--devices_per_process", "4",
                "--log_dir", "logs", "--", *cmd]).stdout.strip().splitlines()
    assert len(out) == 3
    for i, line in enumerate(out):
        words = shlex.split(line)
        assert words[-3:] == [">", f"logs/process_{i}.log", "2>&1"] or words[-2:] == [f"logs/process_{i}.log", "2>&1"]
        env, rest = _split_env_prefix(words[: words.index(">")] if ">" in words else words)
        assert rest == cmd  # the command survives quoting exactly
        assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4" and env["JAX_PLATFORMS"] == "cpu"
        assert launch_env.distributed_init_kwargs(env) == {
            "coordinator_address": "127.0.0.1:23456", "num_processes": 3, "process_id": i,
        }


def test_local_single_process_dry_run_sets_no_distributed_env():
    line = _run([LOCAL, "--dry_run", "--", "python", "-c", "print(1)"]).stdout.strip()
    env, rest = _split_env_prefix(shlex.split(line))
    assert rest == ["python", "-c", "print(1)"] and launch_env.distributed_init_kwargs(env) == {}


def test_local_runs_each_process_with_the_environment_it_printed(tmp_path):
    out_file = tmp_path / "env.jsonl"
    _run([LOCAL, "--num_processes", "2", "--port", "23457", "--log_dir", tmp_path / "logs", "--",
          sys.executable, "-c", DUMP_ENV, out_file])
    seen = sorted((json.loads(line) for line in out_file.read_text().splitlines()), key=lambda e: e["EMBEDJAX_PROCESS_ID"])
    assert [launch_env.distributed_init_kwargs(e) for e in seen] == [
        {"coordinator_address": "127.0.0.1:23457", "num_processes": 2, "process_id": i} for i in range(2)
    ]


def test_local_fails_and_stops_the_others_when_one_process_fails(tmp_path):
    script = 'import os, sys, time; sys.exit(3) if os.environ["EMBEDJAX_PROCESS_ID"] == "1" else time.sleep(60)'
    proc = _run([LOCAL, "--num_processes", "2", "--log_dir", tmp_path, "--", sys.executable, "-c", script], check=False)
    assert proc.returncode == 3 and "process 1 exited with status 3" in proc.stderr


def test_local_two_process_jax_distributed_initialisation(tmp_path):
    # real multi-host initialisation: 2 processes x 2 CPU devices join one 4-device job
    script = (
        "from embedjax.launch_env import initialize_from_env; kw = initialize_from_env(); import jax; "
        "print('RESULT', jax.process_index(), jax.process_count(), jax.device_count(), jax.local_device_count())"
    )
    _run([LOCAL, "--num_processes", "2", "--port", _free_port(), "--devices_per_process", "2", "--log_dir", tmp_path,
          "--", sys.executable, "-c", script], env={"PYTHONPATH": str(REPO)}, timeout=90)
    results = sorted(
        line.split()[1:] for i in range(2) for line in (tmp_path / f"process_{i}.log").read_text().splitlines()
        if line.startswith("RESULT")
    )
    assert results == [["0", "2", "4", "2"], ["1", "2", "4", "2"]]


@pytest.mark.parametrize("bad", [["--num_processes", "0"], ["--port", "99999"], ["--bogus"], []])
def test_local_rejects_bad_arguments(bad):
    args = [LOCAL, *bad] + ([] if bad == [] else ["--", "true"])
    proc = _run(args, check=False)
    assert proc.returncode == 2 and "local.sh:" in proc.stderr


# --------------------------------------------------------------- gpu_slurm.sh


def _slurm_script(stdout: str) -> tuple[str, str]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# ---- "))
    end = lines.index("# ---- end ----")
    return "\n".join(lines[start + 1 : end]) + "\n", lines[end + 1]


def _slurm_stubs(bin_dir: pathlib.Path, hosts: list[str]):
    _stub(bin_dir, "scontrol", f'[[ "$1 $2" == "show hostnames" ]] || exit 9\nprintf "%s\\n" {" ".join(hosts)}\n')
    # start the command once per task, as srun does, with the per-task variables
    _stub(
        bin_dir,
        "srun",
        'while [[ "$1" == --* ]]; do echo "$1" >> "$SRUN_LOG"; shift; done\n'
        'per_node=$(( SLURM_NTASKS / SLURM_NNODES ))\n'
        'for (( i = 0; i < SLURM_NTASKS; i++ )); do SLURM_PROCID=$i SLURM_LOCALID=$(( i % per_node )) "$@" || exit $?; done\n',
    )


@pytest.mark.parametrize("processes_per_node", [1, 4])
def test_slurm_script_hands_every_process_the_coordinator_count_and_rank(tmp_path, processes_per_node):
    out_file = tmp_path / "env.jsonl"
    stdout = _run([SLURM, "--nodes", "2", "--gpus_per_node", "4", "--processes_per_node", processes_per_node,
                   "--partition", "gpu", "--port", "4444", "--dry_run", "--", sys.executable, "-c", DUMP_ENV, out_file]).stdout
    script, submit = _slurm_script(stdout)
    assert submit == "mkdir -p launch_logs && sbatch launch_logs/embedjax.sbatch"
    for directive in ("--nodes=2", f"--ntasks-per-node={processes_per_node}", "--gpus-per-node=4", "--partition=gpu"):
        assert f"#SBATCH {directive}\n" in script
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _slurm_stubs(bin_dir, ["gpu007", "gpu008"])
    (tmp_path / "job.sbatch").write_text(script)
    ntasks = 2 * processes_per_node
    slurm_env = {"SLURM_JOB_NODELIST": "gpu[007-008]", "SLURM_NTASKS": str(ntasks), "SLURM_NNODES": "2"}
    _run(["bash", tmp_path / "job.sbatch"], env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "SRUN_LOG": str(tmp_path / "srun.log"), **slurm_env})
    assert "--kill-on-bad-exit=1" in (tmp_path / "srun.log").read_text()
    seen = sorted((json.loads(line) for line in out_file.read_text().splitlines()), key=lambda e: int(e["SLURM_PROCID"]))
    assert [launch_env.distributed_init_kwargs(e) for e in seen] == [
        {"coordinator_address": "gpu007:4444", "num_processes": ntasks, "process_id": i} for i in range(ntasks)
    ]
    if processes_per_node > 1:
        assert [e["CUDA_VISIBLE_DEVICES"] for e in seen] == [str(i % 4) for i in range(ntasks)]
    else:
        assert all("CUDA_VISIBLE_DEVICES" not in e for e in seen)
    # the SLURM fallback (no EMBEDJAX_* variables) names the same coordinator host
    fallback = {**slurm_env, "SLURM_PROCID": "0", "EMBEDJAX_COORDINATOR_PORT": "4444"}
    assert launch_env.distributed_init_kwargs(fallback)["coordinator_address"] == "gpu007:4444"


def test_slurm_submits_exactly_the_script_it_prints(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "sbatch", 'cp "$1" "$SBATCH_COPY"; echo "Submitted batch job 42"\n')
    args = ["--nodes", "3", "--gpus_per_node", "8", "--job_name", "abl", "--script", tmp_path / "abl.sbatch", "--",
            "python", "-m", "embedjax", "train", "--workdir", "/shared/runs/abl"]
    printed, _ = _slurm_script(_run([SLURM, "--dry_run", *args]).stdout)
    proc = _run([SLURM, *args], env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "SBATCH_COPY": str(tmp_path / "copy")}, cwd=tmp_path)
    assert "Submitted batch job 42" in proc.stdout
    assert (tmp_path / "copy").read_text() == printed
    assert "embedjax-process python -m embedjax train --workdir /shared/runs/abl\n" in printed


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--gpus_per_node", "8"], "--nodes"),
        (["--nodes", "2", "--gpus_per_node", "8", "--processes_per_node", "3"], "--processes_per_node must be 1"),
        (["--nodes", "2", "--gpus_per_node", "8", "--time", "soon"], "--time"),
    ],
)
def test_slurm_rejects_bad_arguments(bad, message):
    proc = _run([SLURM, *bad, "--dry_run", "--", "true"], check=False)
    assert proc.returncode == 2 and message in proc.stderr


# ----------------------------------------------------------------- tpu_pod.sh


def _gcloud_stub(bin_dir: pathlib.Path, vm_exists: bool):
    _stub(
        bin_dir,
        "gcloud",
        f'{sys.executable} -c "import json, sys; print(json.dumps(sys.argv[1:]))" "$@" >> "$GCLOUD_LOG"\n'
        f'[[ "$4" == describe ]] && exit {0 if vm_exists else 1}\nexit 0\n',
    )


def _tpu_args(tmp_path, *extra):
    return ["--name", "pod-a", "--zone", "us-central2-b", "--workdir", "gs://bucket/runs/r1", "--stage_dir", tmp_path,
            *extra, "--", "python", "-m", "embedjax", "train", "--config", "configs/retrieval.py:full", "--note", "it's"]


def test_tpu_pod_runs_exactly_what_its_dry_run_prints(tmp_path):
    create = ["--create", "--accelerator_type", "v5litepod-16", "--version", "v2-alpha-tpuv5-lite"]
    printed = _run([TPU, "--dry_run", *_tpu_args(tmp_path, *create)]).stdout.strip().splitlines()
    assert len(printed) == 5
    assert printed[0].startswith("gcloud compute tpus tpu-vm describe pod-a --zone=us-central2-b > /dev/null 2>&1 || ")
    assert all("--worker=all" in line for line in printed[2:])

    # real run against a stub gcloud (VM missing -> created)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _gcloud_stub(bin_dir, vm_exists=False)
    log = tmp_path / "gcloud.log"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "GCLOUD_LOG": str(log)}
    _run([TPU, *_tpu_args(tmp_path, *create)], env=env)
    calls = [json.loads(line) for line in log.read_text().splitlines()]

    # the printed lines, evaluated with the same stub, make the same gcloud calls
    log_dry = tmp_path / "gcloud-dry.log"
    dry_env = {**env, "GCLOUD_LOG": str(log_dry)}
    for line in printed:
        if not line.startswith("git "):
            _run(["bash", "-c", line], env=dry_env)
    assert [json.loads(line) for line in log_dry.read_text().splitlines()] == calls
    assert [c[3] for c in calls] == ["describe", "create", "scp", "ssh", "ssh"]

    # the committed code was packed into the tarball that was copied
    tarball = pathlib.Path(calls[2][4])
    assert tarball.parent == tmp_path and tarball.exists()
    with tarfile.open(tarball) as tar:
        assert "pyproject.toml" in tar.getnames()

    # the remote command, run in a fake worker home, starts the process with auto-detection
    remote = next(a for a in calls[4] if a.startswith("--command=")).removeprefix("--command=")
    home = tmp_path / "home"
    (home / "embedjax").mkdir(parents=True)
    _stub(bin_dir, "python", f'exec {sys.executable} -c {shlex.quote(DUMP_ENV)} "$HOME/env.json"\n')
    _run(["bash", "-c", remote], env={**env, "HOME": str(home)})
    worker_env = json.loads((home / "env.json").read_text())
    assert launch_env.distributed_init_kwargs(worker_env) == {
        "coordinator_address": None, "num_processes": None, "process_id": None,
    }
    assert shlex.split(remote)[-2:] == ["--workdir", "gs://bucket/runs/r1"]
    assert "it's" in shlex.split(remote)


def test_tpu_pod_reuses_an_existing_vm_and_refuses_a_missing_one_without_create(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "gcloud.log"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "GCLOUD_LOG": str(log)}
    _gcloud_stub(bin_dir, vm_exists=True)
    _run([TPU, *_tpu_args(tmp_path)], env=env)
    assert [json.loads(line)[3] for line in log.read_text().splitlines()] == ["describe", "scp", "ssh", "ssh"]
    _gcloud_stub(bin_dir, vm_exists=False)
    proc = _run([TPU, *_tpu_args(tmp_path)], env=env, check=False)
    assert proc.returncode == 2 and "pass --create" in proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--name", "p", "--zone", "z", "--workdir", "/local/dir"], "gs://"),
        (["--name", "p", "--zone", "z", "--workdir", "gs://b/r", "--create"], "--accelerator_type"),
        (["--name", "Bad_Name", "--zone", "z", "--workdir", "gs://b/r"], "--name"),
    ],
)
def test_tpu_pod_rejects_bad_arguments(args, message):
    proc = _run([TPU, *args, "--dry_run", "--", "python", "x"], check=False)
    assert proc.returncode == 2 and message in proc.stderr

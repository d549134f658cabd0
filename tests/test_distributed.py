"""Multi-process start-up: environment detection, and two processes on 127.0.0.1 training like one.

The end-to-end test runs `python -m gpt_jax.main` as two processes joined by
jax.distributed (2 fake CPU devices each, each reading its own data shard),
saves and restores a multi-host checkpoint, compares the losses with one
process driving 4 devices, and resumes each run's checkpoint under the other
process count (elastic resume).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gpt_jax import distributed
from gpt_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------ detection


def test_no_multiprocess_environment_means_single_process():
  assert distributed.detect(environ={}, on_tpu_vm=False) is None
  # A SLURM batch script's own shell (no srun step) is one process.
  assert distributed.detect(environ={"SLURM_NTASKS": "8", "SLURM_PROCID": "0"}, on_tpu_vm=False) is None
  # --num_processes=1 alone: explicitly single-process.
  assert distributed.detect(num_processes=1, environ={}, on_tpu_vm=False) is None


def test_explicit_flags_win_and_must_be_complete():
  kind, kw = distributed.detect("127.0.0.1:1234", 2, 1, environ={"SLURM_NTASKS": "4"}, on_tpu_vm=False)
  assert kind == "explicit"
  assert kw == {"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1}
  with pytest.raises(UserError, match="--process_id"):
    distributed.detect("127.0.0.1:1234", 2, environ={}, on_tpu_vm=False)
  with pytest.raises(UserError, match=r"\[0, --num_processes=2\)"):
    distributed.detect("127.0.0.1:1234", 2, 2, environ={}, on_tpu_vm=False)
  for address in ("127.0.0.1", "127.0.0.1:abc", "127.0.0.1:0", "127.0.0.1:70000", ":1234"):
    with pytest.raises(UserError, match="HOST:PORT"):
      distributed.detect(address, 2, 0, environ={}, on_tpu_vm=False)
  # One process, but a process id that could only belong to a larger job.
  with pytest.raises(UserError, match=r"\[0, --num_processes=1\)"):
    distributed.detect(num_processes=1, process_id=5, environ={}, on_tpu_vm=False)
  with pytest.raises(UserError, match="--num_processes=0"):
    distributed.detect("127.0.0.1:1234", 0, 0, environ={}, on_tpu_vm=False)
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:8476", "GPT_JAX_NUM_PROCESSES": "4", "GPT_JAX_PROCESS_ID": "3"}
  assert distributed.detect(environ=env, on_tpu_vm=False)[1]["process_id"] == 3


ALL_8 = "0,1,2,3,4,5,6,7"
SRUN = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_PROCID": "5", "SLURM_LOCALID": "1"}


@pytest.mark.parametrize(
  "extra, want_ids",
  [
    # 8 tasks per node sharing the node's GPUs: jax's default, GPU = SLURM_LOCALID.
    ({"SLURM_NTASKS": "16", "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "CUDA_VISIBLE_DEVICES": ALL_8}, None),
    # --gpus-per-task=1: the task sees its one GPU as device 0.
    ({"SLURM_NTASKS": "16", "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "CUDA_VISIBLE_DEVICES": "5"}, [0]),
    # One task per node drives all of the node's GPUs.
    ({"SLURM_NTASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "1(x2)", "CUDA_VISIBLE_DEVICES": "0,1,2"}, [0, 1, 2]),
    ({"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_GPUS_ON_NODE": "8"}, list(range(8))),
  ],
)
def test_slurm_under_srun_and_its_gpus(extra, want_ids):
  kind, kw = distributed.detect(environ={**SRUN, **extra}, on_tpu_vm=False)
  assert kind == "slurm"
  assert kw.get("local_device_ids") == want_ids


def test_tpu_pod_and_mpi_are_detected():
  assert distributed.detect(environ={"TPU_WORKER_HOSTNAMES": "w-0,w-1,w-2,w-3"}, on_tpu_vm=False)[0] == "tpu"
  assert distributed.detect(environ={"TPU_WORKER_HOSTNAMES": "localhost"}, on_tpu_vm=False) is None
  assert distributed.detect(environ={}, on_tpu_vm=True)[0] == "tpu"
  assert distributed.detect(environ={"OMPI_COMM_WORLD_SIZE": "4"}, on_tpu_vm=False)[0] == "ompi"


# -------------------------------------------------------- two processes


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def main_command(workdir, cache_dir, *extra):
  return [
    sys.executable,
    "-m",
    "gpt_jax.main",
    "--config=configs/debug.py",
    f"--workdir={workdir}",
    "--config.data.max_documents=40",
    "--config.train.num_steps=3",
    "--config.checkpoint.every_steps=2",
    "--config.checkpoint.async_save=False",
    "--config.eval.every_steps=0",
    "--config.eval.num_batches=1",
    "--config.sample.num_samples=0",
    "--config.log.tensorboard=False",
    f"--config.train.compilation_cache_dir={cache_dir}",
    *extra,
  ]


def cpu_env(devices: int) -> dict:
  flags = f"--xla_force_host_platform_device_count={devices}"
  return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags, "PYTHONPATH": str(ROOT)}


def run_processes(commands, env, logs, timeout=420):
  """Starts all commands at once; returns their exit codes (all killed on timeout)."""
  procs = []
  for cmd, log in zip(commands, logs):
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT))
  codes = []
  try:
    for p in procs:
      codes.append(p.wait(timeout=timeout))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return codes


def losses(workdir) -> dict[int, float]:
  out = {}
  for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
    rec = json.loads(line)
    if "loss" in rec:
      out[rec["step"]] = rec["loss"]
  return out


def tail(path, n=30) -> str:
  return "\n".join(Path(path).read_text().splitlines()[-n:])


@pytest.mark.slow
def test_two_processes_train_save_restore_like_one_process_and_resume_elastically(tmp_path):
  """Also elastic resume: a checkpoint of 2 processes resumes under 1 and one of 1 under 2. The global
  batch at each step is the same windows whatever the process count, so the losses follow the
  uninterrupted run's up to the float32 reduction order of 2 x 2 against 1 x 4 devices (measured:
  equal, or 1 ulp apart)."""
  cache = tmp_path / "jax_cache"
  multi, single = tmp_path / "two_procs", tmp_path / "one_proc"
  down, up = tmp_path / "two_then_one", tmp_path / "one_then_two"

  def two_process_run(workdir, tag, *extra):
    port = free_port()
    cmds = [
      main_command(
        workdir,
        cache,
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        f"--process_id={i}",
        *extra,
      )
      for i in range(2)
    ]
    logs = [tmp_path / f"{tag}_p{i}.log" for i in range(2)]
    codes = run_processes(cmds, cpu_env(2), logs)
    assert codes == [0, 0], "\n\n".join(tail(log) for log in logs)
    return logs

  def one_process_run(workdir, tag):
    log = tmp_path / f"{tag}.log"
    codes = run_processes([main_command(workdir, cache)], cpu_env(4), [log])
    assert codes == [0], tail(log)
    return log

  def copy_at_step_2(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("3", "metrics.jsonl", "tensorboard"))

  # Process 1 waits for process 0 to write the tokenizer; each tokenises its
  # share of the documents into the shared workdir's token cache; both read
  # their own rows of each global batch.
  # The end-of-run sample needs both processes (the parameters are sharded over them); process 0 prints it.
  logs = two_process_run(multi, "first", "--config.sample.num_samples=1", "--config.sample.max_new_tokens=4")
  assert "process 0 of 2, 2 local / 4 global devices" in logs[0].read_text()
  assert "--- sample 1 ---" in logs[0].read_text() and "--- sample" not in logs[1].read_text()
  assert sorted(p.name for p in (multi / "tokenizer").parent.iterdir() if p.name.startswith(".")) == []
  assert len(list((multi / "data" / "tokens").glob("*/train-0000*-of-00002.bin"))) == 2
  first = losses(multi)
  assert sorted(first) == [1, 2, 3]
  copy_at_step_2(multi, down)

  # Restore: drop the final checkpoint; the same command restores step 2
  # (params, optimiser, the global data position) and redoes step 3.
  shutil.rmtree(multi / "checkpoints" / "3")
  (multi / "metrics.jsonl").unlink()
  logs = two_process_run(multi, "resumed")
  assert "resumed from step 2" in logs[0].read_text()
  resumed = losses(multi)
  assert sorted(resumed) == [3]

  # One process driving all 4 devices (the tokenizer is trained again from
  # the same documents, so it is the same tokenizer).
  one_process_run(single, "single")
  reference = losses(single)
  copy_at_step_2(single, up)

  steps = [1, 2, 3]
  np.testing.assert_allclose([first[s] for s in steps], [reference[s] for s in steps], rtol=2e-6)
  # Resuming reproduces the uninterrupted step exactly (same processes, same reduction order).
  assert resumed[3] == first[3]

  # Elastic: 2 -> 1 and 1 -> 2 processes from step 2.
  assert "resumed from step 2" in one_process_run(down, "two_then_one").read_text()
  assert "resumed from step 2" in two_process_run(up, "one_then_two")[0].read_text()
  np.testing.assert_allclose(losses(down)[3], first[3], rtol=1e-6)
  np.testing.assert_allclose(losses(up)[3], reference[3], rtol=1e-6)


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_saves_the_same_step_on_both(tmp_path):
  """A preemption notice reaching one host only: both save one common step and exit 0."""
  workdir, port = tmp_path / "run", free_port()
  long_run = ["--config.train.num_steps=100000", "--config.checkpoint.every_steps=100000"]
  cmds = [
    main_command(
      workdir,
      tmp_path / "jax_cache",
      *long_run,
      "--config.log.every_steps=1",
      f"--coordinator_address=127.0.0.1:{port}",
      "--num_processes=2",
      f"--process_id={i}",
    )
    for i in range(2)
  ]
  logs = [tmp_path / f"p{i}.log" for i in range(2)]
  procs = [
    subprocess.Popen(cmd, cwd=ROOT, env=cpu_env(2), stdout=open(log, "w"), stderr=subprocess.STDOUT)
    for cmd, log in zip(cmds, logs)
  ]
  try:
    metrics_file, deadline = workdir / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and not (metrics_file.exists() and len(losses(workdir)) >= 2):
      assert all(p.poll() is None for p in procs), "\n\n".join(tail(log) for log in logs)
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=180) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  assert codes == [0, 0], "\n\n".join(tail(log) for log in logs)
  steps = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
  assert len(steps) == 1 and 0 < steps[0] < 100000, steps
  for log in logs:
    assert f"saved step {steps[0]} after SIGTERM" in log.read_text()

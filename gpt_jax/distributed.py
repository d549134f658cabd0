"""Multi-process start-up: `jax.distributed` when a job spans several processes.

One command trains on a laptop, a TPU pod slice or a GPU cluster; what differs
is how the processes find each other, which `initialize` works out from:
- explicit flags `--coordinator_address --num_processes --process_id` (or
  JAX_COORDINATOR_ADDRESS / GPT_JAX_NUM_PROCESSES / GPT_JAX_PROCESS_ID),
  e.g. `launch/local.sh` on 127.0.0.1 or any hand-rolled launcher;
- SLURM (`srun`: SLURM_NTASKS > 1), one process per GPU or per node;
- Open MPI (`mpirun`: OMPI_COMM_WORLD_SIZE > 1);
- a Cloud TPU VM or GKE TPU pod (jax reads the worker list from the
  metadata server or TPU_WORKER_HOSTNAMES).
The first that applies, in this order, wins.
Anything else is a single process and nothing is initialised. It must run
before anything touches devices: `jax.devices()` fixes the device set.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from absl import logging

from gpt_jax.errors import UserError

# PCI vendor id of Google TPU chips: how jax itself recognises a Cloud TPU VM.
_GOOGLE_PCI_VENDOR = "0x1ae0"


def _int(environ: Mapping[str, str], name: str) -> int | None:
  value = environ.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise UserError(f"environment variable {name}={value!r} is not an integer") from None


def _tasks_on_this_node(environ: Mapping[str, str]) -> int | None:
  """SLURM tasks on this node: SLURM_NTASKS_PER_NODE, else SLURM_STEP_TASKS_PER_NODE ("8(x2)" or "4,2")."""
  n = _int(environ, "SLURM_NTASKS_PER_NODE")
  if n is not None:
    return n
  spec = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
  if not spec:
    return None
  node = _int(environ, "SLURM_NODEID") or 0
  counts = []
  for part in spec.split(","):
    value, _, repeat = part.partition("(x")
    counts += [int(value)] * (int(repeat.rstrip(")")) if repeat else 1)
  return counts[node] if node < len(counts) else counts[-1]


def slurm_local_device_ids(environ: Mapping[str, str]) -> list[int] | None:
  """GPUs this SLURM task drives; None = jax's default (GPU number SLURM_LOCALID).

  - `--gpus-per-task=1` binds one GPU per task: CUDA_VISIBLE_DEVICES holds a
    single id, which the task sees as device 0 (jax's default, SLURM_LOCALID,
    would name a device that is not visible);
  - one task per node drives every GPU of the node;
  - several tasks sharing all the node's GPUs: task i takes GPU i (default).
  """
  visible = [v for v in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
  if len(visible) == 1:
    return [0]
  if _tasks_on_this_node(environ) == 1:
    count = len(visible) or _int(environ, "SLURM_GPUS_ON_NODE")
    if count:
      return list(range(count))
  return None


def _on_cloud_tpu_vm() -> bool:
  for vendor in Path("/sys/bus/pci/devices").glob("*/vendor"):
    try:
      if vendor.read_text().strip() == _GOOGLE_PCI_VENDOR:
        return True
    except OSError:
      continue
  return False


def detect(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  environ: Mapping[str, str] | None = None,
  on_tpu_vm: bool | None = None,
) -> tuple[str, dict] | None:
  """(kind, keyword arguments of jax.distributed.initialize), or None for one process.

  kind is "explicit", "slurm", "tpu" or "ompi". Explicit values win over the
  environment; partial explicit values are an error (a process that guesses
  the rest would hang waiting for peers that never come).
  """
  env = os.environ if environ is None else environ
  address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
  count = num_processes if num_processes is not None else _int(env, "GPT_JAX_NUM_PROCESSES")
  index = process_id if process_id is not None else _int(env, "GPT_JAX_PROCESS_ID")
  given = {"--coordinator_address": address, "--num_processes": count, "--process_id": index}
  if any(v is not None for v in given.values()):
    if count is not None and count < 1:
      raise UserError(f"--num_processes={count} must be >= 1")
    if count == 1 and address is None and index in (None, 0):
      return None  # Explicitly one process.
    if count is not None and index is not None and not 0 <= index < count:
      raise UserError(f"--process_id={index} must be in [0, --num_processes={count})")
    missing = [k for k, v in given.items() if v is None]
    if missing:
      raise UserError(f"multi-process start needs {', '.join(missing)} as well (got {given})")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise UserError(f"--coordinator_address={address!r} must be HOST:PORT with a port in [1, 65535]")
    if count == 1:
      return None
    return "explicit", {"coordinator_address": address, "num_processes": count, "process_id": index}

  tasks = _int(env, "SLURM_NTASKS")
  # SLURM_STEP_NODELIST exists only inside `srun`: a batch script's own shell
  # (one process) must not wait for peers.
  if tasks and tasks > 1 and "SLURM_STEP_NODELIST" in env and "SLURM_PROCID" in env:
    kwargs = {}
    ids = slurm_local_device_ids(env)
    if ids is not None:
      kwargs["local_device_ids"] = ids
    return "slurm", kwargs

  world = _int(env, "OMPI_COMM_WORLD_SIZE")
  if world and world > 1:
    return "ompi", {}

  hosts = env.get("TPU_WORKER_HOSTNAMES", "") or env.get("TPU_PROCESS_ADDRESSES", "")
  multislice = env.get("MEGASCALE_COORDINATOR_ADDRESS")
  if "," in hosts or multislice:
    return "tpu", {}
  if on_tpu_vm is None:
    on_tpu_vm = _on_cloud_tpu_vm()
  if on_tpu_vm:
    # A pod slice's workers learn their peers from the metadata server; on a
    # single-host VM the same call starts a one-process group, harmlessly.
    return "tpu", {}
  return None


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> str:
  """Initialises jax.distributed if this is a multi-process job; returns a one-line description.

  On processes other than 0, absl logging drops to warnings, so a pod's log
  is one process's log (progress bars are disabled there by the train loop).
  """
  import jax

  found = detect(coordinator_address, num_processes, process_id)
  if found is None:
    return "single process"
  kind, kwargs = found
  if not jax.distributed.is_initialized():
    jax.distributed.initialize(**kwargs)
  index, count = jax.process_index(), jax.process_count()
  if index != 0:
    logging.set_verbosity(logging.WARNING)
  description = (
    f"jax.distributed ({kind}): process {index} of {count}, "
    f"{jax.local_device_count()} local / {jax.device_count()} global devices"
  )
  logging.info("%s", description)
  return description

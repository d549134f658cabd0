"""The planner's targets: compile-only devices for hardware this machine does not have.

  tpu:GEN:SHAPE        tpu:v5e:2x4, tpu:v5p:8x8x8 (GEN v4, v5e, v5p, v6e)
  tpu:ACCELERATOR_TYPE tpu:v5litepod-16, tpu:v4-32 (v4 / v5p names count TensorCores)
  tpu:...xS            S slices of it, tpu:v5p-1024x2 (or the planner's --num_slices=S)
  cuda:KIND[:N]        cuda:h100, cuda:a100:16 (KIND h100, h200, a100; N defaults to 8)
  cpu[:N]              N fake CPU devices sharing this host's RAM

TPU devices come from libtpu's topology description (`pip install libtpu`,
or TPU_LIBRARY_PATH=.../libtpu.so), CUDA devices from the jax CUDA plugin
given a GPU target description: both compile for the hardware, need none of
it, and run nothing. Chip facts come from hardware.py.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re

import jax
import numpy as np
from jax.experimental import topologies

from gpt_jax import hardware
from gpt_jax.errors import UserError

# Standard slice shapes by chip count (Cloud TPU docs: v5e/v6e 2D, v4/v5p 3D tori).
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_EXAMPLES = {2: "2x4", 3: "2x2x2"}
_SHAPES_3D = {
  4: "2x2x1",
  8: "2x2x2",
  16: "2x2x4",
  32: "2x4x4",
  64: "4x4x4",
  128: "4x4x8",
  256: "4x8x8",
  512: "8x8x8",
  1024: "8x8x16",
  2048: "8x16x16",
}
# Accelerator-type prefixes (TPU_ACCELERATOR_TYPE) by generation: what libtpu expects to be told.
_TYPE_NAMES = {"v4": "v4", "v5e": "v5litepod", "v5p": "v5p", "v6e": "v6e"}


@dataclasses.dataclass(frozen=True)
class Target:
  spec: str  # As given: "tpu:v5e:2x4", "cuda:h100:8", "cpu:8".
  platform: str  # "tpu", "cuda", "cpu".
  kind: str  # "v5e", "h100", "cpu".
  num_devices: int  # All slices together.
  memory_bytes: float  # Per device; for cpu the host's RAM, shared by its fake devices.
  peak_flops: float  # Per device, bf16 dense; 0 = unknown (cpu).
  topology: str = ""  # TPU: one slice, "v5e:2x4".
  num_slices: int = 1  # TPU slices joined by the data-centre network.

  @property
  def chip(self) -> hardware.Chip | None:
    return hardware.TPUS.get(self.kind) or hardware.GPUS.get(self.kind)


def tpu_topology(name: str) -> str:
  """'v5e:2x4' as is; accelerator types ('v5litepod-16', 'v4-32', 'v6e-8') to 'GEN:SHAPE'."""
  if ":" in name:
    gen, shape = name.split(":", 1)
    gen = hardware.TPU_ALIASES.get(gen, gen)
    if gen not in hardware.TPUS or not re.fullmatch(r"[1-9]\d*(x[1-9]\d*){1,2}", shape):
      raise UserError(
        f"--target=tpu:{name}: expected GEN:SHAPE with GEN in {sorted(hardware.TPUS)}, e.g. v5e:2x4"
      )
    dims = hardware.TPUS[gen].dims
    if dims == 3 and shape.count("x") == 1:
      shape += "x1"  # v4:2x2 is the 2x2x1 torus.
    if shape.count("x") + 1 != dims:
      raise UserError(f"--target=tpu:{name}: {gen} slices are {dims}-D (e.g. {gen}:{_EXAMPLES[dims]})")
    return f"{gen}:{shape}"
  match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name)
  gen = match and hardware.TPU_ALIASES.get(match.group(1), match.group(1))
  if not match or gen not in hardware.TPUS:
    raise UserError(f"--target=tpu:{name}: unknown TPU; use GEN:SHAPE (v5e:2x4) or a type like v5litepod-16")
  chip = hardware.TPUS[gen]
  chips = int(match.group(2)) // chip.cores_per_chip
  shapes = _SHAPES_2D if chip.dims == 2 else _SHAPES_3D
  if chips not in shapes:
    raise UserError(f"--target=tpu:{name}: no standard {gen} slice of {chips} chips; give GEN:SHAPE")
  return f"{gen}:{shapes[chips]}"


def accelerator_type(topology: str) -> str:
  """'v5e:2x4' -> 'v5litepod-8', 'v5p:8x8x8' -> 'v5p-1024': the name Cloud TPU gives the slice."""
  gen, shape = topology.split(":")
  chips = int(np.prod([int(d) for d in shape.split("x")]))
  return f"{_TYPE_NAMES[gen]}-{chips * hardware.TPUS[gen].cores_per_chip}"


def parse_target(spec: str, num_slices: int = 1) -> Target:
  """A Target from its spec; `num_slices` (the --num_slices flag) multiplies a TPU target."""
  platform, _, rest = spec.partition(":")
  if num_slices < 1:
    raise UserError(f"--num_slices={num_slices}: must be a positive integer")
  if platform != "tpu" and num_slices != 1:
    raise UserError(f"--num_slices={num_slices}: slices are TPU slices, not --target={spec}")
  if platform == "cpu":
    if rest and not re.fullmatch(r"[1-9]\d*", rest):
      raise UserError(f"--target={spec}: N in cpu:N must be a positive integer (cpu alone: all CPU devices)")
    n = int(rest) if rest else 0
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Target(spec, "cpu", "cpu", n, ram, 0.0)
  if platform == "tpu":
    slices = re.fullmatch(r"(.+-\d+)x([1-9]\d*)", rest)  # v5p-1024x2: an accelerator type, twice.
    if slices:
      if num_slices != 1:
        raise UserError(f"--target={spec} names its slices; leave out --num_slices")
      rest, num_slices = slices.group(1), int(slices.group(2))
    topology = tpu_topology(rest)
    gen, shape = topology.split(":")
    chips = int(np.prod([int(d) for d in shape.split("x")]))
    chip = hardware.TPUS[gen]
    return Target(
      spec, "tpu", gen, chips * num_slices, chip.memory_bytes, chip.peak_flops, topology, num_slices
    )
  if platform == "cuda":
    kind, _, count = rest.partition(":")
    if kind not in hardware.GPUS:
      raise UserError(
        f"--target={spec}: GPU kind must be one of {sorted(hardware.GPUS)} (cuda:h100 or cuda:h100:16)"
      )
    if count and not re.fullmatch(r"[1-9]\d*", count):
      raise UserError(f"--target={spec}: the GPU count in cuda:{kind}:N must be a positive integer")
    n = int(count) if count else 8
    chip = hardware.GPUS[kind]
    return Target(spec, "cuda", kind, n, chip.memory_bytes, chip.peak_flops)
  raise UserError(f"--target={spec}: expected tpu:..., cuda:... or cpu[:N]")


def gpu_target_config(kind: str) -> str:
  """GpuTargetConfigProto text for XLA's GPU compiler (what it would query from a device)."""
  chip = hardware.GPUS[kind]
  g = {**chip.gpu, "memory": chip.memory_bytes, "bandwidth": chip.hbm_bandwidth}
  major, minor = g["cc"]
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {g["smem_per_sm"]}
  threads_per_core_limit: 2048
  core_count: {g["sms"]}
  fpus_per_core: {g["fpus"]}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(g["bandwidth"])}
  l2_cache_size: {g["l2"]}
  clock_rate_ghz: {g["clock_ghz"]}
  device_memory_size: {g["memory"]}
  shared_memory_per_block_optin: {g["smem_optin"]}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
device_description_str: "{g["name"]}"
"""


def prefer_cpu_backend() -> None:
  """Compile-only targets must not start a real TPU/GPU backend on this machine."""
  if not os.environ.get("JAX_PLATFORMS"):
    try:
      jax.config.update("jax_platforms", "cpu")
    except Exception:  # noqa: BLE001 - backends already up: they are what they are.
      pass


def target_devices(target: Target) -> list:
  """The devices to compile for (compile-only for tpu / cuda)."""
  prefer_cpu_backend()
  if target.platform == "cpu":
    if target.num_devices:
      try:  # Works only before the CPU backend starts (as in the CLI).
        jax.config.update("jax_num_cpu_devices", target.num_devices)
      except Exception:  # noqa: BLE001
        pass
    devices = jax.devices("cpu")
    n = target.num_devices or len(devices)
    if len(devices) < n:
      raise UserError(
        f"--target={target.spec}: only {len(devices)} CPU devices in this process "
        f"(XLA_FLAGS=--xla_force_host_platform_device_count={n} before jax starts)"
      )
    return devices[:n]
  if target.platform == "tpu":
    if not os.environ.get("TPU_LIBRARY_PATH") and importlib.util.find_spec("libtpu") is None:
      raise UserError("--target=tpu:... needs libtpu: pip install libtpu (or set TPU_LIBRARY_PATH)")
    # One compile-only client per process; other libtpu users on this machine
    # (another planner) must not lock it, and there are no TPU hosts to find.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # Without it libtpu's start-up looks for this machine's TPU type and prints
    # "WARNING: could not determine TPU accelerator type"; the compile-only client
    # needs none, and any type (here the target's) silences it.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator_type(target.topology))
    dims = [int(d) for d in target.topology.split(":")[1].split("x")]
    per_host = tuple(min(d, 2) for d in dims[:2]) + (1,)
    topo = topologies.get_topology_desc(
      platform="tpu",
      topology_name=target.topology,
      chip_config_name=hardware.TPUS[target.kind].chip_config,
      chips_per_host_bounds=per_host,
      num_slices=target.num_slices,
    )
    return list(topo.devices)
  try:
    topo = topologies.get_topology_desc(
      platform="cuda", target_config=gpu_target_config(target.kind), topology=f"1x1x{target.num_devices}"
    )
  except Exception as e:  # noqa: BLE001
    raise UserError(
      f"--target={target.spec}: cannot create compile-only CUDA devices ({type(e).__name__}: "
      f"{str(e).splitlines()[0][:200]}); pip install jax-cuda12-plugin=={jax.__version__}"
    ) from e
  return list(topo.devices)


def cache_dir(flag: str, target: Target) -> str:
  """The planner's cache directory ('' for the default, 'none': no cache -> '').

  JAX's persistent compilation cache serves CPU and CUDA targets. For TPU it
  cannot: with jax 0.10.2 / libtpu 0.0.42 a compile-only client writes
  entries but cannot read them back ("PjRtCompiler must be constructed with a
  Client to call DeserializeLoadedExecutable"), so it is left off there; the
  planner's own record cache (suggest.py) remembers each plan's result
  instead, which is all a repeated search needs.
  """
  if flag == "none":
    return ""
  where = flag or os.path.join(os.path.expanduser("~"), ".cache", "gpt_jax", "plan_cache")
  if target.platform != "tpu":
    jax.config.update("jax_compilation_cache_dir", where)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  return where

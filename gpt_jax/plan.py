"""Plan a run before renting hardware: parameters, FLOPs and per-device memory.

  python -m gpt_jax.plan --config=configs/gpt2_xl.py [--json]
  python -m gpt_jax.plan --config=configs/gpt2_xl.py --target=tpu:v5e:2x4 \
      --config.mesh.fsdp=8 --config.mesh.data=1 --config.train.batch_size=32
  python -m gpt_jax.plan --config=configs/gpt2_xl.py --target=cuda:h100:8 --suggest
  python -m gpt_jax.plan --ladder --target=cpu:8

Without --target: parameter counts from shapes (jax.eval_shape) and FLOPs per
token by the PaLM formula, in about a second. With a target, the real train
step (train.build, which train.run calls: same shardings, donation, accumulation) is
compiled ahead of time for the target's devices from ShapeDtypeStructs, so no
parameter is ever allocated:
- tpu:GEN:SHAPE or tpu:ACCELERATOR_TYPE (tpu:v5e:2x4, tpu:v5litepod-16,
  tpu:v4-32): compile-only TPU devices from libtpu (`pip install libtpu`, or
  TPU_LIBRARY_PATH=.../libtpu.so). The TPU compiler's memory plan is per chip
  and its HBM check is real: a program that does not fit fails to compile
  with RESOURCE_EXHAUSTED, which is reported as "does not fit" with the
  bytes it asked for.
- cuda:KIND[:N] (cuda:h100, cuda:a100:16): the CUDA compiler, given a GPU
  target description, needs no GPU (jax CUDA plugin: `pip install
  jax-cuda12-plugin`). It plans memory but does not check it: the total is
  compared with the GPU's memory here.
- cpu[:N]: fake CPU devices. Argument bytes (params, optimiser state) are
  exact; CPU temporaries are not representative of an accelerator's.
XLA's cost_analysis counts a scanned layer once, so FLOPs per token come from
the PaLM formula, cross-checked against lowered (not compiled) unrolled
models, whose cost_analysis counts every layer.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax.experimental import topologies
from ml_collections import config_flags

from gpt_jax import cli, hardware, metrics, optim, pretrain, sharding, train
from gpt_jax import config as config_lib
from gpt_jax import model as model_lib
from gpt_jax.errors import ConfigError, UserError

GiB = hardware.GiB
RUNGS = ("gpt1", "gpt2_small", "gpt3_small", "gpt2_medium", "gpt2_large", "gpt2_xl")
REMATS = ("none", "dots_saveable", "full")  # Least to most recompute.
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
}


# ------------------------------------------------------------ parameters


def param_counts(model_cfg) -> dict[str, int]:
  """{"params": total, "non_embedding_params": total - wte - position tables} (padded vocab rows
  included): Kaplan et al. (2020) count N without the tables that are looked up."""
  shapes = nn.unbox(model_lib.abstract_params(model_cfg))
  total = model_lib.param_count(shapes)
  embedding = sum(int(np.prod(shapes[k].shape)) for k in ("wte", *model_lib.position_tables(model_cfg)))
  return {"params": total, "non_embedding_params": total - embedding}


def plan(config) -> dict:
  """Shapes, parameter counts and FLOPs per token (no target, no compilation)."""
  m = config.model
  start = time.perf_counter()
  counts = param_counts(m)
  seq = config_lib.seq_len(config)
  return {
    **counts,
    "num_layers": m.num_layers,
    "d_model": m.d_model,
    "num_heads": m.num_heads,
    "mlp_width": m.mlp_ratio * m.d_model,
    "vocab_size": m.vocab_size,
    "embedding_rows": model_lib.padded_vocab_size(m),
    "block_size": m.block_size,
    "seq_len": seq,
    "flops_per_token": metrics.flops_per_token(m, seq, counts["params"]),
    "eval_shape_seconds": round(time.perf_counter() - start, 3),
    **({"job_note": _JOB_NOTE.format(job=config.job)} if config.get("job", "pretrain") != "pretrain" else {}),
  }


_JOB_NOTE = (
  "job={job}: planned as the language-model train step of this model at this batch and seq_len; "
  "the fine-tuning step itself (task head, the task's sequence length) is not planned"
)


# --------------------------------------------------------------- targets


@dataclasses.dataclass(frozen=True)
class Target:
  spec: str  # As given: "tpu:v5e:2x4", "cuda:h100:8", "cpu:8".
  platform: str  # "tpu", "cuda", "cpu".
  kind: str  # "v5e", "h100", "cpu".
  num_devices: int
  memory_bytes: float  # Per device; for cpu the host's RAM, shared by its fake devices.
  peak_flops: float  # Per device, bf16 dense; 0 = unknown (cpu).
  topology: str = ""  # TPU: "v5e:2x4".


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


def parse_target(spec: str) -> Target:
  platform, _, rest = spec.partition(":")
  if platform == "cpu":
    if rest and not re.fullmatch(r"[1-9]\d*", rest):
      raise UserError(f"--target={spec}: N in cpu:N must be a positive integer (cpu alone: all CPU devices)")
    n = int(rest) if rest else 0
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Target(spec, "cpu", "cpu", n, ram, 0.0)
  if platform == "tpu":
    topology = tpu_topology(rest)
    gen, shape = topology.split(":")
    chips = int(np.prod([int(d) for d in shape.split("x")]))
    chip = hardware.TPUS[gen]
    return Target(spec, "tpu", gen, chips, chip.memory_bytes, chip.peak_flops, topology)
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


def _prefer_cpu_backend() -> None:
  """Compile-only targets must not start a real TPU/GPU backend on this machine."""
  if not os.environ.get("JAX_PLATFORMS"):
    try:
      jax.config.update("jax_platforms", "cpu")
    except Exception:  # noqa: BLE001 - backends already up: they are what they are.
      pass


def target_devices(target: Target) -> list:
  """The devices to compile for (compile-only for tpu / cuda)."""
  _prefer_cpu_backend()
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
    if not os.environ.get("TPU_LIBRARY_PATH"):
      import importlib.util

      if importlib.util.find_spec("libtpu") is None:
        raise UserError("--target=tpu:... needs libtpu: pip install libtpu (or set TPU_LIBRARY_PATH)")
    # One compile-only client per process; other libtpu users on this machine
    # (another planner) must not lock it, and there are no TPU hosts to find.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    dims = [int(d) for d in target.topology.split(":")[1].split("x")]
    per_host = tuple(min(d, 2) for d in dims[:2]) + (1,)
    topo = topologies.get_topology_desc(
      platform="tpu",
      topology_name=target.topology,
      chip_config_name=hardware.TPUS[target.kind].chip_config,
      chips_per_host_bounds=per_host,
      num_slices=1,
    )
    return list(topo.devices)
  try:
    topo = topologies.get_topology_desc(
      platform="cuda", target_config=gpu_target_config(target.kind), topology=f"1x1x{target.num_devices}"
    )
  except Exception as e:  # noqa: BLE001
    raise UserError(
      f"--target={target.spec}: cannot create compile-only CUDA devices ({type(e).__name__}: "
      f"{str(e).splitlines()[0][:200]}); pip install jax-cuda12-plugin=={_jax_version()}"
    ) from e
  return list(topo.devices)


def _jax_version() -> str:
  return jax.__version__


# ---------------------------------------------------------- the program


def _device_bytes(tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the largest shard)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shard = x.sharding.shard_shape(x.shape)
    total += int(np.prod(shard)) * x.dtype.itemsize
  return total


# The TPU compiler's out-of-memory errors, in the two forms libtpu uses.
_OOM_USED = re.compile(r"Used ([\d.]+)([KMGT]?)i?B? of ([\d.]+)([KMGT]?)i?B? hbm", re.I)
_OOM_TEMPS = re.compile(
  r"HLO temporaries \(([\d.]+)([KMGT]?)i?B?\) exceeds available HBM \(([\d.]+)([KMGT]?)i?B?\)", re.I
)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": GiB, "T": 1024**4}


def _parse_oom(message: str) -> tuple[str, float, float] | None:
  """("total" | "temporaries", bytes, bytes available) from a TPU out-of-memory error."""
  for what, pattern in (("total", _OOM_USED), ("temporaries", _OOM_TEMPS)):
    m = pattern.search(message)
    if m:
      return (
        what,
        float(m.group(1)) * _UNITS[m.group(2).upper()],
        float(m.group(3)) * _UNITS[m.group(4).upper()],
      )
  return None


def embedding_layout(config, mesh) -> dict:
  """How wte is sharded, replicated dims, and what padding the vocab to 128 would change."""
  rules = sharding.rules(config)

  def layout(model_cfg):
    abstract = nn.unbox(model_lib.abstract_params(model_cfg))
    specs = model_lib.logical_specs(model_cfg)
    shardings = sharding.logical_to_shardings(specs, abstract, mesh, rules)
    wte, sh = abstract["wte"], shardings["wte"]
    per_device = int(np.prod(sh.shard_shape(wte.shape))) * np.dtype(wte.dtype).itemsize
    undivided = sharding.undivided_dims(specs, abstract, mesh, rules)
    return {
      "shape": list(wte.shape),
      "spec": str(sh.spec),
      "bytes_per_device": per_device,
      "replicated_dims": undivided,
    }

  now = layout(config.model)
  padded_cfg = copy.deepcopy(config.model)
  padded_cfg.vocab_pad_multiple = 128
  out = {"now": now, "vocab_pad_multiple": config.model.vocab_pad_multiple}
  if config.model.vocab_pad_multiple % 128:
    out["padded_128"] = layout(padded_cfg)
  return out


def compile_plan(config, target: Target, devices=None) -> dict:
  """Compiles the train step for `target`; per-device memory, fit and compile time."""
  model_lib.check_platform(config.model, target.platform, f"--target={target.spec}")
  devices = target_devices(target) if devices is None else devices
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.rules(config)
  out = {
    "target": target.spec,
    "devices": len(devices),
    "device_kind": devices[0].device_kind,
    "mesh": {a: int(mesh.shape[a]) for a in sharding.AXES},
    "remat": config.model.remat,
    "scan_layers": bool(config.model.scan_layers),
    "dtype": config.model.dtype,
    "batch_size": config.train.batch_size,
    "grad_accum_steps": config.train.grad_accum_steps,
    "seq_len": config_lib.seq_len(config),
    "sequences_per_device": config.train.batch_size
    // config.train.grad_accum_steps
    // int(mesh.shape["data"] * mesh.shape["fsdp"]),
    # Fake CPU devices share the host's RAM.
    "memory_per_device_bytes": int(target.memory_bytes / (len(devices) if target.platform == "cpu" else 1)),
  }
  # Shapes and shardings outside the mesh context: eager ops (a PRNG key)
  # cannot run on compile-only devices.
  program, batch, _ = pretrain.train_program(config, mesh)
  step, abstract = program.step, program.abstract
  out["params_bytes"] = _device_bytes(abstract.params)
  out["opt_state_bytes"] = _device_bytes(abstract.opt_state)
  with sharding.activate(mesh, rules):
    start = time.perf_counter()
    try:
      lowered = step.lower(abstract, batch)
      compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - the TPU's hard HBM check surfaces as a compile error.
      out["compile_seconds"] = round(time.perf_counter() - start, 1)
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      oom = _parse_oom(str(e))
      out["fits"] = False
      out["note"] = "the TPU compiler ran out of HBM: " + str(e).splitlines()[0][:300]
      if oom is not None:
        what, size, limit = oom
        out["compiler_limit_bytes"] = int(limit)
        if what == "temporaries":
          # At least the temporaries plus the state the step holds.
          out["temp_bytes"] = int(size)
          size += out["params_bytes"] + out["opt_state_bytes"]
        out["needed_bytes"] = int(size)
      return out
    out["compile_seconds"] = round(time.perf_counter() - start, 1)
  mem = compiled.memory_analysis()
  out["argument_bytes"] = int(mem.argument_size_in_bytes)
  out["output_bytes"] = int(mem.output_size_in_bytes)
  out["alias_bytes"] = int(mem.alias_size_in_bytes)
  out["temp_bytes"] = int(mem.temp_size_in_bytes)
  out["code_bytes"] = int(mem.generated_code_size_in_bytes)
  # Donated state aliases its outputs: live at once are the arguments, the
  # outputs that are not written in place, the temporaries and the code.
  needed = (
    out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"] + out["code_bytes"]
  )
  # The TPU compiler also reports its own peak, and for small programs it can
  # put buffers there that temp_size leaves out (0 B of temporaries).
  # (XLA:CPU's "peak" is its arguments alone: not used.)
  peak = int(getattr(mem, "peak_memory_in_bytes", 0) or 0) if target.platform != "cpu" else 0
  if peak:
    out["compiler_peak_bytes"] = peak
  out["needed_bytes"] = max(needed, peak)
  needed = out["needed_bytes"]
  if target.platform == "cpu":
    # Fake devices share the host's RAM; XLA:CPU temporaries are no guide to
    # an accelerator's (different fusion and scheduling).
    out["fits"] = needed <= out["memory_per_device_bytes"]
    out["note"] = "cpu: argument bytes are exact; temporaries are not representative of an accelerator's"
  else:
    out["fits"] = needed <= out["memory_per_device_bytes"]
    if target.platform == "cuda":
      out["note"] = "cuda: XLA's memory plan, compared with the GPU's memory (the compiler does not check it)"
  return out


def xla_flops_per_token(config) -> dict:
  """Train-step FLOPs per token from XLA's cost analysis of lowered, unrolled models.

  A scan body is counted once, so the models are unrolled; lowering (no
  compile) 1 and 2 attention-pattern periods of layers gives the per-layer
  cost, extrapolated linearly to num_layers (layers are identical). Remat is
  off, so this is the model's FLOPs, comparable with the PaLM formula.
  """
  period = len(config.model.attention_pattern)
  seq = config_lib.seq_len(config)
  flops = []
  for layers in (period, 2 * period):
    cfg = copy.deepcopy(config)
    cfg.model.update(num_layers=layers, scan_layers=False, remat="none")
    tx = optim.make_optimizer(cfg)
    step = train.make_train_step(pretrain.lm_loss_fn(cfg.model), tx, optim.lr_schedule(cfg.optim, 10))
    params = jax.eval_shape(lambda m=cfg.model: model_lib.init_params(m, jax.random.key(0)))
    state = jax.eval_shape(lambda p, tx=tx: train.new_state(p, tx, 0), params)
    batch = {"tokens": jax.ShapeDtypeStruct((1, seq + 1), jnp.int32)}
    cost = jax.jit(step).lower(state, batch).cost_analysis()
    flops.append(float(cost["flops"]) / seq)
  per_layer = (flops[1] - flops[0]) / period
  return {"xla_flops_per_token": flops[0] + per_layer * (config.model.num_layers - period)}


def plan_target(config, target: Target, *, cross_check: bool = True) -> dict:
  """plan() + the compiled memory plan for target + embedding layout (+ XLA FLOPs cross-check)."""
  _prefer_cpu_backend()  # Before plan() traces the model, which starts the default backend.
  out = plan(config)
  devices = target_devices(target)
  out.update(compile_plan(config, target, devices))
  out["embedding"] = embedding_layout(config, sharding.make_mesh(config.mesh, devices))
  if cross_check:
    out.update(xla_flops_per_token(config))
  if target.peak_flops:
    out["peak_flops_per_device"] = target.peak_flops
  return out


# --------------------------------------------------------------- suggest


def _with(config, remat: str, seqs_per_device: int, dp: int):
  """config with this remat policy and microbatch (global batch kept, via accumulation)."""
  cfg = copy.deepcopy(config)
  micro = seqs_per_device * dp
  with cfg.unlocked():
    cfg.model.remat = remat
    cfg.train.grad_accum_steps = cfg.train.batch_size // micro
  return cfg


def suggest(config, target: Target, *, saturation_tokens: int = 4096, log=print) -> dict:
  """Searches remat policy x sequences per device; the fastest-looking setting that fits.

  For each policy the per-device microbatch doubles from 1 while it fits and
  divides the per-device batch, then takes the whole per-device batch (the
  global batch stays, made up by gradient accumulation). Ranking: more
  tokens per device until `saturation_tokens` (beyond, an accelerator's
  matmuls are busy and a bigger batch buys little), then less recompute, then
  the larger batch.
  """
  devices = target_devices(target)
  mesh = sharding.make_mesh(config.mesh, devices)
  dp = int(mesh.shape["data"] * mesh.shape["fsdp"])
  seq = config_lib.seq_len(config)
  per_device_max = config.train.batch_size // dp
  if config.train.batch_size % dp:
    raise UserError(
      f"train.batch_size={config.train.batch_size} must be a multiple of data x fsdp = {dp} on {target.spec}"
    )
  # Powers of two that divide the per-device batch, then the whole of it (no accumulation).
  sizes = [b for b in (2**i for i in range(per_device_max.bit_length())) if per_device_max % b == 0]
  sizes += [per_device_max] if per_device_max not in sizes else []
  trials = []
  for remat in REMATS:
    for b in sizes:
      cfg = _with(config, remat, b, dp)
      r = compile_plan(cfg, target, devices)
      trials.append(r)
      log(
        f"  remat={remat:<13} {b:>3} seq/device: "
        + f"{_needed(r):>12}"
        + f" {'fits' if r['fits'] else 'does not fit'} ({r['compile_seconds']:.0f} s)"
      )
      if not r["fits"]:
        break
  best = best_setting(trials, seq, saturation_tokens)
  return {"trials": trials, "best": best, "saturation_tokens": saturation_tokens}


def best_setting(trials: list[dict], seq_len: int, saturation_tokens: int) -> dict | None:
  """The fitting trial with the most tokens per device up to saturation, then the
  least recompute, then the most tokens; None if nothing fits."""
  fitting = [r for r in trials if r["fits"]]
  if not fitting:
    return None

  def score(r):
    tokens = r["sequences_per_device"] * seq_len
    return (min(tokens, saturation_tokens), -REMATS.index(r["remat"]), tokens)

  return max(fitting, key=score)


# ---------------------------------------------------------------- ladder


def ladder(target: Target, overrides: list[str], configs_dir: str, *, log=print) -> list[dict]:
  rows = []
  for rung in RUNGS:
    config = cli.load_config(os.path.join(configs_dir, f"{rung}.py"), overrides)
    config = config_lib.validate(config)
    log(f"  {rung} ...")
    try:
      row = {"rung": rung, **plan_target(config, target, cross_check=False)}
    except ConfigError as e:
      row = {"rung": rung, "error": str(e)}
    rows.append(row)
  return rows


# ---------------------------------------------------------------- output


def _gib(n) -> str:
  """Bytes in the largest binary unit that keeps a digit before the point."""
  for unit, size in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
    if n >= size:
      return f"{n / size:.2f} {unit}"
  return f"{int(n)} B"


def _needed(p: dict) -> str:
  """Bytes needed per device; '>=' when only the TPU compiler's temporaries are known."""
  if "needed_bytes" not in p:
    return "?"
  bound = ">=" if not p["fits"] and "argument_bytes" not in p and "temp_bytes" in p else ""
  return bound + _gib(p["needed_bytes"])


def format_plan(p: dict) -> str:
  shape = (
    f"{p['num_layers']} layers, d_model {p['d_model']}, {p['num_heads']} heads, MLP {p['mlp_width']}, "
    f"vocab {p['vocab_size']} ({p['embedding_rows']} rows), context {p['block_size']}"
  )
  total, non_emb = p["params"], p["non_embedding_params"]
  lines = [
    f"model: {shape}",
    f"params: {total:,} ({total / 1e6:.1f}M)",
    f"non-embedding params: {non_emb:,} ({non_emb / 1e6:.1f}M)",
    f"FLOPs per token (PaLM 6N + 12LHQT, seq {p['seq_len']}): {p['flops_per_token']:.4g}",
  ]
  if "xla_flops_per_token" in p:
    ratio = p["xla_flops_per_token"] / p["flops_per_token"]
    lines.append(
      f"FLOPs per token (XLA cost analysis, unrolled, no remat): {p['xla_flops_per_token']:.4g} "
      f"({ratio:.3f}x the formula)"
    )
  if p.get("job_note"):
    lines.append(f"note: {p['job_note']}")
  if "target" not in p:
    return "\n".join(lines)
  mesh = " x ".join(f"{a}={n}" for a, n in p["mesh"].items())
  lines += [
    f"target: {p['target']} - {p['devices']} x {p['device_kind']}, mesh {mesh}",
    f"step: batch {p['batch_size']} x {p['seq_len']} tokens, {p['grad_accum_steps']} accumulation step(s), "
    f"{p['sequences_per_device']} sequence(s) per device per microbatch, remat {p['remat']}, {p['dtype']}, "
    f"scan_layers {p['scan_layers']}",
    f"per device: params {_gib(p['params_bytes'])}, optimiser state {_gib(p['opt_state_bytes'])}",
  ]
  if "argument_bytes" in p:
    lines.append(
      f"compiled: arguments {_gib(p['argument_bytes'])}, temporaries {_gib(p['temp_bytes'])}, "
      f"outputs not aliased {_gib(p['output_bytes'] - p['alias_bytes'])}, code {_gib(p['code_bytes'])}"
      + (f", compiler peak {_gib(p['compiler_peak_bytes'])}" if "compiler_peak_bytes" in p else "")
    )
  elif "temp_bytes" in p:
    lines.append(f"TPU compiler: temporaries alone {_gib(p['temp_bytes'])}")
  verdict = "FITS" if p["fits"] else "DOES NOT FIT"
  lines.append(
    f"needs {_needed(p)} per device of {_gib(p['memory_per_device_bytes'])}: {verdict} "
    f"(compile {p['compile_seconds']:.1f} s)"
  )
  if p.get("note"):
    lines.append(f"note: {p['note']}")
  emb = p.get("embedding")
  if emb:
    now = emb["now"]
    lines.append(f"embedding wte {now['shape']}: {now['spec']}, {_gib(now['bytes_per_device'])} per device")
    for note in now["replicated_dims"]:
      lines.append(f"  replicated: {note}")
    if "padded_128" in emb:
      pad = emb["padded_128"]
      lines.append(
        f"  with model.vocab_pad_multiple=128: wte {pad['shape']}: {pad['spec']}, "
        f"{_gib(pad['bytes_per_device'])} per device"
        + ("" if pad["replicated_dims"] else ", nothing replicated")
      )
  return "\n".join(lines)


def format_ladder(rows: list[dict]) -> str:
  head = (
    f"{'rung':<12} {'params':>8} {'non-emb':>8} {'GFLOP/tok':>9} {'remat':<13} {'seq/dev':>7} "
    f"{'params':>10} {'opt':>10} {'temp':>10} {'needed':>11}  fits  compile"
  )
  lines = [head, "-" * len(head)]
  for r in rows:
    if "error" in r:
      lines.append(f"{r['rung']:<12} error: {r['error']}")
      continue
    temp = _gib(r["temp_bytes"]) if "temp_bytes" in r else "?"
    lines.append(
      f"{r['rung']:<12} {r['params'] / 1e6:>7.0f}M {r['non_embedding_params'] / 1e6:>7.0f}M "
      f"{r['flops_per_token'] / 1e9:>9.2f} {r['remat']:<13} {r['sequences_per_device']:>7} "
      f"{_gib(r['params_bytes']):>10} {_gib(r['opt_state_bytes']):>10} {temp:>10} {_needed(r):>11}  "
      f"{'yes ' if r['fits'] else 'NO  '}  {r['compile_seconds']:.0f} s"
    )
  if rows and "note" in rows[0]:
    lines.append(f"note: {rows[0]['note']}")
  return "\n".join(lines)


# ------------------------------------------------------------------- CLI


# --ladder's --config.* overrides when no --config=FILE is given: absl knows
# those flags only beside a config file, so they are taken out before parsing.
_LADDER_OVERRIDES: list[str] = []


def split_ladder_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """(argv for absl, --config.* overrides) for `--ladder` without --config; else (argv, [])."""
  has_config = any(a in ("--config", "-config") or a.startswith(("--config=", "-config=")) for a in argv)
  if "--ladder" not in argv or has_config:
    return argv, []
  rest, overrides, i = [], [], 0
  while i < len(argv):
    a = argv[i]
    if a.startswith("--config.") and "=" not in a and i + 1 < len(argv):
      overrides.append(f"{a}={argv[i + 1]}")  # The "--config.FIELD VALUE" form.
      i += 2
      continue
    (overrides if a.startswith("--config.") else rest).append(a)
    i += 1
  return rest, overrides


def cpu_device_flags(argv: list[str], xla_flags: str) -> str:
  """XLA_FLAGS with N fake CPU devices for --target=cpu:N (read when jax first
  lists devices, which the CLI has not done yet), unless already given."""
  targets = [a.split("=", 1)[1] for a in argv if a.startswith("--target=")]
  targets += [b for a, b in zip(argv, argv[1:]) if a == "--target"]
  match = re.fullmatch(r"cpu:([1-9]\d*)", targets[-1]) if targets else None
  if not match or "xla_force_host_platform_device_count" in xla_flags:
    return xla_flags
  return f"{xla_flags} --xla_force_host_platform_device_count={match.group(1)}".strip()


def main(argv) -> None:
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  F = flags.FLAGS
  as_json = F.json
  log = (lambda s: print(s, file=sys.stderr, flush=True)) if as_json else (lambda s: print(s, flush=True))
  if F.ladder:
    if not F.target:
      raise UserError("--ladder needs --target")
    overrides = _LADDER_OVERRIDES or [a for a in sys.argv[1:] if a.startswith("--config.")]
    configs_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    rows = ladder(parse_target(F.target), overrides, configs_dir, log=log)
    print(json.dumps(rows) if as_json else format_ladder(rows), flush=True)
    return
  if F.config is None:
    raise UserError("give --config=FILE (or --ladder --target=...)")
  config = config_lib.validate(F.config)
  if not F.target:
    if F.suggest or F.check:
      raise UserError("--suggest and --check need --target")
    p = plan(config)
    print(json.dumps(p) if as_json else format_plan(p))
    return
  target = parse_target(F.target)
  if F.suggest:
    result = suggest(config, target, log=log)
    best = result["best"]
    if as_json:
      print(json.dumps(result))
    elif best is None:
      print(
        f"nothing fits {target.spec}, not even 1 sequence per device with full remat: add devices or FSDP"
      )
    else:
      print(format_plan({**plan(config), **best}))
      print(
        f"suggested: --config.model.remat={best['remat']} --config.train.grad_accum_steps="
        f"{best['grad_accum_steps']}  ({best['sequences_per_device']} sequences per device per microbatch)"
      )
    if F.check and best is None:
      sys.exit(3)
    return
  p = plan_target(config, target, cross_check=F.cross_check)
  print(json.dumps(p) if as_json else format_plan(p), flush=True)
  if F.check and not p["fits"]:
    print(f"error: does not fit {target.spec}: needs {_needed(p)} per device", file=sys.stderr)
    sys.exit(3)


if __name__ == "__main__":
  # Defined only when run as a program, so importing plan() defines no flags.
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/gpt2_xl.py.")
  flags.DEFINE_bool("json", False, "Print one JSON object instead of text.")
  flags.DEFINE_string(
    "target", "", "tpu:v5e:2x4, tpu:v5litepod-16, cuda:h100[:N], cpu[:N]; empty = shapes only."
  )
  flags.DEFINE_bool("suggest", False, "Search remat policy x per-device batch; print the best that fits.")
  flags.DEFINE_bool(
    "ladder", False, "Plan every rung (configs/gpt*.py) on --target, with the --config.* overrides."
  )
  flags.DEFINE_bool("check", False, "Exit with status 3 if it does not fit (launch/* --preflight).")
  flags.DEFINE_bool("cross_check", True, "Also count FLOPs with XLA's cost analysis of unrolled models.")
  sys.argv, _LADDER_OVERRIDES = split_ladder_overrides(sys.argv)
  os.environ["XLA_FLAGS"] = cpu_device_flags(sys.argv, os.environ.get("XLA_FLAGS", ""))
  cli.run(main)

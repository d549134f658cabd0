"""Ahead-of-time plans of the train step: parameters, FLOPs, per-device memory, the roofline.

`model_plan(config)` gives shapes, parameter counts and FLOPs per token in
about a second (jax.eval_shape; no compile). `compile_plan(config, target)`
compiles the real train step (train.build, which train.run calls: same
shardings, donation, accumulation) for a target's devices (targets.py) from
ShapeDtypeStructs, so no parameter is ever allocated, and reads the
compiler's memory plan per device. `plan_target` adds the embedding layout,
XLA's FLOPs cross-check and the roofline (`step_roofline`).

XLA's cost_analysis counts a scanned layer (and an accumulation loop's
microbatch) once, so FLOPs and HBM bytes come from unrolled compiles of one
and two attention-pattern periods of layers at one microbatch, extrapolated
linearly to the model's depth and the step's microbatches; collective bytes
come from the real (scanned) program's HLO with its loop trip counts
(roofline.py).
"""

from __future__ import annotations

import copy
import re
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax import config as config_lib
from gpt_jax import hardware, metrics, optim, pretrain, roofline, sharding, targets, tpu_attention, train
from gpt_jax import model as model_lib
from gpt_jax.targets import Target

GiB = hardware.GiB


# ------------------------------------------------------------ parameters


def param_counts(model_cfg) -> dict[str, int]:
  """{"params": total, "non_embedding_params": total - wte - position tables} (padded vocab rows
  included): Kaplan et al. (2020) count N without the tables that are looked up."""
  shapes = nn.unbox(model_lib.abstract_params(model_cfg))
  total = model_lib.param_count(shapes)
  embedding = sum(int(np.prod(shapes[k].shape)) for k in ("wte", *model_lib.position_tables(model_cfg)))
  return {"params": total, "non_embedding_params": total - embedding}


_JOB_NOTE = (
  "job={job}: planned as the language-model train step of this model at this batch and seq_len; "
  "the fine-tuning step itself (task head, the task's sequence length) is not planned"
)


def model_plan(config) -> dict:
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


# ---------------------------------------------------------- the program


def _device_bytes(tree, memory_kind: str = "device") -> int:
  """Bytes one device holds in `memory_kind` of a tree of sharded ShapeDtypeStructs (largest shard)."""
  total = 0
  for x in jax.tree.leaves(tree):
    if (x.sharding.memory_kind or "device") == memory_kind:
      total += int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
  return total


# The TPU compiler's out-of-memory errors, in the two forms libtpu uses.
_OOM_USED = re.compile(r"Used ([\d.]+)([KMGT]?)i?B? of ([\d.]+)([KMGT]?)i?B? hbm", re.I)
_OOM_TEMPS = re.compile(
  r"HLO temporaries \(([\d.]+)([KMGT]?)i?B?\) exceeds available HBM \(([\d.]+)([KMGT]?)i?B?\)", re.I
)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": GiB, "T": 1024**4}


def parse_oom(message: str) -> tuple[str, float, float] | None:
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


def _mesh_record(mesh, config) -> dict:
  out = {a: int(mesh.shape[a]) for a in sharding.AXES}
  slices = sharding.num_slices(mesh.devices.flat)
  if slices > 1:
    dcn = sharding.dcn_shape(config.mesh, slices)
    out.update(slices=slices, dcn_data=dcn[0], dcn_fsdp=dcn[1])
  return out


def compile_plan(config, target: Target, devices=None, *, collectives: bool = False) -> dict:
  """Compiles the train step for `target`; per-device memory, fit and compile time
  (+ the collectives of the compiled program per chip and step, when asked)."""
  model_lib.check_platform(config.model, target.platform, f"--target={target.spec}")
  devices = targets.target_devices(target) if devices is None else devices
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.rules(config)
  dp = int(mesh.shape["data"] * mesh.shape["fsdp"])
  out = {
    "target": target.spec,
    "devices": len(devices),
    "device_kind": devices[0].device_kind,
    "mesh": _mesh_record(mesh, config),
    "remat": config.model.remat,
    "attention_impl": config.model.attention_impl,
    "loss_chunk": config.model.loss_chunk,
    "offload_state": bool(config.optim.offload_state),
    "scan_layers": bool(config.model.scan_layers),
    "dtype": config.model.dtype,
    "batch_size": config.train.batch_size,
    "grad_accum_steps": config.train.grad_accum_steps,
    "seq_len": config_lib.seq_len(config),
    "sequences_per_device": config.train.batch_size // config.train.grad_accum_steps // dp,
    # Fake CPU devices share the host's RAM.
    "memory_per_device_bytes": int(target.memory_bytes / (len(devices) if target.platform == "cpu" else 1)),
  }
  # Shapes and shardings outside the mesh context: eager ops (a PRNG key)
  # cannot run on compile-only devices.
  program, batch, _ = pretrain.train_program(config, mesh)
  abstract = program.abstract
  out["params_bytes"] = _device_bytes(abstract.params)
  out["opt_state_bytes"] = _device_bytes(abstract.opt_state)
  out["opt_state_host_bytes"] = _device_bytes(abstract.opt_state, "pinned_host")
  with sharding.activate(mesh, rules):
    start = time.perf_counter()
    try:
      compiled = program.step.lower(abstract, batch).compile()
    except Exception as e:  # noqa: BLE001 - the TPU's hard HBM check surfaces as a compile error.
      out["compile_seconds"] = round(time.perf_counter() - start, 1)
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      _out_of_memory(out, str(e))
      return out
    out["compile_seconds"] = round(time.perf_counter() - start, 1)
  _memory(out, compiled.memory_analysis(), target)
  if collectives:
    out["collectives"] = roofline.collectives(compiled.as_text(), target.num_slices)
  return out


def _out_of_memory(out: dict, message: str) -> None:
  oom = parse_oom(message)
  out["fits"] = False
  out["note"] = "the TPU compiler ran out of HBM: " + message.splitlines()[0][:300]
  if oom is not None:
    what, size, limit = oom
    out["compiler_limit_bytes"] = int(limit)
    if what == "temporaries":
      # At least the temporaries plus the state the step holds.
      out["temp_bytes"] = int(size)
      size += out["params_bytes"] + out["opt_state_bytes"]
    out["needed_bytes"] = int(size)
    out["left_bytes"] = int(limit - size)


def _memory(out: dict, mem, target: Target) -> None:
  """Per-device bytes of a compiled step: what it needs, whether that fits, what is left."""
  for key, field in (
    ("argument_bytes", "argument_size_in_bytes"),
    ("output_bytes", "output_size_in_bytes"),
    ("alias_bytes", "alias_size_in_bytes"),
    ("temp_bytes", "temp_size_in_bytes"),
    ("code_bytes", "generated_code_size_in_bytes"),
    ("host_argument_bytes", "host_argument_size_in_bytes"),
    ("host_output_bytes", "host_output_size_in_bytes"),
    ("host_alias_bytes", "host_alias_size_in_bytes"),
    ("host_temp_bytes", "host_temp_size_in_bytes"),
  ):
    out[key] = int(getattr(mem, field, 0) or 0)
  host = out["host_argument_bytes"] + out["host_temp_bytes"]
  host += out["host_output_bytes"] - out["host_alias_bytes"]
  if host:
    out["host_bytes"] = host
  # Donated state aliases its outputs: live at once are the arguments, the
  # outputs that are not written in place, the temporaries and the code.
  total = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
  total += out["temp_bytes"] + out["code_bytes"]
  # XLA:CPU's "peak" is its arguments alone: not used. The TPU / GPU compiler's
  # peak comes from its heap simulation (for small programs it holds buffers that
  # temp_size leaves out): the larger of the two is taken. With host-memory
  # buffers the peak counts those too, so it says nothing about HBM then.
  peak = int(getattr(mem, "peak_memory_in_bytes", 0) or 0) if target.platform != "cpu" else 0
  if peak:
    out["compiler_peak_bytes"] = peak
  capacity = out["memory_per_device_bytes"]
  if target.platform == "tpu":
    # The TPU compiler checks HBM itself (a plan over it does not compile): it fits.
    out["needed_bytes"] = max(total, peak) if not host else total
    out["fits"] = True
  else:
    out["needed_bytes"] = max(total, peak)
    out["fits"] = out["needed_bytes"] <= capacity
  out["left_bytes"] = int(capacity - out["needed_bytes"])
  if out["offload_state"]:
    # The moments back in HBM: what the step would need without the offload (their
    # bytes added; the update's temporaries are the same either way).
    out["needed_without_offload_bytes"] = out["needed_bytes"] + out["opt_state_host_bytes"]
  if target.platform == "cpu":
    # Fake devices share the host's RAM; XLA:CPU temporaries are no guide to
    # an accelerator's (different fusion and scheduling).
    out["note"] = "cpu: argument bytes are exact; temporaries are not representative of an accelerator's"
  elif target.platform == "cuda":
    out["note"] = "cuda: XLA's memory plan, compared with the GPU's memory (the compiler does not check it)"


# ------------------------------------------------------------- FLOPs and bytes


def _unrolled(config, layers: int, **changes):
  cfg = copy.deepcopy(config)
  with cfg.unlocked():
    cfg.model.update(num_layers=layers, scan_layers=False, **changes)
  return cfg


def xla_flops_per_token(config) -> dict:
  """Train-step FLOPs per token from XLA's cost analysis of lowered, unrolled models.

  Lowering (no compile) 1 and 2 attention-pattern periods of layers gives the
  per-layer cost, extrapolated linearly to num_layers (layers are identical).
  Remat is off, so this is the model's FLOPs, comparable with the PaLM formula.
  """
  period = len(config.model.attention_pattern)
  seq = config_lib.seq_len(config)
  flops = []
  for layers in (period, 2 * period):
    cfg = _unrolled(config, layers, remat="none")
    tx = optim.make_optimizer(cfg)
    step = train.make_train_step(pretrain.lm_loss_fn(cfg.model), tx, optim.lr_schedule(cfg.optim, 10))
    params = jax.eval_shape(lambda m=cfg.model: model_lib.init_params(m, jax.random.key(0)))
    state = jax.eval_shape(lambda p, tx=tx: train.new_state(p, tx, 0), params)
    batch = {"tokens": jax.ShapeDtypeStruct((1, seq + 1), jnp.int32)}
    cost = jax.jit(step).lower(state, batch).cost_analysis()
    flops.append(float(cost["flops"]) / seq)
  per_layer = (flops[1] - flops[0]) / period
  return {"xla_flops_per_token": flops[0] + per_layer * (config.model.num_layers - period)}


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return {"flops": float(cost.get("flops", 0.0)), "bytes": float(cost.get("bytes accessed", 0.0))}


def splash_flops_per_sequence(config) -> float:
  """FLOPs of the splash kernels for one sequence, forward and backward, all layers.

  Pallas kernels are opaque to XLA's cost analysis. Per layer the forward's
  two matmuls (QK^T, PV) cost 4·K·H per visible (query, key) pair, counting
  whole kernel tiles (a tile with any visible pair is computed; masked tiles
  are skipped); the fused backward's five matmuls 2.5x that; full remat runs
  the forward again.
  """
  m = config.model
  T = config_lib.seq_len(config)
  if T % tpu_attention.LANES:
    return 0.0  # The model takes the einsums, which the cost analysis counts.
  from_window = {}
  for window in model_lib.layer_windows(m):
    if window not in from_window:
      b = tpu_attention.block_size(T)
      n = T // b
      w = T if window is None else window
      # Query tile i meets key tile j when some t - s in [0, w) with t in tile i, s in tile j.
      tiles = sum(1 for i in range(n) for j in range(i + 1) if (i - j) * b - (b - 1) < w)
      from_window[window] = tiles * b * b
  pairs = sum(from_window[w] for w in model_lib.layer_windows(m))
  passes = 1 + 2.5 + (1 if m.remat == "full" else 0)
  return 4.0 * m.d_model * pairs * passes


def step_cost(config, target: Target, devices) -> dict:
  """Executed FLOPs and HBM bytes per chip per step, from unrolled compiles at one microbatch.

  The compiled programs include the remat policy's recomputation. The chunked
  loss is compiled as the plain one (its chunk loop would be counted once):
  the head's recomputation is left out and the logits' bytes put in.
  """
  period = len(config.model.attention_pattern)
  costs = []
  for layers in (period, 2 * period):
    cfg = _unrolled(config, layers, loss_chunk=0)
    with cfg.unlocked():
      cfg.train.batch_size //= cfg.train.grad_accum_steps
      cfg.train.grad_accum_steps = 1
    mesh = sharding.make_mesh(cfg.mesh, devices)
    program, batch, _ = pretrain.train_program(cfg, mesh)
    with sharding.activate(mesh, sharding.rules(cfg)):
      costs.append(_cost(program.step.lower(program.abstract, batch).compile()))
  repeats = config.model.num_layers / period - 1
  steps = config.train.grad_accum_steps
  out = {k: steps * (costs[0][k] + repeats * (costs[1][k] - costs[0][k])) for k in ("flops", "bytes")}
  if config.model.attention_impl == "splash":
    out["flops"] += splash_flops_per_sequence(config) * config.train.batch_size / len(devices)
  return out


def step_roofline(config, target: Target, devices, compiled: dict) -> dict:
  """The roofline of a compiled plan (`compile_plan(..., collectives=True)`)."""
  cost = step_cost(config, target, devices)
  comms = compiled.get("collectives", {})
  tokens = config.train.batch_size * config_lib.seq_len(config)
  seq = config_lib.seq_len(config)
  model_flops = metrics.flops_per_token(config.model, seq, param_counts(config.model)["params"])
  est = roofline.estimate(
    target.chip,
    flops=cost["flops"],
    hbm_bytes=cost["bytes"],
    model_flops=model_flops * tokens / len(devices),
    ici_bytes=sum(c["wire_bytes"] for k, c in comms.items() if k != "dcn"),
    dcn_bytes=comms.get("dcn", {}).get("wire_bytes", 0.0),
  )
  return {
    **est,
    "flops_per_chip": cost["flops"],
    "hbm_bytes_per_chip": cost["bytes"],
    "ici_bytes_per_chip": sum(c["wire_bytes"] for k, c in comms.items() if k != "dcn"),
    "dcn_bytes_per_chip": comms.get("dcn", {}).get("wire_bytes", 0.0),
    "collectives": comms,
  }


def plan_target(config, target: Target, *, cross_check: bool = True, with_roofline: bool = True) -> dict:
  """model_plan() + the compiled memory plan for target + embedding layout (+ XLA's FLOPs
  cross-check, + the roofline on TPU / GPU targets whose plan compiles)."""
  targets.prefer_cpu_backend()  # Before model_plan() traces the model, which starts the default backend.
  out = model_plan(config)
  devices = targets.target_devices(target)
  with_roofline = with_roofline and target.platform != "cpu"
  out.update(compile_plan(config, target, devices, collectives=with_roofline))
  out["embedding"] = embedding_layout(config, sharding.make_mesh(config.mesh, devices))
  if cross_check:
    out.update(xla_flops_per_token(config))
  if target.peak_flops:
    out["peak_flops_per_device"] = target.peak_flops
  if with_roofline and "argument_bytes" in out:
    out["roofline"] = step_roofline(config, target, devices, out)
  return out

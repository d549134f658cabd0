"""The planner's search: a mesh, a remat policy and a per-device batch that fit a target.

Candidates, each one compile of the real train step (aot.compile_plan):
- meshes: within a slice, fsdp x tensor over all its chips, with tensor a
  divisor of the heads and of d_model (whole heads per device, at most 16:
  tensor parallelism all-reduces activations every layer); across slices
  (multi-slice targets) data parallelism, dcn_data = the slice count;
- remat policies, least to most recomputation (REMATS; host offload of the
  saved matmuls only on TPU);
- sequences per device per microbatch: the divisors of the per-device batch
  that are powers of two, and the whole of it (the global batch stays, made
  up by gradient accumulation).

Ranking: more tokens per device until `saturation_tokens` (an accelerator's
matmuls are busy by then; a bigger batch buys little), then less
recomputation, then less tensor parallelism, then the larger batch.

What a compile proves prunes the rest. A fitting TPU compile is slow (minutes
for a billion-parameter model), a failing one fast (the compiler stops at its
HBM check), so each mesh first tries the saturating batch under each policy,
least recomputation first, and stops at the first that fits; only if none
does, it bisects the smaller batches with the policy that saves the most
memory and tries the others at the batch found (memory is taken to grow with
the batch and to fall with recomputation). A policy or mesh that cannot beat
the plan found on (tokens, recomputation, tensor) is not compiled. Each
compile's record is kept (compile_cached, in the planner's --cache_dir), so
a repeated search compiles nothing it has compiled before.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import pathlib
import time

import jax

from gpt_jax import aot, sharding, targets
from gpt_jax import config as config_lib
from gpt_jax.errors import UserError
from gpt_jax.targets import Target

# Least to most recomputation. dots_offloaded recomputes what dots_saveable does, keeping the
# saved values in host memory (slower than HBM): after it, before the policies that recompute more.
REMATS = ("none", "dots_saveable", "dots_offloaded", "attention_saveable", "full")
MAX_TENSOR = 16


def mesh_candidates(config, target: Target) -> list[dict]:
  """config.mesh settings to try, least tensor parallelism first."""
  m = config.model
  per_slice = target.num_devices // target.num_slices
  out = []
  for tensor in (t for t in range(1, min(per_slice, MAX_TENSOR) + 1) if per_slice % t == 0):
    if m.num_heads % tensor or m.d_model % tensor:
      continue
    out.append({"data": 1, "fsdp": per_slice // tensor, "tensor": tensor, "dcn_data": -1, "dcn_fsdp": 1})
  return out


def remats(target: Target) -> tuple[str, ...]:
  return REMATS if target.platform == "tpu" else tuple(r for r in REMATS if r != "dots_offloaded")


def _with(config, mesh: dict | None, remat: str, seqs_per_device: int, dp: int):
  """config with this mesh, remat policy and microbatch (global batch kept, via accumulation)."""
  cfg = copy.deepcopy(config)
  with cfg.unlocked():
    if mesh is not None:
      cfg.mesh.update(mesh)
    cfg.model.remat = remat
    cfg.train.grad_accum_steps = cfg.train.batch_size // (seqs_per_device * dp)
  return cfg


def _dp(mesh: dict, target: Target) -> int:
  return mesh["data"] * mesh["fsdp"] * target.num_slices


def batch_sizes(batch_size: int, dp: int) -> list[int]:
  """Sequences per device per microbatch to try: powers of two dividing the per-device batch,
  then the whole of it (no accumulation)."""
  per_device = batch_size // dp
  sizes = [b for b in (2**i for i in range(per_device.bit_length())) if per_device % b == 0]
  return sizes + ([per_device] if per_device not in sizes else [])


def score(r: dict, seq_len: int, saturation_tokens: int) -> tuple:
  tokens = r["sequences_per_device"] * seq_len
  return (min(tokens, saturation_tokens), -REMATS.index(r["remat"]), -r["mesh"]["tensor"], tokens)


def best_setting(trials: list[dict], seq_len: int, saturation_tokens: int) -> dict | None:
  """The fitting trial with the most tokens per device up to saturation, then the least
  recompute, then the least tensor parallelism, then the most tokens; None if nothing fits."""
  fitting = [r for r in trials if r["fits"]]
  return max(fitting, key=lambda r: score(r, seq_len, saturation_tokens)) if fitting else None


@dataclasses.dataclass
class _Progress:
  """One line per compile, with the time so far and an estimate of what is left."""

  log: object
  budget: int  # Compiles the search may still need at most.
  done: int = 0
  started: float = dataclasses.field(default_factory=time.perf_counter)

  def line(self, text: str) -> None:
    self.done += 1
    self.budget = max(self.budget - 1, 0)
    took = time.perf_counter() - self.started
    eta = took / self.done * self.budget
    self.log(f"  [{self.done}] {text} | {_minutes(took)} so far, at most ~{_minutes(eta)} left")


def _minutes(seconds: float) -> str:
  m, s = divmod(round(seconds), 60)
  return f"{m} min {s} s" if m else f"{s} s"


def _versions() -> list[str]:
  """What a compile's result depends on besides config and target: jax, libtpu, this package's code."""
  try:
    libtpu = importlib.metadata.version("libtpu")
  except importlib.metadata.PackageNotFoundError:
    libtpu = ""
  code = hashlib.sha256()
  for path in sorted(pathlib.Path(__file__).parent.glob("*.py")):
    code.update(path.read_bytes())
  return [jax.__version__, libtpu, code.hexdigest()]


def compile_cached(config, target: Target, devices, cache_dir: str = "") -> dict:
  """aot.compile_plan, its record kept in `cache_dir` (plan-<key>.json) under a key of the config,
  the target and _versions(): a repeated search reads what fitted and what did not."""
  if not cache_dir:
    return aot.compile_plan(config, target, devices)
  blob = json.dumps(
    [config.to_dict(), target.spec, target.num_slices, _versions()], sort_keys=True, default=str
  )
  path = os.path.join(cache_dir, f"plan-{hashlib.sha256(blob.encode()).hexdigest()[:40]}.json")
  if os.path.exists(path):
    with open(path) as f:
      return {**json.load(f), "cached": True}
  record = aot.compile_plan(config, target, devices)
  os.makedirs(cache_dir, exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(record, f)
  os.replace(path + ".tmp", path)
  return record


def suggest(
  config,
  target: Target,
  *,
  saturation_tokens: int = 4096,
  search_mesh: bool = True,
  cache_dir: str = "",
  log=print,
) -> dict:
  """Searches mesh x remat policy x sequences per device; the fastest-looking setting that fits.
  cache_dir: where compile_cached keeps each compile's record ('' = none)."""
  devices = targets.target_devices(target)
  seq = config_lib.seq_len(config)
  if search_mesh:
    meshes = mesh_candidates(config, target)
    if not meshes:
      raise UserError(
        f"no fsdp x tensor split of {target.num_devices // target.num_slices} devices divides "
        f"model.num_heads={config.model.num_heads} and model.d_model={config.model.d_model}"
      )
  else:
    shape = sharding.make_mesh(config.mesh, devices).shape
    meshes = [None]
    fixed_dp = int(shape["data"] * shape["fsdp"])
  policies = remats(target)
  plans = []
  for mesh in meshes:
    dp = _dp(mesh, target) if mesh is not None else fixed_dp
    if config.train.batch_size % dp:
      log(f"  skipped {_mesh_text(mesh)}: train.batch_size={config.train.batch_size} is no multiple of {dp}")
      continue
    sizes = batch_sizes(config.train.batch_size, dp)
    sat = next((i for i, b in enumerate(sizes) if b * seq >= saturation_tokens), len(sizes) - 1)
    plans.append((mesh, dp, sizes, sat))
  if not plans:
    raise UserError(
      f"train.batch_size={config.train.batch_size} splits over none of the meshes tried on {target.spec}"
    )
  # Per mesh at most: every policy at the saturating batch, a bisection below it, every policy again.
  bounds = [2 * len(policies) + (sat + 1).bit_length() for _, _, _, sat in plans]
  progress = _Progress(log, sum(bounds))
  trials: list[dict] = []
  for i, (mesh, dp, sizes, sat) in enumerate(plans):
    compile_fn = lambda cfg: compile_cached(cfg, target, devices, cache_dir)
    _search_mesh(config, mesh, dp, sizes, sat, policies, trials, progress, saturation_tokens, compile_fn)
    progress.budget = sum(bounds[i + 1 :])
  best = best_setting(trials, seq, saturation_tokens)
  seconds = time.perf_counter() - progress.started
  return {"trials": trials, "best": best, "saturation_tokens": saturation_tokens, "seconds": seconds}


def _search_mesh(config, mesh, dp, sizes, sat, policies, trials, progress, saturation, compile_fn):
  """The best (batch, policy) on one mesh, in few compiles that fit (a fitting TPU compile is
  slow, a failing one fast, as the compiler stops at its HBM check).

  1. The saturating batch under each policy, least recompute first: the first that fits is
     this mesh's best (nothing recomputes less at as many tokens).
  2. If none fits there: bisect the batches below with the policy saving the most memory (the
     last), then, at the largest batch it fits, the other policies, least recompute first.
  Policies a plan already found beats on (tokens, recompute, tensor) are not compiled.
  """
  seq = config_lib.seq_len(config)
  tensor = (mesh or config.mesh)["tensor"]

  def worth(remat: str, index: int) -> bool:
    best = best_setting(trials, seq, saturation)
    ceiling = (min(sizes[index] * seq, saturation), -REMATS.index(remat), -tensor)
    return best is None or score(best, seq, saturation)[:3] < ceiling

  def fits(remat: str, index: int) -> bool:
    r = compile_fn(_with(config, mesh, remat, sizes[index], dp))
    trials.append(r)
    took = "cached" if r.get("cached") else f"{r['compile_seconds']:.0f} s"
    progress.line(
      f"{_mesh_text(mesh)} remat={remat:<18} {sizes[index]:>4} seq/device: {_needs(r)} "
      f"{'fits' if r['fits'] else 'does not fit'} ({took})"
    )
    return r["fits"]

  if not worth(policies[0], sat):
    return  # Not even the least recompute at saturation beats the plan found: nothing here can.
  for remat in policies:
    if worth(remat, sat) and fits(remat, sat):
      return
  strongest = policies[-1]
  lo, hi = -1, sat  # sizes[hi] does not fit with any policy; sizes[lo] fits with the strongest.
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if not worth(policies[0], mid) or fits(strongest, mid):  # Smaller batches cannot win either.
      lo = mid
    else:
      hi = mid
  if lo < 0:
    return
  for remat in policies[:-1]:
    if worth(remat, lo) and fits(remat, lo):
      return


def _mesh_text(mesh: dict | None) -> str:
  if mesh is None:
    return "the config's mesh"
  return f"fsdp={mesh['fsdp']:<4} x tensor={mesh['tensor']:<3}"


def _needs(r: dict) -> str:
  if "needed_bytes" not in r:
    return "?"
  return f"needs {r['needed_bytes'] / 2**30:.2f} GiB"

"""The generic training loop: TrainState, pure train / eval steps, and `run`.

`run(config, workdir, task_fn)` trains whatever a `Task` describes
(language-model pretraining in pretrain.py, GPT-1 fine-tuning and DialoGPT
in finetune.py) with the same sharding, checkpoints, metrics and failure
handling. `build` is the one place the jitted train step is made (its
shardings, donation and accumulation): `run`, the planner and the benchmark
all call it, so what the planner compiles is what training runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from etils import epath
from tqdm import tqdm

from gpt_jax import (
  checkpoint,
  errors,
  integrity,
  loading,
  metrics,
  model,
  model_config,
  optim,
  paths,
  ramp,
  sharding,
)
from gpt_jax.errors import ConfigError, UserError


def validate(config) -> None:
  """config.train and config.checkpoint (see configs/base.py)."""
  errors.positive_int(config, "train.batch_size", "train.grad_accum_steps", "train.max_bad_steps")
  errors.non_negative(config, "train.num_steps", "train.seq_len")
  if config.train.batch_size % config.train.grad_accum_steps:
    errors.fail(
      "train.grad_accum_steps",
      config.train.grad_accum_steps,
      f"must divide train.batch_size={config.train.batch_size}",
    )
  if config.train.seq_len > config.model.block_size:
    errors.fail(
      "train.seq_len", config.train.seq_len, f"must be <= model.block_size={config.model.block_size}"
    )
  errors.non_negative(config, "train.batch_ramp_start", "train.batch_ramp_tokens")
  if config.train.batch_ramp_tokens:
    if not 0 < config.train.batch_ramp_start <= config.train.batch_size:
      errors.fail(
        "train.batch_ramp_start",
        config.train.batch_ramp_start,
        f"must be in [1, train.batch_size={config.train.batch_size}] with train.batch_ramp_tokens > 0",
      )
    if not optim.uses_tokens(config.optim):
      errors.fail(
        "train.batch_ramp_tokens",
        config.train.batch_ramp_tokens,
        "needs the learning-rate schedule in tokens (optim.warmup_tokens / optim.decay_tokens > 0)",
      )
  errors.positive_int(config, "checkpoint.every_steps", "checkpoint.keep")
  errors.boolean(config, "checkpoint.async_save")


# ----------------------------------------------------------------- state


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # Updates attempted (skipped ones included): the data position.
  params: Any
  opt_state: Any
  rng: jax.Array  # Raw key data (uint32): serialisable, folded with the step.
  bad_in_row: jax.Array  # Consecutive steps skipped for a non-finite loss/gradient.
  skipped: jax.Array  # All skipped steps.


@dataclasses.dataclass
class Task:
  """What a job trains. `loss_fn(params, batch, rng, deterministic)` returns
  (sum of per-token losses, sum of weights, dict of extra sums); the step
  divides by the total weight, so microbatching never changes the result."""

  init_params: Callable[[jax.Array], Any]
  param_specs: Any  # Logical PartitionSpecs, same tree as the params.
  loss_fn: Callable
  train_iter: Any  # Iterator of per-process numpy batches with JSON get_state / set_state.
  # Validation batches: a list, or {name: list} for several sets (reported
  # as eval/<name>/loss each, and eval_loss over all of their tokens).
  eval_batches: list | dict
  meta: dict  # Stored in every checkpoint; compared on resume (e.g. tokenizer fingerprint).
  extra_eval: Callable[[Any], dict] | None = None  # params -> metrics (zero-shot tasks, accuracy).
  # params -> metrics to record at the last step (baselines) or None; also prints (samples).
  finish: Callable[[Any], dict | None] | None = None
  # Commands worth running on the finished run (sample, evaluate, ...), for the end-of-run summary.
  next_steps: tuple[str, ...] = ()
  # Writes what the task keeps in the workdir (its tokenizer), called once nothing can refuse
  # the run any more: a refused command leaves the workdir as it found it.
  pin: Callable[[], None] | None = None
  tokens_per_example: int = 0  # For throughput / MFU; 0 = not a token-level job.
  # shardings -> params for a fresh start, instead of init_params / config.init_from
  # (e.g. pretrained weights reshaped for a fine-tuning head). Closing over loaded
  # weights in init_params would compile them into the program as constants.
  initial_params: Callable[[Any], Any] | None = None


def _microbatches(batch, num: int):
  """[B, ...] -> [num, B/num, ...] taking rows j::num, so every device's local
  rows are split evenly across microbatches (no cross-device reshuffle)."""

  def split(x):
    return x.reshape(x.shape[0] // num, num, *x.shape[1:]).swapaxes(0, 1)

  return jax.tree.map(split, batch)


def make_train_step(loss_fn, tx, schedule, *, grad_accum_steps: int = 1, opt_shardings=None):
  """Pure `train_step(state, batch) -> (state, metrics)`; jit it with donation.

  `opt_shardings` (optimiser state in host memory, `state_shardings(offload_opt=True)`):
  the state's shardings; its moments are brought into device memory for the update
  and written back to host memory after it.
  """

  def grads_of(params, batch, rng):
    def f(p):
      loss_sum, weight, aux = loss_fn(p, batch, rng, False)
      return loss_sum, (weight, aux)

    (loss_sum, (weight, aux)), grads = jax.value_and_grad(f, has_aux=True)(params)
    return grads, loss_sum, weight, aux

  def train_step(state, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if grad_accum_steps == 1:
      grads, loss_sum, weight, aux = grads_of(state.params, batch, rng)
    else:
      # Accumulate summed gradients over microbatches (float32), dividing once
      # by the total weight: identical to one big batch, with the activation
      # memory of one microbatch.
      def body(carry, xs):
        micro, i = xs
        g, l, w, a = grads_of(state.params, micro, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (g, l, w, a)), None

      zeros = jax.eval_shape(
        grads_of, state.params, jax.tree.map(lambda x: x[0], _microbatches(batch, grad_accum_steps)), rng
      )
      zeros = jax.tree.map(
        lambda s: jnp.zeros(s.shape, jnp.float32 if s.dtype == jnp.bfloat16 else s.dtype), zeros
      )
      (grads, loss_sum, weight, aux), _ = jax.lax.scan(
        body, zeros, (_microbatches(batch, grad_accum_steps), jnp.arange(grad_accum_steps))
      )
    weight = jnp.maximum(weight, 1.0)
    grads = jax.tree.map(lambda g: g / weight, grads)
    loss = loss_sum / weight
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    opt_state = state.opt_state
    if opt_shardings is not None:  # Host -> device, after the backward pass has freed its activations.
      opt_state = jax.device_put(
        opt_state, jax.tree.map(lambda s: s.with_memory_kind("device"), opt_shardings)
      )
    updates, new_opt_state = tx.update(grads, opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    # A non-finite step changes nothing but the counters: params and
    # optimiser state (incl. its step count, hence the schedule) stay.
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    new_opt_state = keep(new_opt_state, opt_state)
    if opt_shardings is not None:
      new_opt_state = jax.device_put(new_opt_state, opt_shardings)
    new_state = state.replace(
      step=state.step + 1,
      params=keep(new_params, state.params),
      opt_state=new_opt_state,
      bad_in_row=jnp.where(ok, 0, state.bad_in_row + 1),
      skipped=state.skipped + (~ok).astype(jnp.int32),
    )
    out = {
      "loss": loss,
      "grad_norm": grad_norm,
      "lr": schedule(state.step - state.skipped),
      "ok": ok,
      "bad_in_row": new_state.bad_in_row,
    }
    out.update({k: v / weight for k, v in aux.items()})
    return new_state, out

  return train_step


def make_eval_step(loss_fn):
  def eval_step(params, batch):
    loss_sum, weight, aux = loss_fn(params, batch, jax.random.key(0), True)
    return {"loss_sum": loss_sum, "weight": weight, **aux}

  return eval_step


# --------------------------------------------------------------- state set-up


def state_shardings(task: Task, tx, mesh, axis_rules, seed: int, *, offload_opt: bool = False):
  """(abstract state with shardings, state shardings) — no memory allocated.

  offload_opt: the optimiser's moments live in host memory (memory kind
  "pinned_host"), their HBM freed between steps (optim.offload_state).
  """
  abs_params = jax.eval_shape(task.init_params, jax.random.key(seed))
  param_sh = sharding.logical_to_shardings(task.param_specs, abs_params, mesh, axis_rules)
  abs_opt = jax.eval_shape(tx.init, abs_params)
  rep = sharding.replicated(mesh)
  # Adam moments mirror the params, so they take the params' shardings (FSDP
  # shards the optimiser state too); counters are replicated.
  moment = (lambda _, s: s.with_memory_kind("pinned_host")) if offload_opt else (lambda _, s: s)
  opt_sh = optax.tree_map_params(tx, moment, abs_opt, param_sh, transform_non_params=lambda _: rep)
  scalar = jax.ShapeDtypeStruct((), jnp.int32)
  abstract = TrainState(
    step=scalar,
    params=abs_params,
    opt_state=abs_opt,
    rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
    bad_in_row=scalar,
    skipped=scalar,
  )
  shardings = TrainState(step=rep, params=param_sh, opt_state=opt_sh, rng=rep, bad_in_row=rep, skipped=rep)
  abstract = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )
  return abstract, shardings


def new_state(params, tx, seed):
  zero = jnp.zeros((), jnp.int32)
  return TrainState(
    step=zero,
    params=params,
    opt_state=tx.init(params),
    rng=jax.random.key_data(jax.random.key(seed)),
    bad_in_row=zero,
    skipped=zero,
  )


# The initialisation runs once: on CPU, LLVM's -O0 compiles its many random
# draws in a quarter of the time (3.6 s -> 0.9 s for the 2-layer debug model).
_CPU_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def init_state(task: Task, tx, shardings, seed: int, params=None):
  """Initialised directly into its shardings (no host copy of the full model)."""
  if params is None:
    init = lambda: new_state(task.init_params(jax.random.key(seed)), tx, seed)
    lowered = jax.jit(init, out_shardings=shardings).lower()
    on_cpu = all(d.platform == "cpu" for d in jax.tree.leaves(shardings)[0].device_set)
    return lowered.compile(compiler_options=_CPU_INIT_COMPILER_OPTIONS if on_cpu else None)()
  return jax.jit(lambda p: new_state(p, tx, seed), in_shardings=(shardings.params,), out_shardings=shardings)(
    params
  )


# ------------------------------------------------------------ the program


@dataclasses.dataclass
class Program:
  """The jitted steps of a run, with the state's abstract shapes and shardings."""

  step: Callable  # jit(train_step): (state, global batch) -> (state, metrics); donates the state.
  eval_step: Callable  # jit(eval_step): (params, global batch) -> sums.
  abstract: TrainState  # ShapeDtypeStructs carrying the target shardings.
  shardings: TrainState
  tx: optax.GradientTransformation
  batch_sharding: jax.sharding.NamedSharding


def check_batch(config, mesh) -> None:
  """The global batch splits into microbatches that data x fsdp and the processes divide."""
  tc = config.train
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  micro = tc.batch_size // tc.grad_accum_steps
  if micro % dp:
    raise ConfigError(
      f"config.train.batch_size={tc.batch_size} / train.grad_accum_steps={tc.grad_accum_steps} = {micro} "
      f"sequences per microbatch must be divisible by mesh data*fsdp = {dp}"
    )
  if tc.batch_size % jax.process_count():
    raise ConfigError(
      f"config.train.batch_size={tc.batch_size} must be divisible by the {jax.process_count()} processes"
    )


def ramp_unit(config, mesh) -> int:
  """Sequences the data iterator yields per step of a batch ramp (train.batch_ramp_tokens): every
  stage's batch is a multiple of it, so data x fsdp, the accumulation steps and the processes
  split each stage evenly. Without a ramp, train.batch_size: one batch a step, as before."""
  tc = config.train
  if not tc.batch_ramp_tokens:
    return tc.batch_size
  return math.lcm(int(mesh.shape["data"] * mesh.shape["fsdp"]) * tc.grad_accum_steps, jax.process_count())


def batch_stages(config, mesh) -> list[ramp.Stage]:
  """The run's batch per step as ramp stages (one stage without a ramp)."""
  tc = config.train
  seq = tc.seq_len or config.model.block_size
  if not tc.batch_ramp_tokens:
    return ramp.stages(tc.batch_size, seq)
  unit = ramp_unit(config, mesh)
  return ramp.stages(tc.batch_size, seq, tc.batch_ramp_start, tc.batch_ramp_tokens, multiple=unit)


def build(task: Task, config, mesh) -> Program:
  """The train and eval steps of `task` on `mesh`, jitted with their shardings and donation.

  Nothing is allocated: the state exists only as ShapeDtypeStructs, so the
  planner can compile the step for devices this machine does not have.
  """
  check_batch(config, mesh)
  # jit compiles one step per distinct batch shape: one per ramp stage (ramp.STAGES + 1 at most).
  stages = batch_stages(config, mesh)
  tx = optim.make_optimizer(config, stages)
  schedule = optim.schedule(config, stages)
  offload = config.optim.offload_state
  abstract, shardings = state_shardings(
    task, tx, mesh, sharding.rules(config), config.train.seed, offload_opt=offload
  )
  batch_sh = sharding.batch_sharding(mesh)
  step = jax.jit(
    make_train_step(
      task.loss_fn,
      tx,
      schedule,
      grad_accum_steps=config.train.grad_accum_steps,
      opt_shardings=shardings.opt_state if offload else None,
    ),
    in_shardings=(shardings, batch_sh),
    out_shardings=(shardings, sharding.replicated(mesh)),
    donate_argnums=0,
  )
  eval_step = jax.jit(make_eval_step(task.loss_fn), in_shardings=(shardings.params, batch_sh))
  return Program(step, eval_step, abstract, shardings, tx, batch_sh)


# ------------------------------------------------------------------ workdir


def check_workdir(config, workdir: str) -> None:
  """Refuses a workdir whose checkpoints were trained with another model shape (reads only)."""
  root = epath.Path(workdir)
  path = root / paths.CONFIG_FILE
  if not path.exists() or not (root / "checkpoints").is_dir():
    return
  old = paths.read_config(path)
  diffs = [
    f"model.{f}: saved {old.model.get(f)!r}, now {config.model[f]!r}"
    for f in model_config.SHAPE_FIELDS
    if old.model.get(f) != config.model[f]
  ]
  if diffs:
    raise UserError(
      f"workdir {workdir} holds a run with another model shape ({'; '.join(diffs)}); use a new --workdir"
    )


def write_config(config, workdir: str) -> None:
  """config.json = this run's resolved config; the one it replaces becomes config.json.previous."""
  if jax.process_index() != 0:
    return
  root = epath.Path(workdir)  # A local path or a URL (gs://...).
  root.mkdir(parents=True, exist_ok=True)
  path = root / paths.CONFIG_FILE
  if path.exists():
    path.replace(root / (paths.CONFIG_FILE + ".previous"))
  paths.write_config(path, config)


def prepare_workdir(config, workdir: str) -> None:
  """Refuses a workdir trained with another model shape, else writes this run's config."""
  check_workdir(config, workdir)
  write_config(config, workdir)


def enable_compilation_cache(config, workdir: str) -> None:
  where = config.train.compilation_cache_dir
  if where == "none":
    return
  # Also in a bucket (JAX opens gs:// through epath): only process 0 writes
  # entries, and a cache there serves every host.
  where = where or os.path.join(workdir, "jax_cache")
  jax.config.update("jax_compilation_cache_dir", where)
  # Cache every compile: even the small CPU programs take seconds to build.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


class _Preemption:
  """SIGTERM (preemption / scancel) -> save at the next step boundary, exit 0.

  One process: a Python handler sets a flag. Several processes: every host
  must save the same step (the save is collective), so the signal is left
  to JAX's preemption service, which `jax.distributed` starts: it sees the
  SIGTERM on any host, tells the others, and `reached_preemption_sync_point`
  turns true on all of them at the same step.
  """

  def __init__(self):
    from jax._src import distributed as jax_distributed

    self.requested = False
    self._old = None
    state = jax_distributed.global_state
    self.coordinated = jax.process_count() > 1 and state.preemption_sync_manager is not None
    if not self.coordinated:
      self._old = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    logging.warning("SIGTERM received: saving a checkpoint at the next step and exiting")
    self.requested = True

  def reached(self, step: int) -> bool:
    """True at the step to save and exit on; called once per step, on every host."""
    if self.coordinated:
      from jax.experimental import multihost_utils

      self.requested = self.requested or multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def restore(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


# --------------------------------------------------------------- evaluation


def _loss_metrics(total: float, weight: float, prefix: str) -> dict:
  loss = total / max(weight, 1.0)
  return {f"{prefix}loss": loss, f"{prefix}perplexity": math.exp(min(loss, 50.0))}


def evaluate_loss(eval_fn, params, batches, mesh) -> dict:
  """eval_loss / eval_perplexity over all batches; with {name: batches} also eval/<name>/loss, ... per set."""
  sets = batches if isinstance(batches, dict) else {"": batches}
  if not any(sets.values()):
    return {}
  out, total, weight = {}, 0.0, 0.0
  for name, set_batches in sets.items():
    set_total, set_weight = 0.0, 0.0
    for b in set_batches:
      sums = eval_fn(params, sharding.global_batch({k: v for k, v in b.items() if k != "index"}, mesh))
      set_total += float(sums["loss_sum"])
      set_weight += float(sums["weight"])
    if len(sets) > 1:
      out.update(_loss_metrics(set_total, set_weight, f"eval/{name}/"))
    total, weight = total + set_total, weight + set_weight
  return {**_loss_metrics(total, weight, "eval_"), **out}


# ----------------------------------------------------------------------- run


def run(config, workdir: str, task_fn: Callable) -> dict:
  """Trains in `workdir` what `task_fn(config, workdir, mesh) -> Task` builds, resuming
  from its newest checkpoint. Returns the final metrics.

  Everything that can refuse the run (the saved model shape, the mesh, the
  batch, the task's data and tokenizer, the checkpoint to resume) is checked
  before config.json is written.
  """
  workdir = paths.run_dir(workdir)
  integrity.quiet_orbax_logs()  # Orbax's INFO lines only with --verbosity.
  check_workdir(config, workdir)
  if config.init_from and checkpoint.latest_step_dir(epath.Path(workdir)) is None:
    loading.check_params_source(config.init_from, config.model)
  mesh = sharding.make_mesh(config.mesh)
  check_batch(config, mesh)
  platform = mesh.devices.flat[0].platform
  model.check_platform(config.model, platform, f"this run's {platform} devices")
  axis_rules = sharding.rules(config)
  with sharding.activate(mesh, axis_rules):
    task = task_fn(config, workdir, mesh)
    enable_compilation_cache(config, workdir)
    program = build(task, config, mesh)
    sharding.log_undivided(task.param_specs, program.abstract.params, mesh, axis_rules)
    manager = checkpoint.make_manager(workdir, config)
    state = _resume_or_init(config, workdir, task, program, manager)
    if int(state.step) >= config.train.num_steps:
      return _already_finished(config, workdir, task, manager, int(state.step))
    if task.pin is not None:
      task.pin()
    write_config(config, workdir)
    loop = _Loop(config, workdir, task, program, manager, mesh, start_step=int(state.step))
    try:
      final = loop.run(state)
    finally:  # Also after an error: its records are the ones worth reading (and uploading).
      loop.writer.close()
    manager.wait_until_finished()
    manager.close()
    if hasattr(task.train_iter, "close"):  # grain worker processes and their shared memory.
      task.train_iter.close()
  return final


def _already_finished(config, workdir, task: Task, manager, step: int) -> dict:
  """A rerun of a finished run: one line, nothing recomputed; its last records as the result."""
  manager.close()
  if hasattr(task.train_iter, "close"):
    task.train_iter.close()
  if jax.process_index() == 0:
    print(
      f"{workdir} has finished: step {step} of train.num_steps={config.train.num_steps} "
      "(raise train.num_steps to train on)",
      flush=True,
    )
  return {**metrics.last_records(workdir), "step": step}


def _resume_or_init(config, workdir, task: Task, program: Program, manager):
  """The newest checkpoint that restores (and was written for this task), else a fresh state."""
  restored = checkpoint.restore_latest(manager, program.abstract, task.train_iter)
  if restored is not None:
    state, meta, step = restored
    for key, want in task.meta.items():
      if key in meta and meta[key] != want:
        raise UserError(
          f"checkpoint {workdir}/checkpoints/{step} was written with {key}={meta[key]!r}, "
          f"but this run has {want!r}; use a new --workdir"
        )
    logging.info("resumed from step %d", step)
    return state
  params = None
  if task.initial_params is not None:
    params = task.initial_params(program.shardings.params)
    check_same_shapes(params, program.abstract.params, "the task's initial params")
  elif config.init_from:
    _, params = loading.load_params(config.init_from, shardings=program.shardings.params)
    check_same_shapes(params, program.abstract.params, config.init_from)
    logging.info("initialised params from %s", config.init_from)
  return init_state(task, program.tx, program.shardings, config.train.seed, params)


def check_same_shapes(params, abstract, source) -> None:
  got = jax.tree.map(lambda x: tuple(x.shape), params)
  want = jax.tree.map(lambda x: tuple(x.shape), abstract)
  if got != want:
    raise UserError(
      f"init_from={source}: its parameter shapes differ from config.model "
      "(set the model fields to the checkpoint's shape)"
    )


def _stop_trace(state, profile_dir):
  """Ends the jax.profiler trace once the traced steps are done; never raises."""
  try:
    jax.block_until_ready(state)
    jax.profiler.stop_trace()
    logging.info("profile written to %s (TensorBoard's profile tab or xprof reads it)", profile_dir)
  except Exception as e:  # noqa: BLE001 - a lost trace must not end the run or hide its error.
    logging.warning("profile: could not finish the trace in %s: %s", profile_dir, e)
  return None


# ---------------------------------------------------------------------- loop


class _Loop:
  """One run's steps: data, the jitted step, and at their intervals logging,
  evaluation and checkpoints. Metrics are read one step late, so the host
  never stalls the device."""

  def __init__(self, config, workdir, task: Task, program: Program, manager, mesh, *, start_step: int):
    self.config, self.workdir, self.task, self.program = config, workdir, task, program
    self.manager, self.mesh = manager, mesh
    self.tc = config.train
    self.is_main = jax.process_index() == 0
    self.writer = metrics.MetricsWriter(workdir, tensorboard=config.log.tensorboard, start_step=start_step)
    self.start = start_step
    self.pending = None  # (step, metrics, row indices) of the newest step, not yet read.
    self.last: dict = {}
    self.tokens_per_step = self.tc.batch_size * task.tokens_per_example
    self.flops_per_step, self.peak = self._flops(program)
    # A batch ramp's steps take stage.batch_size sequences, as stage.batch_size / unit iterator batches.
    self.stages, self.unit = batch_stages(config, mesh), ramp_unit(config, mesh)
    self.sequences_run = 0
    self.started = time.perf_counter()
    self._new_window()

  def _flops(self, program):
    num_params = model.param_count(program.abstract.params)
    seq = self.task.tokens_per_example
    peak, peak_source = metrics.peak_flops(self.config.log.peak_flops)
    flops_tok = metrics.flops_per_token(self.config.model, seq, num_params) if seq else 0.0
    tc, mesh = self.tc, self.mesh
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = tc.batch_size // tc.grad_accum_steps
    logging.info(
      "mesh %s | params %s | global batch %d sequences (%d per data-parallel device; microbatch %d = %d "
      "per device, x %d accumulation steps) | %d tokens/step | %.3g FLOPs/token (PaLM) | peak %s",
      sharding.describe(mesh),
      f"{num_params:,}",
      tc.batch_size,
      tc.batch_size // dp,  # The batch is split over data x fsdp; tensor devices share their rows.
      micro,
      micro // dp,
      tc.grad_accum_steps,
      self.tokens_per_step,
      flops_tok,
      peak_source,
    )
    return flops_tok * self.tokens_per_step, peak

  def _new_window(self):
    self.window_t, self.window_steps, self.window_sequences, self.data_wait = time.perf_counter(), 0, 0, 0.0

  def run(self, state):
    tc, config = self.tc, self.config
    preempt = _Preemption()
    bar = tqdm(
      total=tc.num_steps, initial=self.start, disable=not self.is_main, dynamic_ncols=True, unit="step"
    )
    profile = _Profile(
      config.log.profile_steps, self.start, tc.num_steps, self.writer.files_dir, self.is_main
    )
    try:
      for step in range(self.start, tc.num_steps):
        profile.maybe_start(step)
        state = self._step(state, step)
        done = step + 1
        bar.update(1)
        profile.maybe_stop(state, done)
        if done % config.log.every_steps == 0 or done == tc.num_steps:
          self._log(state, done, bar)
        if (config.eval.every_steps and done % config.eval.every_steps == 0) or done == tc.num_steps:
          self._evaluate(state, done, bar)
        stop = preempt.reached(done)
        if stop or done % config.checkpoint.every_steps == 0 or done == tc.num_steps:
          self._save(state, done)
          if stop:
            self.manager.wait_until_finished()
            logging.warning("saved step %d after SIGTERM; exiting", done)  # On every host.
            break
      self._settle()
    finally:
      bar.close()
      preempt.restore()
      profile.close(state)
      self.manager.wait_until_finished()
    finished = int(state.step) >= tc.num_steps
    if self.task.finish is not None and finished:
      extra = self.task.finish(state.params)
      if extra:
        self.writer.write(int(state.step), extra)
        self.last.update(extra)
    self.last["step"] = int(state.step)
    if self.is_main:
      logging.info(
        "final: %s",
        json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in self.last.items()}),
      )
      if finished:
        self.writer.flush()
        print(self._summary(int(state.step)), flush=True)
    return self.last

  def _summary(self, step: int) -> str:
    """The end-of-run block: what was trained, how well, where it is, what to run next."""
    last, workdir = self.last, self.workdir
    took = time.perf_counter() - self.started
    trained = step - self.start
    lines = [f"finished {workdir}: step {step}, {trained} steps in {_duration(took)} this run"]
    if self.tokens_per_step:
      tokens = self.sequences_run * self.task.tokens_per_example
      lines[0] += f", {tokens / 1e6:.3g}M tokens at {tokens / max(took, 1e-9):,.0f} tokens/s"
    losses = [f"train loss {last['loss']:.4f}"] if "loss" in last else []
    if "eval_loss" in last:
      losses.append(f"validation loss {last['eval_loss']:.4f} (perplexity {last['eval_perplexity']:.1f})")
    if "unigram_loss" in last:
      losses.append(
        f"unigram baseline {last['unigram_loss']:.4f} (perplexity {last['unigram_perplexity']:.1f})"
      )
    if losses:
      lines.append("  " + " | ".join(losses))
    files = [f"checkpoint {workdir}/checkpoints/{step}", f"metrics {self.writer.metrics_path}"]
    if self.writer.curves_path:
      files.append(f"curves {self.writer.curves_path}")
    lines.append("  " + "  ".join(files))
    if self.task.next_steps:
      lines.append("next:")
      lines += [f"  {c}" for c in self.task.next_steps]
    return "\n".join(lines)

  def _step(self, state, step: int):
    t0 = time.perf_counter()
    batch_size = ramp.stage_at(step, self.stages).batch_size
    local = self._next_batch(batch_size)
    self.data_wait += time.perf_counter() - t0
    index = local.pop("index", None)
    local.pop("source", None)  # Which source of a mixture each row came from: not an input of the step.
    state, out = self.program.step(state, sharding.global_batch(local, self.mesh))
    self._settle()  # The previous step's metrics: by now the device is past it.
    self.pending = (step + 1, out, index)
    self.window_steps += 1
    self.window_sequences += batch_size
    self.sequences_run += batch_size
    return state

  def _next_batch(self, batch_size: int) -> dict:
    """This process's rows of a global batch of `batch_size` sequences: one iterator batch, or in a
    ramp batch_size / unit of them, so the iterator's checkpoint is the exact data position."""
    if batch_size == self.unit:
      return next(self.task.train_iter)
    parts = [next(self.task.train_iter) for _ in range(batch_size // self.unit)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def _settle(self) -> dict | None:
    """Reads the pending step's metrics; reports a skipped step; stops after too many in a row."""
    if self.pending is None:
      return None
    step, out, index = self.pending
    self.pending = None
    out = jax.device_get(out)
    if not out["ok"]:
      logging.warning(
        "step %d: non-finite loss/gradient, update skipped (%d in a row); data windows %s",
        step,
        out["bad_in_row"],
        None if index is None else index.tolist(),
      )
    if out["bad_in_row"] >= self.tc.max_bad_steps:
      raise UserError(
        f"{out['bad_in_row']} consecutive non-finite steps (train.max_bad_steps="
        f"{self.tc.max_bad_steps}) at step {step}; the last good checkpoint is kept in {self.workdir}"
      )
    return out

  def _log(self, state, done: int, bar) -> None:
    values = self._settle()
    elapsed = time.perf_counter() - self.window_t
    record = {k: float(v) for k, v in values.items() if k not in ("ok", "bad_in_row")}
    record["skipped_steps"] = int(jax.device_get(state.skipped))
    record["steps_per_sec"] = self.window_steps / elapsed
    if self.tokens_per_step:
      full_steps = self.window_sequences / self.tc.batch_size  # Ramp steps are smaller.
      record["tokens_per_sec"] = self.tokens_per_step * full_steps / elapsed
      record["mfu"] = self.flops_per_step * full_steps / elapsed / self.peak
    if self.tc.batch_ramp_tokens:
      record["batch_size"] = self.window_sequences / self.window_steps
    record["data_wait_fraction"] = self.data_wait / elapsed
    self.writer.write(done, record)
    bar.set_postfix(
      loss=f"{record['loss']:.3f}", tok_s=f"{record.get('tokens_per_sec', 0):.0f}", refresh=False
    )
    self.last.update(record)
    self._new_window()

  def _evaluate(self, state, done: int, bar) -> None:
    self._settle()
    t_eval = time.perf_counter()
    ev = evaluate_loss(self.program.eval_step, state.params, self.task.eval_batches, self.mesh)
    if self.task.extra_eval is not None:
      ev.update(self.task.extra_eval(state.params))
    if ev:
      self.writer.write(done, ev)
      self.last.update(ev)
    if ev and self.is_main:
      bar.write(f"step {done}: " + ", ".join(f"{k} {v:.4g}" for k, v in ev.items()))
    self.window_t += time.perf_counter() - t_eval  # Evaluation time counts in no throughput window.

  def _save(self, state, done: int) -> None:
    self._settle()
    checkpoint.save(self.manager, done, state, self.task.train_iter, self.task.meta, force=True)


def _duration(seconds: float) -> str:
  m, s = divmod(round(seconds), 60)
  return f"{m} min {s} s" if m else f"{seconds:.1f} s"


class _Profile:
  """A jax.profiler trace of `num_steps` steps, from the third on when the run is long enough."""

  def __init__(self, num_steps: int, start: int, end: int, files_dir: str, is_main: bool):
    self.num_steps = num_steps if is_main else 0
    self.at = start + min(2, max(end - start - 1, 0))
    self.files_dir = files_dir
    self.dir = None

  def maybe_start(self, step: int) -> None:
    if self.num_steps and step == self.at:
      self.dir = os.path.join(self.files_dir, "profile")  # A URL workdir gets a copy.
      jax.profiler.start_trace(self.dir)

  def maybe_stop(self, state, done: int) -> None:
    if self.dir and done == self.at + self.num_steps:
      self.dir = _stop_trace(state, self.dir)

  def close(self, state) -> None:
    if self.dir:  # The run ended (or stopped) inside the traced steps.
      self.dir = _stop_trace(state, self.dir)

"""TrainState, the pure train / eval steps, and the training loop.

The loop is generic over a `Task` (what is trained: language-model
pretraining here, GPT-1 fine-tuning and DialoGPT in finetune.py): the same
sharding, checkpoints, metrics and failure handling serve every job.
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
import optax
from absl import logging
from etils import epath
from tqdm import tqdm

from gpt_jax import checkpoint, metrics, model, optim, sharding
from gpt_jax import config as config_lib
from gpt_jax.config import UserError

# Fields that fix the parameter shapes / layout: a workdir whose saved config
# differs in any of them is refused rather than silently retrained.
SHAPE_FIELDS = (
  "vocab_size",
  "block_size",
  "num_layers",
  "num_heads",
  "d_model",
  "mlp_ratio",
  "norm_position",
  "vocab_pad_multiple",
  "scan_layers",
)


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
  train_iter: Any  # Checkpointable grain iterator of per-process numpy batches.
  eval_batches: list
  meta: dict  # Stored in every checkpoint; compared on resume (e.g. tokenizer fingerprint).
  extra_eval: Callable[[Any], dict] | None = None  # params -> metrics (zero-shot tasks, accuracy).
  finish: Callable[[Any], None] | None = None  # params -> None, at the end (samples, baselines).
  tokens_per_example: int = 0  # For throughput / MFU; 0 = not a token-level job.
  # shardings -> params for a fresh start, instead of init_params / config.init_from
  # (e.g. pretrained weights reshaped for a fine-tuning head). Closing over loaded
  # weights in init_params would compile them into the program as constants.
  initial_params: Callable[[Any], Any] | None = None


def lm_loss_fn(model_cfg):
  """Next-token cross-entropy over `batch["tokens"]` [B, T+1], float32."""
  gpt = model.GPT(model_cfg)

  def loss_fn(params, batch, rng, deterministic):
    tokens_BT1 = batch["tokens"]
    logits_BTV = gpt.apply(
      {"params": params}, tokens_BT1[:, :-1], deterministic=deterministic, rngs={"dropout": rng}
    )
    nll_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, tokens_BT1[:, 1:])
    mask_BT = batch.get("mask", jnp.ones_like(nll_BT))
    return (nll_BT * mask_BT).sum(), mask_BT.sum(), {}

  return loss_fn


def _microbatches(batch, num: int):
  """[B, ...] -> [num, B/num, ...] taking rows j::num, so every device's local
  rows are split evenly across microbatches (no cross-device reshuffle)."""

  def split(x):
    return x.reshape(x.shape[0] // num, num, *x.shape[1:]).swapaxes(0, 1)

  return jax.tree.map(split, batch)


def make_train_step(loss_fn, tx, schedule, *, grad_accum_steps: int = 1):
  """Pure `train_step(state, batch) -> (state, metrics)`; jit it with donation."""

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
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    # A non-finite step changes nothing but the counters: params and
    # optimiser state (incl. its step count, hence the schedule) stay.
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    new_state = state.replace(
      step=state.step + 1,
      params=keep(new_params, state.params),
      opt_state=keep(new_opt_state, state.opt_state),
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


def state_shardings(task: Task, tx, mesh, axis_rules, seed: int):
  """(abstract state with shardings, state shardings) — no memory allocated."""
  abs_params = jax.eval_shape(task.init_params, jax.random.key(seed))
  param_sh = sharding.logical_to_shardings(task.param_specs, abs_params, mesh, axis_rules)
  abs_opt = jax.eval_shape(tx.init, abs_params)
  rep = sharding.replicated(mesh)
  # Adam moments mirror the params, so they take the params' shardings (FSDP
  # shards the optimiser state too); counters are replicated.
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, abs_opt, param_sh, transform_non_params=lambda _: rep)
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


def _new_state(params, tx, seed):
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
    init = lambda: _new_state(task.init_params(jax.random.key(seed)), tx, seed)
    lowered = jax.jit(init, out_shardings=shardings).lower()
    on_cpu = all(d.platform == "cpu" for d in jax.tree.leaves(shardings)[0].device_set)
    return lowered.compile(compiler_options=_CPU_INIT_COMPILER_OPTIONS if on_cpu else None)()
  return jax.jit(
    lambda p: _new_state(p, tx, seed), in_shardings=(shardings.params,), out_shardings=shardings
  )(params)


# ------------------------------------------------------------------ workdir


def prepare_workdir(config, workdir: str) -> None:
  """Writes the resolved config; refuses a workdir trained with another model shape."""
  if jax.process_index() != 0:
    return
  root = epath.Path(workdir)  # A local path or a URL (gs://...).
  root.mkdir(parents=True, exist_ok=True)
  path = root / checkpoint.CONFIG_FILE
  if path.exists():
    old = checkpoint.load_config_file(path)
    diffs = [
      f"model.{f}: saved {old.model.get(f)!r}, now {config.model[f]!r}"
      for f in SHAPE_FIELDS
      if old.model.get(f) != config.model[f]
    ]
    if diffs and (root / "checkpoints").is_dir():
      raise UserError(
        f"workdir {workdir} holds a run with another model shape ({'; '.join(diffs)}); use a new --workdir"
      )
    path.replace(root / (checkpoint.CONFIG_FILE + ".previous"))
  checkpoint.write_config_file(path, config)


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


# ---------------------------------------------------------------------- loop


def evaluate_loss(eval_fn, params, batches, mesh) -> dict:
  if not batches:
    return {}
  total, weight = 0.0, 0.0
  for b in batches:
    out = eval_fn(params, sharding.global_batch({k: v for k, v in b.items() if k != "index"}, mesh))
    total += float(out["loss_sum"])
    weight += float(out["weight"])
  loss = total / max(weight, 1.0)
  return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


def run(config, workdir: str, task_fn: Callable | None = None) -> dict:
  """Trains `config` in `workdir`, resuming from its newest checkpoint.

  `task_fn(config, workdir, mesh) -> Task` builds what is trained; default:
  language-model pretraining (`pretrain_task`). Returns the final metrics.
  """
  workdir = checkpoint.run_dir(workdir)
  metrics.quiet_library_logs()
  prepare_workdir(config, workdir)
  enable_compilation_cache(config, workdir)
  mesh = sharding.make_mesh(config.mesh)
  axis_rules = sharding.rules(config)
  tc = config.train
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  micro = tc.batch_size // tc.grad_accum_steps
  if micro % dp:
    raise config_lib.ConfigError(
      f"config.train.batch_size={tc.batch_size} / train.grad_accum_steps={tc.grad_accum_steps} = {micro} "
      f"sequences per microbatch must be divisible by mesh data*fsdp = {dp}"
    )
  if tc.batch_size % jax.process_count():
    raise config_lib.ConfigError(
      f"config.train.batch_size={tc.batch_size} must be divisible by the {jax.process_count()} processes"
    )

  with sharding.activate(mesh, axis_rules):
    task = (task_fn or pretrain_task)(config, workdir, mesh)
    tx = optim.make_optimizer(config)
    schedule = optim.lr_schedule(config.optim, tc.num_steps)
    abstract, shardings = state_shardings(task, tx, mesh, axis_rules, tc.seed)
    sharding.log_undivided(task.param_specs, abstract.params, mesh, axis_rules)
    manager = checkpoint.make_manager(workdir, config)
    restored = checkpoint.restore_latest(manager, abstract, task.train_iter)
    if restored is not None:
      state, meta, step = restored
      for key, want in task.meta.items():
        if key in meta and meta[key] != want:
          raise UserError(
            f"checkpoint {workdir}/checkpoints/{step} was written with {key}={meta[key]!r}, "
            f"but this run has {want!r}; use a new --workdir"
          )
      logging.info("resumed from step %d", step)
    else:
      params = None
      if task.initial_params is not None:
        params = task.initial_params(shardings.params)
        check_same_shapes(params, abstract.params, "the task's initial params")
      elif config.init_from:
        _, params = checkpoint.load_params(config.init_from, shardings=shardings.params)
        check_same_shapes(params, abstract.params, config.init_from)
        logging.info("initialised params from %s", config.init_from)
      state = init_state(task, tx, shardings, tc.seed, params)

    num_params = model.param_count(abstract.params)
    seq = task.tokens_per_example
    tokens_per_step = tc.batch_size * seq
    peak, peak_source = metrics.peak_flops(config.log.peak_flops)
    flops_tok = metrics.flops_per_token(config.model, seq, num_params) if seq else 0.0
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
      tokens_per_step,
      flops_tok,
      peak_source,
    )

    step_fn = jax.jit(
      make_train_step(task.loss_fn, tx, schedule, grad_accum_steps=tc.grad_accum_steps),
      in_shardings=(shardings, sharding.batch_sharding(mesh)),
      out_shardings=(shardings, sharding.replicated(mesh)),
      donate_argnums=0,
    )
    eval_fn = jax.jit(
      make_eval_step(task.loss_fn), in_shardings=(shardings.params, sharding.batch_sharding(mesh))
    )
    writer = metrics.MetricsWriter(workdir, tensorboard=config.log.tensorboard, start_step=int(state.step))
    try:
      final = _loop(
        config,
        workdir,
        task,
        state,
        step_fn,
        eval_fn,
        manager,
        writer,
        mesh,
        tokens_per_step=tokens_per_step,
        flops_per_step=flops_tok * tokens_per_step,
        peak=peak,
      )
    finally:  # Also after an error: its records are the ones worth reading (and uploading).
      writer.close()
    manager.wait_until_finished()
    manager.close()
    if hasattr(task.train_iter, "close"):  # grain worker processes and their shared memory.
      task.train_iter.close()
  return final


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


def _loop(
  config,
  workdir,
  task,
  state,
  step_fn,
  eval_fn,
  manager,
  writer,
  mesh,
  *,
  tokens_per_step,
  flops_per_step,
  peak,
):
  tc = config.train
  start = int(state.step)
  is_main = jax.process_index() == 0
  preempt = _Preemption()
  bar = tqdm(total=tc.num_steps, initial=start, disable=not is_main, dynamic_ncols=True, unit="step")
  pending = None  # (step, metrics, row indices): read one step late, so the host never stalls the device.
  window_t, window_steps, data_wait = time.perf_counter(), 0, 0.0
  last = {}
  profile_dir = None
  # The trace skips the compiling first steps when the run is long enough.
  profile_at = start + min(2, max(tc.num_steps - start - 1, 0))

  def settle(pending):
    step, out, index = pending
    out = jax.device_get(out)
    if not out["ok"]:
      logging.warning(
        "step %d: non-finite loss/gradient, update skipped (%d in a row); data windows %s",
        step,
        out["bad_in_row"],
        None if index is None else index.tolist(),
      )
    if out["bad_in_row"] >= tc.max_bad_steps:
      raise UserError(
        f"{out['bad_in_row']} consecutive non-finite steps (train.max_bad_steps="
        f"{tc.max_bad_steps}) at step {step}; the last good checkpoint is kept in {workdir}"
      )
    return out

  try:
    for step in range(start, tc.num_steps):
      if config.log.profile_steps and step == profile_at and is_main:
        profile_dir = os.path.join(writer.files_dir, "profile")  # A URL workdir gets a copy.
        jax.profiler.start_trace(profile_dir)
      t0 = time.perf_counter()
      local = next(task.train_iter)
      data_wait += time.perf_counter() - t0
      index = local.pop("index", None)
      state, out = step_fn(state, sharding.global_batch(local, mesh))
      if pending is not None:
        settle(pending)
      pending = (step + 1, out, index)
      window_steps += 1
      done = step + 1
      bar.update(1)
      if profile_dir and done == profile_at + config.log.profile_steps:
        profile_dir = _stop_trace(state, profile_dir)

      if done % config.log.every_steps == 0 or done == tc.num_steps:
        values = settle(pending)
        pending = None
        elapsed = time.perf_counter() - window_t
        record = {k: float(v) for k, v in values.items() if k not in ("ok", "bad_in_row")}
        record["skipped_steps"] = int(jax.device_get(state.skipped))
        record["steps_per_sec"] = window_steps / elapsed
        if tokens_per_step:
          record["tokens_per_sec"] = tokens_per_step * window_steps / elapsed
          record["mfu"] = flops_per_step * window_steps / elapsed / peak
        record["data_wait_fraction"] = data_wait / elapsed
        writer.write(done, record)
        bar.set_postfix(
          loss=f"{record['loss']:.3f}", tok_s=f"{record.get('tokens_per_sec', 0):.0f}", refresh=False
        )
        last.update(record)
        window_t, window_steps, data_wait = time.perf_counter(), 0, 0.0

      want_eval = config.eval.every_steps and done % config.eval.every_steps == 0
      if want_eval or done == tc.num_steps:
        if pending is not None:
          settle(pending)
          pending = None
        t_eval = time.perf_counter()
        ev = evaluate_loss(eval_fn, state.params, task.eval_batches, mesh)
        if task.extra_eval is not None:
          ev.update(task.extra_eval(state.params))
        if ev:
          writer.write(done, ev)
          last.update(ev)
        if ev and is_main:
          bar.write(f"step {done}: " + ", ".join(f"{k} {v:.4g}" for k, v in ev.items()))
        window_t += time.perf_counter() - t_eval  # Evaluation time counts in no throughput window.

      stop = preempt.reached(done)
      if stop or done % config.checkpoint.every_steps == 0 or done == tc.num_steps:
        if pending is not None:
          settle(pending)
          pending = None
        checkpoint.save(manager, done, state, task.train_iter, task.meta, force=True)
        if stop:
          manager.wait_until_finished()
          logging.warning("saved step %d after SIGTERM; exiting", done)  # On every host.
          break
    if pending is not None:
      settle(pending)
  finally:
    bar.close()
    preempt.restore()
    if profile_dir:  # The run ended (or stopped) inside the traced steps.
      _stop_trace(state, profile_dir)
    manager.wait_until_finished()
  if task.finish is not None and int(state.step) >= tc.num_steps:
    task.finish(state.params)
  last["step"] = int(state.step)
  if is_main:
    logging.info(
      "final: %s", json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in last.items()})
    )
  return last


# --------------------------------------------------------------- pretraining


def pretrain_task(config, workdir: str, mesh) -> Task:
  """Language-model pretraining on config.data with the run's tokenizer."""
  from gpt_jax import data
  from gpt_jax import tokenizer as tokenizer_lib

  config_lib.check_run_inputs(config)
  tok = tokenizer_lib.for_run(config, workdir)  # Refuses a vocabulary larger than the model's.
  pi, pc = jax.process_index(), jax.process_count()
  train_iter = data.make_train_iterator(config, tok, workdir, process_index=pi, process_count=pc)
  eval_bs = config.eval.batch_size or config.train.batch_size
  eval_batches = data.make_eval_batches(
    config,
    tok,
    workdir,
    process_index=pi,
    process_count=pc,
    batch_size=eval_bs,
    num_batches=config.eval.num_batches,
  )
  data.check_same_on_every_process(data.prepare_cache(config, tok, workdir, process_index=pi))

  extra_eval = None
  if config.eval.tasks:
    from gpt_jax import evaluate

    def extra_eval(params):
      results = evaluate.run_tasks(config.model, params, tok, list(config.eval.tasks), batch_size=eval_bs)
      return {
        f"{name}/{k}": v
        for name, m in results.items()
        for k, v in m.items()
        if isinstance(v, int | float) and not k.endswith("_stderr")
      }

  def finish(params):
    main = jax.process_index() == 0
    if main:
      baseline = data.unigram_loss(config, tok, workdir)
      logging.info("unigram baseline on the validation tokens: %.4f nats/token", baseline)
      print(f"unigram baseline (validation): {baseline:.4f} nats/token", flush=True)
    s = config.sample
    if s.num_samples > 0:
      from gpt_jax import sample

      # Every process samples: the parameters are sharded over all of them.
      prompts = [s.prompt] * s.num_samples
      texts = sample.generate_text(
        config.model,
        params,
        tok,
        prompts,
        max_new_tokens=s.max_new_tokens,
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p,
        seed=config.train.seed,
      )
      for i, text in enumerate(texts if main else []):
        print(f"--- sample {i + 1} ---\n{s.prompt}{text}", flush=True)

  return Task(
    init_params=lambda rng: model.init_params(config.model, rng),
    param_specs=model.logical_specs(config.model),
    loss_fn=lm_loss_fn(config.model),
    train_iter=train_iter,
    eval_batches=eval_batches,
    meta={"tokenizer": tok.fingerprint},
    extra_eval=extra_eval,
    finish=finish,
    tokens_per_example=config_lib.seq_len(config),
  )

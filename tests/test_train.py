"""Training core: sharded steps, accumulation, non-finite handling, checkpoints, resume."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax import checkpoint, loading, model, optim, pretrain, ramp, sharding, train
from gpt_jax.errors import ConfigError, UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tokens(config, rows=64, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, config.model.vocab_size, size=(rows, config.model.block_size + 1)).astype(np.int32)


def _fake_task(data, batch_size, loss_fn=None):
  def task_fn(config, workdir, mesh):
    ds = grain.MapDataset.source(data).shuffle(seed=0).repeat().batch(batch_size)
    return train.Task(
      init_params=lambda r: model.init_params(config.model, r),
      param_specs=model.logical_specs(config.model),
      loss_fn=loss_fn or pretrain.lm_loss_fn(config.model),
      train_iter=iter(ds.map(lambda x: {"tokens": x}).to_iter_dataset()),
      eval_batches=[{"tokens": data[:batch_size]}],
      meta={"tokenizer": "fake"},
      tokens_per_example=config.model.block_size,
    )

  return task_fn


def _losses(config, mesh_axes, batches, devices, grad_accum=1):
  """Runs len(batches) train steps on a mesh and returns losses and final params."""
  config = config.copy_and_resolve_references()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh_axes
  config.train.grad_accum_steps = grad_accum
  mesh = sharding.make_mesh(config.mesh, devices)
  axis_rules = sharding.rules(config)
  task = _fake_task(batches[0], len(batches[0]))(config, "", mesh)
  with sharding.activate(mesh, axis_rules):
    tx = optim.make_optimizer(config)
    abstract, shardings = train.state_shardings(task, tx, mesh, axis_rules, 0)
    state = train.init_state(task, tx, shardings, 0)
    step = jax.jit(
      train.make_train_step(
        task.loss_fn, tx, optim.lr_schedule(config.optim, 10), grad_accum_steps=grad_accum
      ),
      in_shardings=(shardings, sharding.batch_sharding(mesh)),
      out_shardings=(shardings, sharding.replicated(mesh)),
    )
    losses = []
    for b in batches:
      state, out = step(state, sharding.global_batch({"tokens": b}, mesh))
      losses.append(float(out["loss"]))
  return np.array(losses), jax.device_get(state.params)


@pytest.fixture
def three_batches(debug_config):
  data = _tokens(debug_config, rows=24)
  return [data[i * 8 : (i + 1) * 8] for i in range(3)]


@pytest.mark.parametrize("axes", [(8, 1, 1), (1, 8, 1), (2, 2, 2)], ids=["data8", "fsdp8", "d2f2t2"])
def test_sharded_losses_equal_single_device(debug_config, three_batches, axes):
  ref, ref_params = _losses(debug_config, (1, 1, 1), three_batches, jax.devices()[:1])
  got, params = _losses(debug_config, axes, three_batches, jax.devices())
  np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
  assert ref[2] < ref[0]  # The steps actually train.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), params, ref_params)


def test_grad_accumulation_equals_full_batch(debug_config, three_batches):
  full, full_params = _losses(debug_config, (2, 1, 1), three_batches, jax.devices()[:2])
  acc, acc_params = _losses(debug_config, (2, 1, 1), three_batches, jax.devices()[:2], grad_accum=4)
  np.testing.assert_allclose(acc, full, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), acc_params, full_params)


def test_fsdp_shards_params_and_optimizer_state(debug_config):
  debug_config.mesh.update(data=1, fsdp=8, tensor=1)
  mesh = sharding.make_mesh(debug_config.mesh)
  task = _fake_task(_tokens(debug_config), 8)(debug_config, "", mesh)
  tx = optim.make_optimizer(debug_config)
  _, shardings = train.state_shardings(task, tx, mesh, sharding.rules(debug_config), 0)
  # c_fc kernel [D=32, F=128]: embed over fsdp.
  assert shardings.params["block_0"]["mlp"]["c_fc"]["kernel"].spec[0] == "fsdp"
  mu = shardings.opt_state[1][0].mu["block_0"]["mlp"]["c_fc"]["kernel"]
  assert mu.spec[0] == "fsdp"


def test_nonfinite_step_is_skipped_and_counted(debug_config, three_batches):
  base = pretrain.lm_loss_fn(debug_config.model)

  def poisoned(params, batch, rng, deterministic):
    loss, w, aux = base(params, batch, rng, deterministic)
    bad = batch["tokens"][0, 0] == -1
    return jnp.where(bad, jnp.nan, loss), w, aux

  mesh = sharding.make_mesh(debug_config.mesh, jax.devices()[:1])
  task = _fake_task(three_batches[0], 8, poisoned)(debug_config, "", mesh)
  tx = optim.make_optimizer(debug_config)
  _, shardings = train.state_shardings(task, tx, mesh, sharding.rules(debug_config), 0)
  state = train.init_state(task, tx, shardings, 0)
  step = jax.jit(train.make_train_step(poisoned, tx, optim.lr_schedule(debug_config.optim, 10)))
  before = jax.device_get(state.params)
  bad = three_batches[0].copy()
  bad[0, 0] = -1
  state, out = step(state, {"tokens": jnp.asarray(bad)})
  assert not bool(out["ok"]) and int(state.skipped) == 1 and int(state.bad_in_row) == 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)
  state, out = step(state, {"tokens": jnp.asarray(three_batches[1])})
  assert bool(out["ok"]) and int(state.bad_in_row) == 0 and int(state.skipped) == 1
  assert int(state.step) == 2


def test_max_bad_steps_stops_with_checkpoint_intact(debug_config, tmp_path):
  sentinel = debug_config.model.vocab_size - 1
  data = _tokens(debug_config, rows=64) % sentinel
  data[24:, 0] = sentinel  # From the 4th batch of 8 (unshuffled) on, every step is poisoned.

  def poisoned(params, batch, rng, deterministic):
    loss, w, aux = pretrain.lm_loss_fn(debug_config.model)(params, batch, rng, deterministic)
    return jnp.where(batch["tokens"][0, 0] == sentinel, jnp.nan, loss), w, aux

  def task_fn(config, workdir, mesh):
    task = _fake_task(data, 8, poisoned)(config, workdir, mesh)
    ds = grain.MapDataset.source(data).batch(8).repeat()
    task.train_iter = iter(ds.map(lambda x: {"tokens": x}).to_iter_dataset())
    return task

  debug_config.train.update(num_steps=20, max_bad_steps=3)
  debug_config.checkpoint.every_steps = 2
  debug_config.eval.every_steps = 0
  with pytest.raises(UserError, match="consecutive non-finite"):
    train.run(debug_config, str(tmp_path), task_fn=task_fn)
  steps = checkpoint.make_manager(str(tmp_path), debug_config).all_steps()
  # Steps 4..6 are skipped; the run stops at the third, before saving step 6.
  assert max(steps) == 4, steps


def test_resume_onto_another_mesh(debug_config, tmp_path):
  debug_config.checkpoint.every_steps = 2
  debug_config.eval.every_steps = 0
  debug_config.train.num_steps = 4
  data = _tokens(debug_config, rows=32)
  ref = train.run(debug_config, str(tmp_path / "ref"), task_fn=_fake_task(data, 8))
  # Stop after 2 steps: both are warmup steps (optim.warmup_steps=2), whose
  # learning rates do not depend on num_steps, so the runs stay comparable.
  debug_config.train.num_steps = 2
  train.run(debug_config, str(tmp_path / "run"), task_fn=_fake_task(data, 8))
  # Continue the same run (same schedule length) on an FSDP x tensor mesh.
  debug_config.train.num_steps = 4
  debug_config.mesh.update(data=1, fsdp=4, tensor=2)
  got = train.run(debug_config, str(tmp_path / "run"), task_fn=_fake_task(data, 8))
  assert got["step"] == 4
  np.testing.assert_allclose(got["loss"], ref["loss"], atol=1e-5)


def test_offloaded_optimizer_state_trains_and_resumes_alike(debug_config, tmp_path):
  """optim.offload_state keeps Adam's moments in host memory (pinned_host): same losses, and
  its checkpoints restore (into host memory again)."""
  debug_config.checkpoint.every_steps = 2
  debug_config.eval.every_steps = 0
  debug_config.train.num_steps = 4
  debug_config.mesh.update(data=2, fsdp=4, tensor=1)
  data = _tokens(debug_config, rows=32)
  ref = train.run(debug_config, str(tmp_path / "ref"), task_fn=_fake_task(data, 8))
  debug_config.optim.offload_state = True
  mesh = sharding.make_mesh(debug_config.mesh)
  task = _fake_task(data, 8)(debug_config, "", mesh)
  program = train.build(task, debug_config, mesh)
  mu = program.shardings.opt_state[1][0].mu["block_0"]["mlp"]["c_fc"]["kernel"]
  assert mu.memory_kind == "pinned_host" and mu.spec[0] == "fsdp"
  assert program.shardings.params["wte"].memory_kind == "device"
  debug_config.train.num_steps = 2
  train.run(debug_config, str(tmp_path / "run"), task_fn=_fake_task(data, 8))
  debug_config.train.num_steps = 4
  got = train.run(debug_config, str(tmp_path / "run"), task_fn=_fake_task(data, 8))
  assert got["step"] == 4
  np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-6)


def test_batch_ramp_follows_its_stages_and_resumes_mid_ramp_bit_identical(debug_config, tmp_path):
  """GPT-3's batch ramp: each step takes its stage's batch (read as unit-sized iterator batches),
  the logged lr is the token schedule at the sequences consumed, and a run stopped inside the
  ramp resumes to exactly the uninterrupted run's parameters."""
  c = debug_config
  c.mesh.update(data=2, fsdp=4, tensor=1)  # Ramp stages are multiples of data x fsdp = 8.
  seq = c.model.block_size
  c.train.update(batch_size=32, batch_ramp_start=8, batch_ramp_tokens=64 * seq, num_steps=8)
  # decay_tokens fixed: the schedule must not depend on where a run stops.
  c.optim.update(warmup_tokens=40 * seq, decay_tokens=1000 * seq)
  c.checkpoint.every_steps = 2
  c.eval.every_steps = 0
  c.log.every_steps = 1
  data = _tokens(c, rows=64)
  mesh = sharding.make_mesh(c.mesh)
  stages = train.batch_stages(c, mesh)
  assert train.ramp_unit(c, mesh) == 8
  assert [(s.first_step, s.batch_size) for s in stages] == [(0, 8), (3, 16), (5, 24), (6, 32)]
  task_fn = lambda config, workdir, mesh: _fake_task(data, train.ramp_unit(config, mesh))(
    config, workdir, mesh
  )
  train.run(c, str(tmp_path / "ref"), task_fn=task_fn)
  rows = [json.loads(line) for line in open(tmp_path / "ref" / "metrics.jsonl")]
  rows = [r for r in rows if "loss" in r]
  assert [r["batch_size"] for r in rows] == [8, 8, 8, 16, 16, 24, 32, 32]
  lr = optim.lr_at_tokens(c.optim, 1000 * seq)
  expected = [float(lr(ramp.sequences_before(s, stages) * seq)) for s in range(8)]
  np.testing.assert_allclose([r["lr"] for r in rows], expected, rtol=1e-6)
  # Stop at step 4, inside the 16-sequence stage, then resume to the end.
  c.train.num_steps = 4
  train.run(c, str(tmp_path / "run"), task_fn=task_fn)
  c.train.num_steps = 8
  train.run(c, str(tmp_path / "run"), task_fn=task_fn)
  assert _metrics(tmp_path / "ref") == _metrics(tmp_path / "run")
  _, p_ref = loading.load_params(str(tmp_path / "ref"))
  _, p_run = loading.load_params(str(tmp_path / "run"))
  jax.tree.map(np.testing.assert_array_equal, p_ref, p_run)


def test_workdir_with_other_model_shape_is_refused(debug_config, tmp_path):
  debug_config.train.num_steps = 2
  debug_config.checkpoint.every_steps = 2
  debug_config.eval.every_steps = 0
  train.run(debug_config, str(tmp_path), task_fn=_fake_task(_tokens(debug_config), 8))
  saved = (tmp_path / "config.json").read_text()
  debug_config.model.d_model = 64
  with pytest.raises(UserError, match="model.d_model"):
    train.run(debug_config, str(tmp_path), task_fn=_fake_task(_tokens(debug_config), 8))
  assert (tmp_path / "config.json").read_text() == saved


def _traces(workdir):
  return sorted(str(p) for p in (Path(workdir) / "profile").rglob("*.xplane.pb"))


def test_profile_ending_with_the_run_is_still_written(debug_config, tmp_path):
  # 3 steps, 5 to trace from step 2: the run ends inside the trace, which must still be closed.
  debug_config.train.num_steps = 3
  debug_config.log.profile_steps = 5
  debug_config.eval.every_steps = 0
  train.run(debug_config, str(tmp_path), task_fn=_fake_task(_tokens(debug_config), 8))
  assert len(_traces(tmp_path)) == 1  # Written only when the trace is stopped.


@pytest.mark.parametrize(
  "field, value, allowed",
  [
    ("train.grad_accum_steps", 3, "must divide train.batch_size=8"),
    ("train.batch_size", 0, "must be a positive integer"),
    ("train.max_bad_steps", 0, "must be a positive integer"),
    ("train.num_steps", -1, "must be a number >= 0"),
    ("train.seq_len", 33, "must be <= model.block_size=32"),
    ("checkpoint.every_steps", 0, "must be a positive integer"),
    ("checkpoint.keep", -1, "must be a positive integer"),
    ("checkpoint.async_save", "yes", "must be True or False"),
  ],
)
def test_validate_names_the_field(debug_config, field, value, allowed):
  section, name = field.split(".")
  with debug_config[section].ignore_type():
    debug_config[section][name] = value
  with pytest.raises(ConfigError) as e:
    train.validate(debug_config)
  assert str(e.value) == f"config.{field}={value!r} is invalid: {allowed}"


# ------------------------------------------------------- end to end (subprocess)


def _main_cmd(workdir, *overrides):
  return [
    sys.executable,
    "-m",
    "gpt_jax.main",
    "--config=configs/debug.py",
    f"--workdir={workdir}",
    "--config.train.num_steps=8",
    "--config.checkpoint.every_steps=4",
    "--config.eval.every_steps=4",
    "--config.log.every_steps=1",
    "--config.sample.num_samples=0",
    "--config.data.max_documents=6",
    "--config.train.compilation_cache_dir=none",
    *overrides,
  ]


def _env():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = ROOT
  return env


def _metrics(workdir):
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
def test_sigkill_resume_is_bit_identical(tmp_path):
  ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
  steps = ["--config.train.num_steps=40"]  # Room to kill the run well before its end.
  # The reference run also traces (--profile: steps 3-7), which must not change its numbers.
  subprocess.run(
    _main_cmd(ref_dir, *steps, "--profile"), cwd=ROOT, env=_env(), check=True, capture_output=True
  )
  assert len(_traces(ref_dir)) == 1
  proc = subprocess.Popen(
    _main_cmd(run_dir, *steps), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  deadline = time.time() + 240
  while not os.path.isdir(os.path.join(run_dir, "checkpoints", "4")) and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL
  killed_at = max(_metrics(run_dir))
  assert killed_at < 40, "the run finished before it was killed: nothing was resumed"
  done = subprocess.run(_main_cmd(run_dir, *steps), cwd=ROOT, env=_env(), capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-2000:]
  resumed = int(re.search(r"resumed from step (\d+)", done.stderr).group(1))
  assert 4 <= resumed <= killed_at and resumed % 4 == 0
  ref, run = _metrics(ref_dir), _metrics(run_dir)
  assert [ref[s] for s in range(resumed + 1, 41)] == [run[s] for s in range(resumed + 1, 41)]
  # Each step once in metrics.jsonl: the killed run's records after the checkpoint were moved aside.
  rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
  loss_steps = [r["step"] for r in rows if "loss" in r]
  assert sorted(loss_steps) == list(range(1, 41))
  superseded = [json.loads(line)["step"] for line in open(os.path.join(run_dir, "metrics.superseded.jsonl"))]
  assert min(superseded) > resumed and max(superseded) <= killed_at
  _, p_ref = loading.load_params(ref_dir)
  _, p_run = loading.load_params(run_dir)
  jax.tree.map(np.testing.assert_array_equal, p_ref, p_run)


@pytest.mark.slow
def test_sigterm_saves_and_exits_zero(tmp_path):
  run_dir = str(tmp_path / "run")
  cmd = _main_cmd(run_dir, "--config.train.num_steps=100000", "--config.checkpoint.every_steps=100000")
  proc = subprocess.Popen(
    cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
  )
  deadline = time.time() + 240
  metrics_file = os.path.join(run_dir, "metrics.jsonl")
  while time.time() < deadline and not (os.path.exists(metrics_file) and os.path.getsize(metrics_file) > 0):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  steps = [int(p) for p in os.listdir(os.path.join(run_dir, "checkpoints")) if p.isdigit()]
  assert len(steps) == 1 and 0 < steps[0] < 100000

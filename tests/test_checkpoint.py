"""Orbax checkpoints: a broken newest step falls back or stops the run, small replicated arrays
save without compiles, finalised step directories, params exports and partial restores."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec
from test_train import _fake_task, _tokens

from gpt_jax import checkpoint, integrity, model, optim, sharding, train
from gpt_jax import tokenizer as tok_lib
from gpt_jax.errors import UserError


def _train_then_corrupt(config, workdir, num_steps, step):
  """Trains num_steps with a checkpoint every 2 steps, then garbles the state of checkpoint `step`."""
  config.train.num_steps = num_steps
  config.checkpoint.every_steps = 2
  config.eval.every_steps = 0
  task_fn = _fake_task(_tokens(config, rows=32), 8)
  train.run(config, str(workdir), task_fn=task_fn)
  for f in (workdir / "checkpoints" / str(step) / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  return task_fn


def test_corrupted_newest_checkpoint_falls_back_and_the_run_goes_on(debug_config, tmp_path):
  task_fn = _train_then_corrupt(debug_config, tmp_path, num_steps=4, step=4)
  mesh = sharding.make_mesh(debug_config.mesh)
  with sharding.activate(mesh, sharding.rules(debug_config)):
    task = task_fn(debug_config, str(tmp_path), mesh)
    tx = optim.make_optimizer(debug_config)
    abstract, _ = train.state_shardings(task, tx, mesh, sharding.rules(debug_config), 0)
    restored = checkpoint.restore_latest(checkpoint.make_manager(str(tmp_path), debug_config), abstract, None)
  assert restored is not None and restored[2] == 2 and int(restored[0].step) == 2
  # The broken step was set aside, so the resumed run can write step 4 again.
  assert (tmp_path / "checkpoints" / "4.unreadable" / "state").is_dir()
  assert not (tmp_path / "checkpoints" / "4").exists()
  assert train.run(debug_config, str(tmp_path), task_fn=task_fn)["step"] == 4
  assert checkpoint.make_manager(str(tmp_path), debug_config).all_steps() == [2, 4]


def test_run_refuses_when_no_checkpoint_restores(debug_config, tmp_path):
  task_fn = _train_then_corrupt(debug_config, tmp_path, num_steps=2, step=2)
  before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
  # Starting again from step 0 would silently drop the run's progress.
  with pytest.raises(UserError, match="no checkpoint in .* restores into this run"):
    train.run(debug_config, str(tmp_path), task_fn=task_fn)
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before


def test_flipped_array_bytes_fall_back_to_the_previous_checkpoint(debug_config, tmp_path):
  # Issue 14's repro: 16 bytes inverted a quarter into the largest array file were restored silently.
  debug_config.update_from_flattened_dict(
    {"train.num_steps": 4, "checkpoint.every_steps": 2, "eval.every_steps": 0}
  )
  task_fn = _fake_task(_tokens(debug_config, rows=32), 8)
  train.run(debug_config, str(tmp_path), task_fn=task_fn)
  data = tmp_path / "checkpoints" / "4" / "state" / "ocdbt.process_0" / "d"
  largest = max(data.iterdir(), key=lambda p: p.stat().st_size)
  raw = bytearray(largest.read_bytes())
  raw[len(raw) // 4 : len(raw) // 4 + 16] = bytes(b ^ 0xFF for b in raw[len(raw) // 4 : len(raw) // 4 + 16])
  largest.write_bytes(bytes(raw))
  mesh = sharding.make_mesh(debug_config.mesh)
  with sharding.activate(mesh, sharding.rules(debug_config)):
    task = task_fn(debug_config, str(tmp_path), mesh)
    tx = optim.make_optimizer(debug_config)
    abstract, _ = train.state_shardings(task, tx, mesh, sharding.rules(debug_config), 0)
    restored = checkpoint.restore_latest(checkpoint.make_manager(str(tmp_path), debug_config), abstract, None)
  assert restored[2] == 2 and (tmp_path / "checkpoints" / "4.unreadable").is_dir()


def test_nonfinite_state_is_never_saved(debug_config, tmp_path):
  def task_fn(config, workdir, mesh):
    task = _fake_task(_tokens(config), 8)(config, workdir, mesh)

    def poisoned(shardings):
      def init():
        params = model.init_params(config.model, jax.random.key(0))
        return {**params, "wpe": params["wpe"].at[0, 0].set(jnp.nan)}

      return jax.jit(init, out_shardings=shardings)()

    task.initial_params = poisoned
    return task

  debug_config.update_from_flattened_dict(
    {"train.num_steps": 6, "checkpoint.every_steps": 2, "eval.every_steps": 0}
  )
  debug_config.train.max_bad_steps = 100
  with pytest.raises(UserError, match=r"state of step 2 not saved: .* \(first: params/wpe\)"):
    train.run(debug_config, str(tmp_path), task_fn=task_fn)
  assert checkpoint.make_manager(str(tmp_path), debug_config).all_steps() == []


def test_saving_small_replicated_arrays_compiles_nothing(debug_config, tmp_path):
  # Orbax's replica-parallel save cuts each replicated array with an eager,
  # per-shape compiled slice; for a model's small arrays that cost seconds of
  # compiles per process and sped nothing up.
  mesh = sharding.make_mesh(debug_config.mesh)
  replicated = sharding.replicated(mesh)
  rng = np.random.default_rng(0)
  state = {
    f"w{i}": jax.device_put(rng.standard_normal((i + 1, 8)).astype(np.float32), replicated) for i in range(6)
  }
  integrity.digest(state)  # The checksum pass before every save compiles once per state structure.
  compiles = []

  def listener(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(duration)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    manager = checkpoint.make_manager(str(tmp_path), debug_config)
    checkpoint.save(manager, 1, state, None, {"step": 1}, force=True)
    manager.wait_until_finished()
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert compiles == []
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  restored, _, step = checkpoint.restore_latest(manager, abstract, None)
  assert step == 1
  jax.tree.map(np.testing.assert_array_equal, restored, state)


def _tree(seed=0):
  rng = np.random.default_rng(seed)
  return {"wte": rng.standard_normal((16, 8)).astype(np.float32), "ln": {"scale": np.ones(8, np.float32)}}


def _abstract(tree, sharding_=None):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_), tree)


def test_latest_step_dir_is_the_newest_finalised_step(tmp_path, monkeypatch):
  ckpts = tmp_path / "checkpoints"
  for name in ("2", "9", "10", "12.orbax-checkpoint-tmp-5", "14", "16.unreadable"):
    (ckpts / name / "state").mkdir(parents=True)
  real = checkpoint.ocp.step.is_path_finalized

  # In a bucket an unfinished save is named <step>/ already: only Orbax's commit marker tells.
  def unfinished_14(p, **kw):
    return epath.Path(p).name != "14" and real(p, **kw)

  monkeypatch.setattr(checkpoint.ocp.step, "is_path_finalized", unfinished_14)
  root = epath.Path(tmp_path)
  assert checkpoint.latest_step_dir(root) == root / "checkpoints" / "10"  # 10 > 9: numbers, not names.
  assert checkpoint.latest_step_dir(root / "checkpoints" / "9") == root / "checkpoints" / "9"  # A step dir.
  assert checkpoint.latest_step_dir(root / "nothing") is None
  for name in ("2", "9", "10"):
    (ckpts / name / "state").rmdir()
    (ckpts / name).rmdir()
  assert checkpoint.latest_step_dir(root) is None


def test_params_export_round_trip(debug_config, tmp_path):
  params = _tree()
  tok = tok_lib.train_bpe(["to be or not to be"], 260)
  checkpoint.save_params(tmp_path / "export", debug_config, params, tokenizer=tok)
  listing = sorted(p.name for p in (tmp_path / "export").iterdir())
  assert listing == ["checksums.json", "config.json", "params", "tokenizer"]
  assert tok_lib.load_dir(str(tmp_path / "export" / "tokenizer")).fingerprint == tok.fingerprint
  item = epath.Path(tmp_path / "export" / "params")
  restored = checkpoint.restore_params(item, _abstract(params), in_state=False)
  jax.tree.map(np.testing.assert_array_equal, restored, params)
  # Straight onto devices: the shardings of the abstract tree.
  mesh = sharding.make_mesh(debug_config.mesh)
  onto = NamedSharding(mesh, PartitionSpec())
  restored = checkpoint.restore_params(item, _abstract(params, onto), in_state=False)
  assert all(x.sharding == onto for x in jax.tree.leaves(restored))
  jax.tree.map(np.testing.assert_array_equal, restored, params)


def test_params_are_restored_alone_from_a_training_state(debug_config, tmp_path):
  params = _tree(1)
  state = {"params": params, "opt_state": {"mu": _tree(2), "count": np.int32(7)}, "step": np.int32(3)}
  manager = checkpoint.make_manager(str(tmp_path), debug_config)
  checkpoint.save(manager, 3, state, None, {"step": 3}, force=True)
  manager.wait_until_finished()
  step_dir = checkpoint.latest_step_dir(epath.Path(tmp_path))
  assert step_dir.name == "3"
  restored = checkpoint.restore_params(step_dir / "state", _abstract(params), in_state=True)
  jax.tree.map(np.testing.assert_array_equal, restored, params)


@pytest.mark.parametrize(
  "abstract, message",
  [
    ({"wte": (32, 8), "ln": {"scale": (8,)}}, "['wte'] has shape (16, 8), expected (32, 8)"),
    ({"wte": (16, 8), "ln": {"scale": (8,), "bias": (8,)}}, "['ln']['bias'] is not in the checkpoint"),
  ],
)
def test_params_that_do_not_match_are_one_line(debug_config, tmp_path, abstract, message):
  """Without target shardings Orbax checks no shapes, and a partial restore fills no gaps."""
  checkpoint.save_params(tmp_path / "export", debug_config, _tree())
  item = epath.Path(tmp_path / "export" / "params")
  abstract = jax.tree.map(
    lambda s: jax.ShapeDtypeStruct(s, np.float32), abstract, is_leaf=lambda x: isinstance(x, tuple)
  )
  with pytest.raises(UserError) as e:
    checkpoint.restore_params(item, abstract, in_state=False)
  assert str(e.value) == f"cannot restore params from {item}: {message}"
  mesh = sharding.make_mesh(debug_config.mesh)  # With target shardings Orbax refuses other shapes itself.
  with pytest.raises(UserError, match=rf"^cannot restore params from {item}: ") as e:
    checkpoint.restore_params(item, _abstract(abstract, NamedSharding(mesh, PartitionSpec())), in_state=False)
  assert "\n" not in str(e.value)


def test_a_flipped_params_export_is_refused_in_one_line(debug_config, tmp_path):
  params = {"wte": np.random.default_rng(0).standard_normal((256, 64)).astype(np.float32)}
  checkpoint.save_params(tmp_path / "export", debug_config, params)
  item = epath.Path(tmp_path / "export" / "params")
  data = max(
    (tmp_path / "export" / "params" / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size
  )
  raw = bytearray(data.read_bytes())
  raw[len(raw) // 2] ^= 0x10  # One bit inside the chunk: Orbax alone returns another value.
  data.write_bytes(bytes(raw))
  with pytest.raises(
    integrity.CorruptCheckpoint, match=rf"^cannot restore params from {item}: array wte does not"
  ):
    checkpoint.restore_params(item, _abstract(params), in_state=False)


def test_save_params_refuses_a_non_empty_directory(debug_config, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  checkpoint.save_params(out, debug_config, _tree())  # An empty folder is fine.
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("keep")
  with pytest.raises(UserError, match=r"output directory .*mine is not empty; refusing to overwrite it$"):
    checkpoint.save_params(tmp_path / "mine", debug_config, _tree())
  assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
  assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"

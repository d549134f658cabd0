"""Orbax checkpoints: training state + data-iterator state, and params-only exports.

Layouts
- Training workdir: `config.json` (the resolved config), `tokenizer/`,
  `checkpoints/<step>/{state,data,meta}` (Orbax CheckpointManager items:
  TrainState, the data iterator's state as one JSON for all processes (its
  global position: loader.ElasticIterator), JSON metadata).
- Params export (`python -m gpt_jax.convert --out=DIR`): `config.json`,
  `params/` (Orbax), optional `tokenizer/`.
This module only reads and writes them with Orbax; loading.py finds which
kind a path is (or a Hugging Face folder) and builds what to restore into.
"""

from __future__ import annotations

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from gpt_jax import paths
from gpt_jax.errors import UserError

# ----------------------------------------------------------- training state


# Orbax writes a replicated jax.Array in slices, one per replica, each cut by
# an eager jax slice that compiles once per shape and device set: on a host
# with several devices, seconds of compiles for a model's dozens of small
# arrays (biases, LayerNorm gains), whose writes gain nothing from it. Only
# slices of at least this many bytes are written in parallel.
REPLICA_PARALLEL_MIN_SLICE_BYTES = 4 * 2**20


_array_handler_registered = False


def _register_array_handler() -> None:
  global _array_handler_registered
  if _array_handler_registered:
    return
  default = ocp.type_handlers.get_type_handler(jax.Array)
  handler = ocp.type_handlers.ArrayHandler(
    array_metadata_store=getattr(default, "_array_metadata_store", None),
    min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_SLICE_BYTES,
  )
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # Orbax warns about every override.
  try:
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
  finally:
    logging.set_verbosity(verbosity)
  _array_handler_registered = True


def make_manager(workdir, config) -> ocp.CheckpointManager:
  _register_array_handler()
  options = ocp.CheckpointManagerOptions(
    max_to_keep=config.checkpoint.keep,
    enable_async_checkpointing=config.checkpoint.async_save,
    # A save killed mid-way leaves `<step>.orbax-checkpoint-tmp`; it is never
    # restored, and this removes it on the next start.
    cleanup_tmp_directories=True,
    create=True,
  )
  return ocp.CheckpointManager(paths.absolute(workdir) / "checkpoints", options=options)


def save(manager, step: int, state, data_iter, meta: dict, *, force: bool = False) -> bool:
  args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
  if data_iter is not None:
    # One JSON, written by process 0: the iterator's state is global (the
    # same on every process), so it restores under any process count.
    args["data"] = ocp.args.JsonSave(data_iter.get_state())
  return manager.save(step, args=ocp.args.Composite(**args), force=force)


def _check_data_state(manager, step: int) -> None:
  """Refuses a checkpoint whose data item is grain's per-process state (written before the global one)."""
  data_dir = epath.Path(manager.directory) / str(step) / "data"
  legacy = sorted(p.name for p in data_dir.glob("process_*-of-*.json")) if data_dir.exists() else []
  if legacy:
    raise UserError(
      f"checkpoint {data_dir.parent} holds a per-process grain data state ({legacy[0]}, ...) from an older "
      "gpt_jax, which this one cannot continue; continue it with that version, or start a new --workdir "
      "with --config.init_from=<this workdir> to keep its params"
    )


def restore_latest(manager, abstract_state, data_iter):
  """Newest finalised checkpoint that restores; a broken one is reported and set aside.

  Returns (state, meta, step) or None when there is no checkpoint. `abstract_state`
  holds ShapeDtypeStructs with the target shardings, so a checkpoint written
  on one mesh restores onto another. A step that fails while an older one
  restores is renamed `<step>.unreadable` (kept for inspection, never listed
  again), so the resumed run can save that step anew. When none restores,
  the run stops with UserError and every checkpoint is left as it was.
  `data_iter` (get_state / set_state of JSON) continues from the restored
  step's data state; a state it refuses (another data order, or an older
  gpt_jax's per-process grain state) stops the run in one line.
  """
  failed = []
  for step in sorted(manager.all_steps(), reverse=True):
    args = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    if data_iter is not None:
      _check_data_state(manager, step)
      args["data"] = ocp.args.JsonRestore()
    try:
      restored = manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back
      reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
      logging.error("checkpoint at step %d cannot be restored (%s); trying the previous one", step, reason)
      failed.append((step, reason))
      continue
    if data_iter is not None:
      data_iter.set_state(restored.data)  # Refuses, in one line, a state of another data order.
    if failed:
      _set_aside(manager, [s for s, _ in failed])
    return restored.state, restored.meta, step
  if failed:
    step, reason = failed[0]
    raise UserError(
      f"no checkpoint in {manager.directory} restores into this run (newest, step {step}: {reason}); "
      "resume with the config they were written with, or use a new --workdir"
    )
  return None


def _set_aside(manager, steps) -> None:
  """Renames unreadable step directories to `<step>.unreadable[.N]` (process 0; all wait)."""
  from jax.experimental import multihost_utils

  if jax.process_index() == 0:
    for step in steps:
      src = epath.Path(manager.directory) / str(step)
      dst, n = src.parent / f"{step}.unreadable", 1
      while dst.exists():
        dst, n = src.parent / f"{step}.unreadable.{n}", n + 1
      src.rename(dst)
      logging.warning("moved the unreadable checkpoint %s to %s", src, dst)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("gpt_jax: unreadable checkpoints set aside")
  manager.reload()


# --------------------------------------------------------- params only


def save_params(directory, config, params, tokenizer=None) -> None:
  """Writes a params export: config.json + params/ (+ tokenizer/)."""
  directory = paths.absolute(directory)
  if directory.exists() and any(directory.iterdir()):
    raise UserError(f"output directory {directory} is not empty; refusing to overwrite it")
  directory.mkdir(parents=True, exist_ok=True)
  paths.write_config(directory / paths.CONFIG_FILE, config)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(directory / "params", params)
    ckptr.wait_until_finished()
  if tokenizer is not None:
    tokenizer.save(str(directory / "tokenizer"))


def latest_step_dir(path: epath.Path):
  """A workdir's newest finalised checkpoint step directory, or `path` itself (a step directory)."""
  if (path / "state").exists():
    return path
  ckpt_dir = path / "checkpoints"
  if not ckpt_dir.exists():
    return None
  # In a bucket a save in progress (or killed) is already named <step>/ and
  # lacks only its commit marker: Orbax says which are finished.
  steps = sorted(
    int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit() and ocp.step.is_path_finalized(p)
  )
  return ckpt_dir / str(steps[-1]) if steps else None


def restore_params(item_dir: epath.Path, abstract, *, in_state: bool):
  """Params restored into `abstract` (ShapeDtypeStructs, with target shardings where given)
  from a params export's `params/` or, `in_state`, from a training state item (partial
  restore: the optimiser state is not read)."""
  restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
  item, args = ({"params": abstract}, {"params": restore_args}) if in_state else (abstract, restore_args)
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      restored = ckptr.restore(
        item_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True)
      )
  except Exception as e:  # noqa: BLE001
    raise UserError(
      f"cannot restore params from {item_dir}: {type(e).__name__}: {str(e).splitlines()[0]}"
    ) from e
  return restored["params"] if in_state else restored

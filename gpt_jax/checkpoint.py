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

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from gpt_jax import integrity, paths
from gpt_jax.errors import UserError

CHECKSUMS_FILE = "checksums.json"  # A params export's sealed checksums, beside params/.
META_FILE = "meta/metadata"  # A training checkpoint's JSON meta item (its checksums), beside state/.

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
  """Saves state + data position + `meta`, sealed with the state's checksums (integrity.py).

  Raises integrity.NonFiniteState, writing nothing, for a state holding NaN or
  inf: the checksums and that check are one jitted pass over the state, on
  its devices, before Orbax copies it to the host.
  """
  # The data iterator's state is global (the same on every process), so it is one JSON, written by
  # process 0, that restores under any process count; the meta item seals its digest.
  data_state = data_iter.get_state() if data_iter is not None else None
  extra = {"data": integrity.json_digest(data_state)} if data_iter is not None else {}
  meta = integrity.sealed_meta(state, meta, f"step {step}", **extra)
  args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
  if data_iter is not None:
    args["data"] = ocp.args.JsonSave(data_state)
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


def _agree(reason: str | None) -> str | None:
  """Every process takes the first failing process's reason (each checks only what it read)."""
  if jax.process_count() == 1:
    return reason
  text = np.zeros(512, np.uint8)
  encoded = (reason or "").encode()[:512]
  text[: len(encoded)] = np.frombuffer(encoded, np.uint8)
  every = np.asarray(multihost_utils.process_allgather(text)).reshape(jax.process_count(), -1)
  failed = [bytes(row).rstrip(b"\0").decode(errors="replace") for row in every if row.any()]
  return failed[0] if failed else None


def _restore_verified(manager, step: int, args: dict, data_iter):
  """(restored items, meta) or raises: Orbax's error, or CorruptCheckpoint."""
  with integrity.quiet_restore():
    restored = manager.restore(step, args=ocp.args.Composite(**args))
  meta, record = integrity.unseal(restored.meta)
  integrity.verify(restored.state, record)
  if record is not None and data_iter is not None and "data" in record:
    if integrity.json_digest(restored.data) != record["data"]:
      raise integrity.CorruptCheckpoint("the data-iterator state differs from its digest")
  return restored, meta


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
    reason = None
    try:
      restored, meta = _restore_verified(manager, step, args, data_iter)
    except integrity.CorruptCheckpoint as e:
      reason = f"CorruptCheckpoint: {e}"
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back
      reason = integrity.restore_error_line(e)
    # A process whose own reads failed (an error, its data state) fails the step on every
    # process. (An Orbax error raised before Orbax's post-restore barrier leaves the other
    # processes waiting at that barrier until its timeout, then they fail too.)
    reason = _agree(reason)
    if reason is not None:
      logging.error("checkpoint at step %d cannot be restored (%s); trying the previous one", step, reason)
      failed.append((step, reason))
      continue
    if data_iter is not None:
      data_iter.set_state(restored.data)  # Refuses, in one line, a state of another data order.
    if failed:
      _set_aside(manager, [s for s, _ in failed])
    return restored.state, meta, step
  if failed:
    step, reason = failed[0]
    raise UserError(
      f"no checkpoint in {manager.directory} restores into this run (newest, step {step}: {reason}); "
      "resume with the config they were written with, or use a new --workdir"
    )
  return None


def _set_aside(manager, steps) -> None:
  """Renames unreadable step directories to `<step>.unreadable[.N]` (process 0; all wait)."""
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
  write_params(directory, params)
  if tokenizer is not None:
    tokenizer.save(str(directory / "tokenizer"))


def write_params(directory, params) -> None:
  """`directory`/params/ (Orbax), then `directory`/checksums.json: a params export's arrays.

  Raises integrity.NonFiniteState, writing nothing, when a leaf holds NaN or inf.
  """
  directory = paths.absolute(directory)
  sealed = integrity.sealed_meta(params, {}, f"params export {directory}")
  integrity.quiet_orbax_logs()
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(directory / "params", params)
    ckptr.wait_until_finished()
  if jax.process_index() == 0:  # Last: an export without it is an old one (not verified).
    tmp = directory / (CHECKSUMS_FILE + ".tmp")
    tmp.write_text(json.dumps(sealed, indent=1, sort_keys=True))
    tmp.replace(directory / CHECKSUMS_FILE)


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
  restore: the optimiser state is not read), quietly, and verified against the stored
  checksums. A failure or mismatch is one UserError line naming the array."""
  restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
  item, args = ({"params": abstract}, {"params": restore_args}) if in_state else (abstract, restore_args)
  try:
    with integrity.quiet_restore(), ocp.PyTreeCheckpointer() as ckptr:
      restored = ckptr.restore(
        item_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True)
      )
  except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is one line
    raise UserError(f"cannot restore params from {item_dir}: {integrity.restore_error_line(e)}") from None
  params = restored["params"] if in_state else restored
  _check_restored(item_dir, abstract, params)
  # The checksums: the training checkpoint's meta item (paths "params/..." as restored
  # here), or the export's checksums.json.
  sealed = epath.Path(item_dir).parent / (META_FILE if in_state else CHECKSUMS_FILE)
  record = None
  try:
    if sealed.exists():
      _, record = integrity.unseal(json.loads(sealed.read_text()))
    else:
      logging.warning("%s was written without checksums: its values are not verified", item_dir)
    integrity.verify(restored, record)
  except (integrity.CorruptCheckpoint, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise integrity.CorruptCheckpoint(f"cannot restore params from {item_dir}: {e}") from None
  return params


def _check_restored(item_dir, abstract, params) -> None:
  """Orbax checks shapes only for targets with a sharding; without one it returns the stored
  shape, and a partial restore returns a missing leaf as its ShapeDtypeStruct: both are refused."""

  def check(path, want, got):
    where = f"cannot restore params from {item_dir}: {jax.tree_util.keystr(path)}"
    if isinstance(got, jax.ShapeDtypeStruct):
      raise UserError(f"{where} is not in the checkpoint")
    if tuple(got.shape) != tuple(want.shape):
      raise UserError(f"{where} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")

  jax.tree_util.tree_map_with_path(check, abstract, params)

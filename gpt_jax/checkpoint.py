"""Orbax checkpoints: training state + data-iterator state, and params-only exports.

Layouts
- Training workdir: `config.json` (the resolved config), `tokenizer/`,
  `checkpoints/<step>/{state,data,meta}` (Orbax CheckpointManager items:
  TrainState, grain iterator state per process, JSON metadata).
- Params export (`python -m gpt_jax.convert --out=DIR`): `config.json`,
  `params/` (Orbax), optional `tokenizer/`.
Any entry point that takes a model accepts either, or a local Hugging Face
GPT-2 folder (config.json + model.safetensors).
"""

from __future__ import annotations

import json
import os

import flax.linen as nn
import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from gpt_jax import model as model_lib
from gpt_jax.config import UserError, run_dir

CONFIG_FILE = "config.json"


def _abs(path: str) -> epath.Path:
  """Orbax needs absolute paths (a relative one fails only at save time); a URL stays one."""
  p = str(path)
  return epath.Path(p if "://" in p else os.path.abspath(os.path.expanduser(p)))


def load_config_file(path) -> ml_collections.ConfigDict:
  path = _abs(path)
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  except (OSError, json.JSONDecodeError) as e:
    raise UserError(f"cannot read config {path}: {e}") from e


def write_config_file(path, config) -> None:
  path = _abs(path)
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text(config.to_json_best_effort(indent=2, sort_keys=True))
  tmp.replace(path)


def _tuples(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """JSON turns tuples into lists; restore the tuple fields of configs/base.py."""
  m = config.model
  m.attention_pattern = tuple(m.attention_pattern)
  if "mesh" in config:
    config.mesh.rules = tuple((n, tuple(a) if isinstance(a, list) else a) for n, a in config.mesh.rules)
  if "eval" in config:
    config.eval.tasks = tuple(config.eval.tasks)
  return config


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
  return ocp.CheckpointManager(_abs(workdir) / "checkpoints", options=options)


def save(manager, step: int, state, data_iter, meta: dict, *, force: bool = False) -> bool:
  args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
  if data_iter is not None:
    args["data"] = grain.checkpoint.CheckpointSave(data_iter)
  return manager.save(step, args=ocp.args.Composite(**args), force=force)


def restore_latest(manager, abstract_state, data_iter):
  """Newest finalised checkpoint that restores; a broken one is reported and set aside.

  Returns (state, meta, step) or None when there is no checkpoint. `abstract_state`
  holds ShapeDtypeStructs with the target shardings, so a checkpoint written
  on one mesh restores onto another. A step that fails while an older one
  restores is renamed `<step>.unreadable` (kept for inspection, never listed
  again), so the resumed run can save that step anew. When none restores,
  the run stops with UserError and every checkpoint is left as it was.
  """
  failed = []
  for step in sorted(manager.all_steps(), reverse=True):
    args = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back
      reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
      logging.error("checkpoint at step %d cannot be restored (%s); trying the previous one", step, reason)
      failed.append((step, reason))
      continue
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
  directory = _abs(directory)
  if directory.exists() and any(directory.iterdir()):
    raise UserError(f"output directory {directory} is not empty; refusing to overwrite it")
  directory.mkdir(parents=True, exist_ok=True)
  write_config_file(directory / CONFIG_FILE, config)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(directory / "params", params)
    ckptr.wait_until_finished()
  if tokenizer is not None:
    tokenizer.save(str(directory / "tokenizer"))


def is_hf_dir(path) -> bool:
  path = _abs(path)
  if not (path / "config.json").exists():
    return False
  try:
    return "n_embd" in json.loads((path / "config.json").read_text())
  except json.JSONDecodeError:
    return False


def _latest_step_dir(path: epath.Path):
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


def _run_config(path: epath.Path):
  for candidate in (path / CONFIG_FILE, path.parent.parent / CONFIG_FILE):
    if candidate.exists():
      return _tuples(load_config_file(candidate))
  raise UserError(f"{path} has no {CONFIG_FILE}: not a gpt_jax workdir or params export")


def load_params(path, *, shardings=None):
  """(config, params) from a params export, a training workdir / step dir, or an HF folder.

  `shardings`: optional tree of NamedShardings for the params (restore
  straight onto devices); default places them on the default device.
  From a training checkpoint only the params are read (partial restore), not
  the optimiser state.
  """
  path = _abs(path)
  if not path.exists():
    raise UserError(f"checkpoint path {path} does not exist")
  if is_hf_dir(path):
    from configs import base
    from gpt_jax import convert

    model_cfg, params = convert.from_hf(str(path))
    config = base.get_config()
    config.model = model_cfg
    if shardings is not None:
      params = jax.device_put(params, shardings)
    return config, params
  config = _run_config(path)
  abstract = model_lib.abstract_params(config.model)
  # Unboxed without sharding constraints: inside a mesh context (train.run) nn.unbox
  # would constrain these ShapeDtypeStructs eagerly and fail.
  abstract = jax.tree.map(
    lambda b: jax.ShapeDtypeStruct(b.value.shape, b.value.dtype),
    abstract,
    is_leaf=lambda b: isinstance(b, nn.Partitioned),
  )
  if shardings is not None:
    abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
    )
  restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
  if (path / "params").exists():
    item_dir, item, args = path / "params", abstract, restore_args
  else:
    step_dir = _latest_step_dir(path)
    if step_dir is None:
      raise UserError(f"{path} has no finalised checkpoint (expected checkpoints/<step>/state or params/)")
    item_dir, item, args = step_dir / "state", {"params": abstract}, {"params": restore_args}
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      restored = ckptr.restore(
        item_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True)
      )
  except Exception as e:  # noqa: BLE001
    raise UserError(
      f"cannot restore params from {item_dir}: {type(e).__name__}: {str(e).splitlines()[0]}"
    ) from e
  return config, (restored if item is abstract else restored["params"])


def load_for_inference(workdir: str | None = None, hf_dir: str | None = None, *, mesh_config=None):
  """(model_cfg, params, tokenizer) for sampling / evaluation.

  `workdir`: a gpt_jax training workdir or params export (tokenizer from its
  tokenizer/ folder); `hf_dir`: a local Hugging Face GPT-2 folder (tokenizer
  from its vocab.json + merges.txt). Params are sharded over all devices by
  the config's mesh rules (or `mesh_config`).
  """
  from gpt_jax import sharding
  from gpt_jax import tokenizer as tokenizer_lib

  if (workdir is None) == (hf_dir is None):
    raise UserError("give exactly one of --workdir or --hf_dir")
  path = run_dir(workdir) if workdir is not None else run_dir(hf_dir, "--hf_dir")
  if hf_dir is not None and "://" in path:
    raise UserError(f"--hf_dir={hf_dir}: must be a local folder (copy the bucket's files to disk first)")
  if hf_dir is not None and not is_hf_dir(hf_dir):
    raise UserError(f"--hf_dir={hf_dir} is not a Hugging Face GPT-2 folder (config.json with n_embd)")
  config, params = load_params(path)
  mesh_cfg = mesh_config or config.get("mesh")
  if mesh_cfg is not None and len(jax.devices()) > 1:
    mesh = sharding.make_mesh(mesh_cfg)
    specs = model_lib.logical_specs(config.model)
    params = jax.device_put(
      params, sharding.logical_to_shardings(specs, params, mesh, sharding.rules(config))
    )
  if hf_dir is not None:
    tok = tokenizer_lib.from_hf_dir(hf_dir)
  else:
    tok_dir = _abs(path) / "tokenizer"
    if not tok_dir.exists():
      tok_dir = _abs(path).parent.parent / "tokenizer"
    if not tok_dir.exists():
      raise UserError(f"{path} has no tokenizer/ folder")
    tok = tokenizer_lib.load_dir(str(tok_dir))
  return config.model, params, tok

"""Loading a model from whatever the user points at: a gpt_jax training
workdir (its newest checkpoint) or step directory, a params export, or a
local Hugging Face GPT-2 folder.

`load_params` gives (config, params) for training's `init_from` and for
convert; `load_for_inference` adds the tokenizer and shards the params over
the local devices, for sampling, evaluation, chat and the harness.
"""

from __future__ import annotations

import json

import flax.linen as nn
import jax
from etils import epath

from configs import base
from gpt_jax import checkpoint, hf, model_config, paths, quantize, sharding
from gpt_jax import model as model_lib
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.errors import UserError


def is_hf_dir(path) -> bool:
  path = paths.absolute(path)
  if not (path / "config.json").exists():
    return False
  try:
    return "n_embd" in json.loads((path / "config.json").read_text())
  except json.JSONDecodeError:
    return False


def run_config(path: epath.Path):
  """The config.json of a workdir / params export, or of the workdir above a step directory."""
  for candidate in (path / paths.CONFIG_FILE, path.parent.parent / paths.CONFIG_FILE):
    if candidate.exists():
      return paths.read_config(candidate)
  raise UserError(f"{path} has no {paths.CONFIG_FILE}: not a gpt_jax workdir or params export")


def abstract_params(model_cfg, shardings=None):
  """ShapeDtypeStructs of the params (with `shardings` where given), logical boxes removed."""
  abstract = model_lib.abstract_params(model_cfg)
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
  return abstract


def check_params_source(path, model_cfg, field: str = "config.init_from") -> None:
  """Refuses, reading configs only, a params source that is missing or holds another model shape
  (the arrays themselves are checked when they load)."""
  p = paths.absolute(path)
  if not p.exists():
    raise UserError(f"{field}={path!r} does not exist")
  if is_hf_dir(p):
    theirs = hf.model_config_from_hf(json.loads((p / "config.json").read_text()), p / "config.json")
  else:
    theirs = run_config(p).model
  diffs = [
    f"model.{f}: {theirs.get(f)!r} there, {model_cfg[f]!r} here"
    for f in model_config.SHAPE_FIELDS
    if theirs.get(f) != model_cfg[f]
  ]
  if diffs:
    raise UserError(f"{field}={path!r} holds another model shape ({'; '.join(diffs)})")


def load_params(path, *, shardings=None):
  """(config, params) from a params export, a training workdir / step dir, or an HF folder.

  `shardings`: optional tree of NamedShardings for the params (restore
  straight onto devices); default places them on the default device.
  From a training checkpoint only the params are read (partial restore), not
  the optimiser state.
  """
  path = paths.absolute(path)
  if not path.exists():
    raise UserError(f"checkpoint path {path} does not exist")
  if is_hf_dir(path):
    model_cfg, params = hf.from_hf(str(path))
    config = base.get_config()
    config.model = model_cfg
    if shardings is not None:
      params = jax.device_put(params, shardings)
    return config, params
  config = run_config(path)
  abstract = abstract_params(config.model, shardings)
  if (path / "params").exists():
    return config, checkpoint.restore_params(path / "params", abstract, in_state=False)
  step_dir = checkpoint.latest_step_dir(path)
  if step_dir is None:
    raise UserError(f"{path} has no finalised checkpoint (expected checkpoints/<step>/state or params/)")
  return config, checkpoint.restore_params(step_dir / "state", abstract, in_state=True)


def load_for_inference(
  workdir: str | None = None, hf_dir: str | None = None, *, mesh_config=None, weights: str = "float32"
):
  """(ModelConfig, params, tokenizer) for sampling / evaluation.

  `workdir`: a gpt_jax training workdir or params export (tokenizer from its
  tokenizer/ folder); `hf_dir`: a local Hugging Face GPT-2 folder (tokenizer
  from its vocab.json + merges.txt). A `workdir` that is a Hugging Face
  folder (an export of ours, say) is read as one. Params are sharded over
  all devices by the config's mesh rules (or `mesh_config`). `weights`
  ("bfloat16", "int8"): matmul weights converted for decoding (gpt_jax.quantize).
  """
  quantize.check_weights(weights)
  if (workdir is None) == (hf_dir is None):
    raise UserError("give exactly one of --workdir or --hf_dir")
  path = paths.run_dir(workdir) if workdir is not None else paths.run_dir(hf_dir, "--hf_dir")
  if hf_dir is not None and paths.is_url(path):
    raise UserError(f"--hf_dir={hf_dir}: must be a local folder (copy the bucket's files to disk first)")
  if hf_dir is not None and not is_hf_dir(hf_dir):
    raise UserError(f"--hf_dir={hf_dir} is not a Hugging Face GPT-2 folder (config.json with n_embd)")
  from_hf = hf_dir is not None or (not paths.is_url(path) and is_hf_dir(path))
  config, params = load_params(path)
  mesh_cfg = mesh_config or config.get("mesh")
  if mesh_cfg is not None and len(jax.devices()) > 1:
    mesh = sharding.make_mesh(mesh_cfg)
    specs = model_lib.logical_specs(config.model)
    params = jax.device_put(
      params, sharding.logical_to_shardings(specs, params, mesh, sharding.rules(config))
    )
  if from_hf:
    tok = tokenizer_lib.from_hf_dir(path)
  else:
    tok_dir = paths.absolute(path) / "tokenizer"
    if not tok_dir.exists():
      tok_dir = paths.absolute(path).parent.parent / "tokenizer"
    if not tok_dir.exists():
      raise UserError(f"{path} has no tokenizer/ folder")
    tok = tokenizer_lib.load_dir(str(tok_dir))
  return model_config.of(config.model), quantize.quantize_params(params, weights), tok

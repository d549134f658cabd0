"""Hugging Face GPT-2 folders <-> gpt_jax params (the CLI is convert.py).

Import: `from_hf(dir)` reads `config.json` + `model.safetensors` (or a
sharded `model.safetensors.index.json`) of any GPT-2 shape and returns a full
`config.model` plus a params tree for `model.GPT`. Export: `to_hf(model_cfg,
params, dir)` writes a folder that `transformers.GPT2LMHeadModel
.from_pretrained(dir)` loads. Pickle checkpoints (`pytorch_model.bin`) are
never read: unpickling runs arbitrary code.

Layouts: Hugging Face `Conv1D` weights are (in, out), i.e. already the `x @ W`
layout of our Dense kernels; `c_attn` packs q, k, v along its output axis
(3 x heads x head_dim, in that order), so [D, 3D] is our [D, 3, H, K] by a
plain reshape, and `attn.c_proj`'s input axis is heads-major, giving [H, K, D].
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from configs import base
from gpt_jax import model as model_lib
from gpt_jax import model_config
from gpt_jax.errors import ConfigError, UserError
from gpt_jax.layout import stack_blocks, unstack_blocks

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# Both HF tanh variants are the same function (GPT-2's "gelu" in its TF code).
ACTIVATIONS_FROM_HF = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
ACTIVATIONS_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu"}
# Non-persistent causal-mask buffers that older transformers versions saved.
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")
# Tokenizer files copied into an export, as (source name, name in the HF folder).
# encoder.json / vocab.bpe are the original GPT-2 release names of the same files.
_TOKENIZER_PAIRS = (
  (("vocab.json", "vocab.json"), ("merges.txt", "merges.txt")),
  (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")),
)
_TOKENIZER_EXTRAS = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# ------------------------------------------------------------------ layouts


def _layout(m) -> Iterator[tuple[str, tuple[str, ...], tuple[int, ...], tuple[int, ...]]]:
  """(HF tensor name, path in our unstacked params, our shape, HF shape) for every tensor."""
  D, H, V = m.d_model, m.num_heads, m.vocab_size
  K, F = D // H, m.mlp_ratio * D
  yield "wte.weight", ("wte",), (V, D), (V, D)
  # HF GPT-2 learns its positions in one table, as ours (model.position_tables).
  yield "wpe.weight", ("wpe",), (m.block_size, D), (m.block_size, D)
  for i in range(m.num_layers):
    b = f"block_{i}"
    for ln in ("ln_1", "ln_2"):
      yield f"h.{i}.{ln}.weight", (b, ln, "ln", "scale"), (D,), (D,)
      yield f"h.{i}.{ln}.bias", (b, ln, "ln", "bias"), (D,), (D,)
    yield f"h.{i}.attn.c_attn.weight", (b, "attn", "c_attn", "kernel"), (D, 3, H, K), (D, 3 * D)
    yield f"h.{i}.attn.c_attn.bias", (b, "attn", "c_attn", "bias"), (3, H, K), (3 * D,)
    yield f"h.{i}.attn.c_proj.weight", (b, "attn", "c_proj", "kernel"), (H, K, D), (D, D)
    yield f"h.{i}.attn.c_proj.bias", (b, "attn", "c_proj", "bias"), (D,), (D,)
    yield f"h.{i}.mlp.c_fc.weight", (b, "mlp", "c_fc", "kernel"), (D, F), (D, F)
    yield f"h.{i}.mlp.c_fc.bias", (b, "mlp", "c_fc", "bias"), (F,), (F,)
    yield f"h.{i}.mlp.c_proj.weight", (b, "mlp", "c_proj", "kernel"), (F, D), (F, D)
    yield f"h.{i}.mlp.c_proj.bias", (b, "mlp", "c_proj", "bias"), (D,), (D,)
  yield "ln_f.weight", ("ln_f", "ln", "scale"), (D,), (D,)
  yield "ln_f.bias", ("ln_f", "ln", "bias"), (D,), (D,)


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _set(tree, path, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


# ------------------------------------------------------------------- import


def _read_json(path: Path) -> dict:
  try:
    with epath.Path(path).open(encoding="utf-8") as f:  # A checkpoint's tokenizer may be in a bucket.
      data = json.load(f)
  except FileNotFoundError:
    raise UserError(f"{path}: file not found") from None
  except json.JSONDecodeError as e:
    raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
  if not isinstance(data, dict):
    raise UserError(f"{path}: expected a JSON object")
  return data


def _field(hf: dict, name: str, path: Path, default=None, kind=int):
  v = hf.get(name, default)
  if v is None:
    raise UserError(f"{path}: field {name!r} is missing")
  if kind is int and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
    raise UserError(f"{path}: {name}={v!r} must be a positive integer")
  if kind is float and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
    raise UserError(f"{path}: {name}={v!r} must be a number >= 0")
  return kind(v)


def model_config_from_hf(hf: dict, path: Path, *, scan_layers: bool = False) -> ml_collections.ConfigDict:
  """A full, validated `config.model` from a GPT2Config dict (`path` names it in errors)."""
  model_type = hf.get("model_type", "gpt2")
  if model_type != "gpt2":
    raise UserError(f"{path}: model_type={model_type!r}; only 'gpt2' checkpoints are supported")
  d_model = _field(hf, "n_embd", path)
  num_heads = _field(hf, "n_head", path)
  if d_model % num_heads:
    raise UserError(f"{path}: n_head={num_heads} does not divide n_embd={d_model}")
  n_inner = hf.get("n_inner")
  if n_inner is None:  # GPT2Config's default: 4 * n_embd.
    mlp_ratio = 4
  else:
    n_inner = _field(hf, "n_inner", path)
    if n_inner % d_model:
      raise UserError(
        f"{path}: n_inner={n_inner} is not a multiple of n_embd={d_model} "
        "(gpt_jax needs an integer mlp_ratio)"
      )
    mlp_ratio = n_inner // d_model
  act = hf.get("activation_function", "gelu_new")
  if act not in ACTIVATIONS_FROM_HF:
    raise UserError(
      f"{path}: activation_function={act!r} is not supported (use one of {', '.join(ACTIVATIONS_FROM_HF)})"
    )
  # Variants GPT2Attention offers that our model does not compute.
  for name, supported in (
    ("scale_attn_weights", True),
    ("scale_attn_by_inverse_layer_idx", False),
    ("add_cross_attention", False),
  ):
    if hf.get(name, supported) != supported:
      raise UserError(f"{path}: {name}={hf[name]!r} is not supported (only {supported})")

  m = base.get_config().model
  m.update(
    vocab_size=_field(hf, "vocab_size", path),
    block_size=_field(hf, "n_positions", path),
    num_layers=_field(hf, "n_layer", path),
    num_heads=num_heads,
    d_model=d_model,
    mlp_ratio=mlp_ratio,
    norm_position="pre",
    layer_norm_epsilon=_field(hf, "layer_norm_epsilon", path, 1e-5, float),
    activation=ACTIVATIONS_FROM_HF[act],
    init_std=_field(hf, "initializer_range", path, 0.02, float),
    # GPT2Model always scales its residual projections by 1/sqrt(2 n_layer) at init.
    scale_residual_init=True,
    # GPT2Config's defaults are 0.1 (GPT-2 trained with dropout); they matter only for fine-tuning.
    embd_dropout=_field(hf, "embd_pdrop", path, 0.1, float),
    attn_dropout=_field(hf, "attn_pdrop", path, 0.1, float),
    resid_dropout=_field(hf, "resid_pdrop", path, 0.1, float),
    attention_pattern=("dense",),
    vocab_pad_multiple=1,
    scan_layers=scan_layers,
  )
  try:
    model_config.of(m)
  except ConfigError as e:
    raise UserError(f"{path}: {e}") from None
  return m


def _weight_files(hf_dir: Path) -> tuple[Path, dict[str, Path]]:
  """(file named in errors, {tensor name as stored: safetensors file})."""
  single, index = hf_dir / WEIGHTS_FILE, hf_dir / WEIGHTS_INDEX_FILE
  if single.is_file():
    from safetensors import safe_open

    try:
      with safe_open(single, framework="numpy") as f:
        return single, dict.fromkeys(f.keys(), single)
    except Exception as e:  # safetensors raises its own error types for corrupt headers.
      raise UserError(f"{single}: not a readable safetensors file ({e})") from None
  if index.is_file():
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
      raise UserError(f"{index}: no 'weight_map' object")
    files = {name: hf_dir / shard for name, shard in weight_map.items()}
    for shard in set(files.values()):
      if not shard.is_file():
        raise UserError(f"{index}: shard {shard.name} is missing")
    return index, files
  if any((hf_dir / p).exists() for p in PICKLE_FILES):
    raise UserError(
      f"{hf_dir}: has only a pickle checkpoint (pytorch_model.bin), which is never loaded because unpickling "
      "can run arbitrary code; convert it where you trust it with transformers: "
      "GPT2LMHeadModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
    )
  raise UserError(f"{hf_dir}: no {WEIGHTS_FILE} (or {WEIGHTS_INDEX_FILE}) found")


def from_hf(hf_dir, *, scan_layers: bool = False) -> tuple[ml_collections.ConfigDict, dict]:
  """(config.model, float32 params) from a local Hugging Face GPT-2 folder (safetensors only)."""
  from safetensors import safe_open

  hf_dir = Path(hf_dir)
  if not hf_dir.is_dir():
    raise UserError(f"{hf_dir}: not a directory (expected a Hugging Face GPT-2 folder)")
  # The weights first: a folder holding only a pickle checkpoint is named as such, whatever else it lacks.
  where, files = _weight_files(hf_dir)
  config_path = hf_dir / CONFIG_FILE
  m = model_config_from_hf(_read_json(config_path), config_path, scan_layers=scan_layers)

  # Stored names may carry GPT2LMHeadModel's "transformer." prefix (GPT2Model's do not).
  stored = {}
  for name in files:
    stored[name.removeprefix("transformer.")] = name
  layout = list(_layout(m))
  expected = {hf_name for hf_name, *_ in layout}
  for name, full in stored.items():
    if name not in expected and name != "lm_head.weight" and not name.endswith(_BUFFER_SUFFIXES):
      raise UserError(f"{where}: unexpected tensor {full!r} (not part of a GPT-2 language model)")

  params: dict = {}
  with contextlib.ExitStack() as stack:
    handles = {f: stack.enter_context(safe_open(f, framework="numpy")) for f in set(files.values())}

    def read(name, hf_shape):
      full = stored.get(name)
      if full is None:
        raise UserError(f"{where}: tensor {'transformer.' + name!r} is missing")
      handle = handles[files[full]]
      shape = tuple(handle.get_slice(full).get_shape())
      if shape != hf_shape:
        raise UserError(
          f"{files[full]}: tensor {full!r} has shape {list(shape)}, "
          f"{config_path.name} implies {list(hf_shape)}"
        )
      return handle.get_tensor(full).astype(np.float32)

    for hf_name, path, shape, hf_shape in layout:
      _set(params, path, read(hf_name, hf_shape).reshape(shape))
    if "lm_head.weight" in stored:
      if not np.array_equal(read("lm_head.weight", (m.vocab_size, m.d_model)), params["wte"]):
        raise UserError(
          f"{where}: lm_head.weight differs from wte.weight; gpt_jax ties the output and input embeddings "
          "(as GPT-2 does), so an untied head cannot be imported"
        )

  params = jax.tree.map(jnp.asarray, params)
  if scan_layers:
    params = stack_blocks(params, m.num_layers)
  return m, params


# ------------------------------------------------------------------- export


def hf_config_dict(m, eot_id: int | None = None) -> dict:
  """GPT2Config fields (as `config.json`) for a gpt_jax `config.model`.

  `eot_id`: the tokenizer's <|endoftext|> id; default vocab_size - 1, where
  GPT-2 keeps it.
  """
  eot = m.vocab_size - 1 if eot_id is None else eot_id
  return {
    "architectures": ["GPT2LMHeadModel"],
    "model_type": "gpt2",
    "vocab_size": m.vocab_size,
    "n_positions": m.block_size,
    "n_ctx": m.block_size,
    "n_embd": m.d_model,
    "n_layer": m.num_layers,
    "n_head": m.num_heads,
    "n_inner": m.mlp_ratio * m.d_model,
    "activation_function": ACTIVATIONS_TO_HF[m.activation],
    "layer_norm_epsilon": m.layer_norm_epsilon,
    "initializer_range": m.init_std,
    "embd_pdrop": m.embd_dropout,
    "attn_pdrop": m.attn_dropout,
    "resid_pdrop": m.resid_dropout,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "tie_word_embeddings": True,
    "use_cache": True,
    "bos_token_id": eot,
    "eos_token_id": eot,
    "torch_dtype": "float32",
  }


def _check_exportable(m) -> None:
  if m.norm_position != "pre":
    raise UserError(
      f"model.norm_position={m.norm_position!r} cannot be exported: Hugging Face GPT-2 is pre-LN only"
    )
  if model_lib.position_tables(m) != {"wpe": (m.block_size, m.d_model)}:
    raise UserError("this model's position embedding has no Hugging Face GPT-2 equivalent (learned wpe)")
  if any(w is not None for w in model_config.layer_windows(m)):
    raise UserError(
      f"model.attention_pattern={tuple(m.attention_pattern)!r} cannot be exported: Hugging Face GPT-2 "
      "has dense attention only"
    )
  if m.activation not in ACTIVATIONS_TO_HF:
    raise UserError(f"model.activation={m.activation!r} has no Hugging Face GPT-2 equivalent")


def hf_tensors(m, params) -> dict[str, np.ndarray]:
  """{HF tensor name: float32 array} for `params` (either layout); padded vocab rows are dropped."""
  _check_exportable(m)
  params = unstack_blocks(params)
  tensors = {}
  for hf_name, path, shape, hf_shape in _layout(m):
    try:
      x = _get(params, path)
    except (KeyError, TypeError):
      raise UserError(f"params: no {'/'.join(path)} (model config and params disagree)") from None
    x = np.asarray(jax.device_get(x), dtype=np.float32)
    if path == ("wte",):
      # Rows past vocab_size are vocab_pad_multiple padding that no token indexes: dropping them is lossless.
      x = x[: m.vocab_size]
    if x.shape != shape:
      raise UserError(f"params: {'/'.join(path)} has shape {list(x.shape)}, config implies {list(shape)}")
    tensors["transformer." + hf_name] = np.ascontiguousarray(x.reshape(hf_shape))
  return tensors


def tokenizer_files(tokenizer_dir: Path) -> tuple[list[tuple[Path, str]], dict]:
  """([(file, name in an HF folder)], vocab) of a GPT-2 BPE folder."""
  for pair in _TOKENIZER_PAIRS:
    if all((tokenizer_dir / src).is_file() for src, _ in pair):
      files = [(tokenizer_dir / src, dst) for src, dst in pair]
      files += [(tokenizer_dir / f, f) for f in _TOKENIZER_EXTRAS if (tokenizer_dir / f).is_file()]
      return files, _read_json(files[0][0])
  raise UserError(
    f"{tokenizer_dir}: no GPT-2 BPE files (vocab.json + merges.txt, or encoder.json + vocab.bpe)"
  )


def num_ids(vocab: dict) -> int:
  return max((v for v in vocab.values() if isinstance(v, int)), default=-1) + 1


def refuse_non_empty(out_dir: Path) -> None:
  if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
    raise UserError(f"{out_dir}: already exists and is not an empty directory; refusing to overwrite")


def _prepare_out_dir(out_dir: Path) -> Path:
  """A fresh temporary sibling of `out_dir`; refuses a non-empty `out_dir`."""
  refuse_non_empty(out_dir)
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))


def _publish(tmp: Path, out_dir: Path) -> None:
  if out_dir.is_dir():
    out_dir.rmdir()  # Empty (checked before writing).
  os.replace(tmp, out_dir)


def to_hf(model_cfg, params, out_dir, *, tokenizer_dir=None) -> Path:
  """Writes a Hugging Face GPT-2 folder (`config.json`, `model.safetensors`[, tokenizer]) to `out_dir`.

  Everything is written to a temporary sibling first and renamed at the end,
  so a failure never leaves a half-written `out_dir`.
  """
  from safetensors.numpy import save_file

  out_dir = Path(out_dir)
  tensors = hf_tensors(model_cfg, params)
  tok_files, vocab = tokenizer_files(epath.Path(tokenizer_dir)) if tokenizer_dir else ([], {})
  if num_ids(vocab) > model_cfg.vocab_size:
    raise UserError(
      f"{tok_files[0][0]}: {num_ids(vocab)} token ids do not fit model.vocab_size={model_cfg.vocab_size}"
    )
  tmp = _prepare_out_dir(out_dir)
  try:
    # transformers refuses safetensors files without format metadata.
    save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
    with open(tmp / CONFIG_FILE, "w", encoding="utf-8") as f:
      json.dump(hf_config_dict(model_cfg, vocab.get("<|endoftext|>")), f, indent=2)
      f.write("\n")
    for src, dst in tok_files:
      (tmp / dst).write_bytes(epath.Path(src).read_bytes())
    _publish(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir

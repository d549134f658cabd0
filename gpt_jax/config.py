"""Configuration validation and the one-line error every entry point gives.

`validate(config)` is called once, at start-up, by every entry point; a bad
value raises `ConfigError` naming the dotted field and what is allowed.
`cli_main` turns any `UserError` into one line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import os
import sys

import ml_collections

DTYPE_NAMES = ("float32", "bfloat16", "float16")
ATTENTION_KINDS = ("dense", "local")


class UserError(Exception):
  """Bad input from the user (config, data, files): reported in one line, exit 2."""


class ConfigError(UserError):
  pass


def cli_main(fn):
  """Wraps an absl `main(argv)`: a UserError becomes `error: ...` and exit 2."""

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except UserError as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      sys.exit(2)

  return wrapper


def _die(message: str):
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def _parse_flags(argv):
  """absl's flag parsing, with a bad flag, config file or override as one line and exit 2."""
  from absl import flags
  from ml_collections import config_flags

  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    _die(str(e).splitlines()[0])
  except (AttributeError, KeyError) as e:  # An override naming a field the config file lacks.
    key = str(e).strip("'\"")
    bad = [a.split("=")[0] for a in argv[1:] if a.startswith("--") and key in a.split("=")[0].split(".")]
    _die(f"{bad[0] if bad else key}: no such config field (see configs/base.py)")
  except (TypeError, ValueError) as e:
    _die(f"bad command-line value: {e}")
  for name in list(flags.FLAGS):
    flag = flags.FLAGS[name]
    if isinstance(flag, config_flags.config_flags._ConfigFlag) and flag.present:
      try:
        flag.value.keys()  # Loading errors surface on first access.
      except Exception as e:  # noqa: BLE001 - any failure to load the file is the user's to fix
        while e.__cause__ is not None or e.__context__ is not None:
          e = e.__cause__ or e.__context__
        detail = str(e).strip().splitlines()[-1].strip() if str(e).strip() else ""
        _die(f"--{name}={flag.config_filename}: cannot load it ({type(e).__name__}: {detail})")
  return rest


# ------------------------------------------------------------ run directories

URL_SCHEMES = ("gs",)  # Buckets that etils.epath (gcsfs) and Orbax (tensorstore) both open.


def is_url(path) -> bool:
  return "://" in str(path)


def run_dir(path, flag: str = "--workdir") -> str:
  """A run directory: a URL (gs://BUCKET/PATH) as given, a local path made absolute.

  A URL is read and written through etils.epath and Orbax; what must be on
  a local disk (the memory-mapped token cache; metrics before their upload)
  goes to `local_dir(url)` on each host instead.
  """
  p = str(path)
  if not p.strip():
    raise UserError(f"{flag} is empty")
  if not is_url(p):
    return os.path.abspath(os.path.expanduser(p))
  scheme, rest = p.split("://", 1)
  parts = [x for x in rest.split("/") if x]
  if scheme not in URL_SCHEMES:
    known = ", ".join(f"{s}://" for s in URL_SCHEMES)
    raise UserError(f"{flag}={p}: unsupported URL scheme {scheme}:// (use a local path or {known})")
  if not parts or any(x in (".", "..") for x in parts):
    raise UserError(f"{flag}={p}: expected {scheme}://BUCKET/PATH without '.' or '..' parts")
  _setup_bucket_io(flag)
  return f"{scheme}://{'/'.join(parts)}"


@functools.cache
def _setup_bucket_io(flag: str) -> None:
  """Once, before the first bucket access: gcsfs must be there, and must not
  cache listings (it keeps them for good, and other processes write the
  same folders: a waiting process would never see their files)."""
  import importlib.util

  import fsspec

  for protocol in ("gs", "gcs"):
    fsspec.config.conf.setdefault(protocol, {})["use_listings_cache"] = False
  try:
    fsspec.get_filesystem_class("gcs")
  except (ImportError, ValueError):
    if importlib.util.find_spec("tensorflow") is None:  # etils.epath's other way to a bucket.
      raise UserError(f"{flag}: a gs:// path needs gcsfs: pip install -r requirements-gcs.txt") from None


def local_dir(url: str, *names: str) -> str:
  """The host-local folder that stands in for a URL run directory's local files:
  $XDG_CACHE_HOME/gpt_jax/<scheme>/<bucket>/<path>/<names> (default ~/.cache)."""
  scheme, rest = run_dir(url).split("://", 1)
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "gpt_jax", scheme, *rest.split("/"), *names)


def run(main):
  """`app.run(main)` for every entry point: bad flags, config files, overrides and
  UserErrors all end as one `error: ...` line and exit code 2."""
  from absl import app

  app.run(cli_main(main), flags_parser=_parse_flags)


def _fail(field: str, value, allowed: str):
  raise ConfigError(f"config.{field}={value!r} is invalid: {allowed}")


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def _positive_int(config, *fields):
  for f in fields:
    v = _get(config, f)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
      _fail(f, v, "must be a positive integer")


def _non_negative(config, *fields):
  for f in fields:
    v = _get(config, f)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
      _fail(f, v, "must be a number >= 0")


def _one_of(config, field, allowed):
  v = _get(config, field)
  if v not in allowed:
    _fail(field, v, "allowed values are " + ", ".join(repr(a) for a in allowed))


def _in_range(config, field, lo, hi, hi_inclusive=False):
  v = _get(config, field)
  ok = (
    isinstance(v, (int, float))
    and not isinstance(v, bool)
    and lo <= v
    and (v <= hi if hi_inclusive else v < hi)
  )
  if not ok:
    _fail(field, v, f"must be in [{lo}, {hi}{']' if hi_inclusive else ')'}")


def normalize_pattern(value) -> tuple[str, ...]:
  """attention_pattern from the command line: "dense,local" arrives as a
  string or, through config_flags, as the one-element tuple ("dense,local",)."""
  items = [value] if isinstance(value, str) else list(value)
  parts = []
  for item in items:
    if isinstance(item, str):
      parts += [p.strip(" '\"") for p in item.replace("(", "").replace(")", "").split(",")]
    else:
      parts.append(item)
  return tuple(p for p in parts if p)


def validate_model(m, prefix: str = "model") -> None:
  """Checks a `config.model` ConfigDict (also used for imported HF configs)."""
  cfg = ml_collections.ConfigDict({prefix: m})
  _positive_int(
    cfg,
    *(
      f"{prefix}.{f}"
      for f in (
        "vocab_size",
        "block_size",
        "num_layers",
        "num_heads",
        "d_model",
        "mlp_ratio",
        "vocab_pad_multiple",
      )
    ),
  )
  if m.d_model % m.num_heads:
    _fail(
      f"{prefix}.num_heads",
      m.num_heads,
      f"must divide {prefix}.d_model={m.d_model} (head dim = d_model / num_heads)",
    )
  _one_of(cfg, f"{prefix}.norm_position", ("pre", "post"))
  _one_of(cfg, f"{prefix}.activation", ("gelu_tanh", "gelu"))
  _one_of(cfg, f"{prefix}.attention_impl", ("xla", "dot_product_attention", "cudnn"))
  _one_of(cfg, f"{prefix}.dtype", DTYPE_NAMES)
  _one_of(cfg, f"{prefix}.param_dtype", DTYPE_NAMES)
  _one_of(cfg, f"{prefix}.remat", ("none", "full", "dots_saveable"))
  if not isinstance(m.scan_layers, bool):
    _fail(f"{prefix}.scan_layers", m.scan_layers, "must be True or False")
  if not isinstance(m.scale_residual_init, bool):
    _fail(f"{prefix}.scale_residual_init", m.scale_residual_init, "must be True or False")
  _non_negative(cfg, f"{prefix}.init_std", f"{prefix}.layer_norm_epsilon")
  for f in ("embd_dropout", "attn_dropout", "resid_dropout"):
    _in_range(cfg, f"{prefix}.{f}", 0.0, 1.0)
  pattern = m.attention_pattern
  if not isinstance(pattern, (tuple, list)) or not pattern or any(p not in ATTENTION_KINDS for p in pattern):
    _fail(
      f"{prefix}.attention_pattern",
      pattern,
      "must be a non-empty sequence of " + " / ".join(repr(k) for k in ATTENTION_KINDS),
    )
  if "local" in pattern:
    _positive_int(cfg, f"{prefix}.local_window")
    if m.local_window > m.block_size:
      _fail(f"{prefix}.local_window", m.local_window, f"must be <= {prefix}.block_size={m.block_size}")
  if m.attention_impl != "xla" and m.attn_dropout > 0:
    _fail(
      f"{prefix}.attn_dropout",
      m.attn_dropout,
      f"must be 0 with {prefix}.attention_impl={m.attention_impl!r} (it has no attention dropout)",
    )
  if m.attention_impl == "cudnn":
    # cuDNN's flash attention: 16-bit inputs, head dim a multiple of 8 and at
    # most 256 (128 before Hopper, which JAX reports when it compiles).
    if m.dtype not in ("bfloat16", "float16"):
      _fail(f"{prefix}.dtype", m.dtype, f"must be bfloat16 or float16 with {prefix}.attention_impl='cudnn'")
    head_dim = m.d_model // m.num_heads
    if head_dim % 8 or head_dim > 256:
      _fail(
        f"{prefix}.num_heads",
        m.num_heads,
        f"gives head dim {head_dim} (d_model / num_heads); {prefix}.attention_impl='cudnn' needs a "
        "multiple of 8, at most 256",
      )


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every field; normalises a few; returns the same config."""
  with config.unlocked():
    config.model.attention_pattern = normalize_pattern(config.model.attention_pattern)
  validate_model(config.model)
  _one_of(config, "job", ("pretrain", "finetune"))
  if config.job == "finetune":
    _validate_finetune(config)

  _one_of(config, "data.source", ("shakespeare", "files", "tfds"))
  if config.data.source == "files" and not config.data.paths:
    _fail("data.paths", config.data.paths, "give comma-separated globs when data.source='files'")
  if config.data.source == "tfds" and not config.data.tfds_name:
    _fail("data.tfds_name", config.data.tfds_name, "give a TFDS dataset name when data.source='tfds'")
  _one_of(config, "data.tokenizer", ("gpt2", "bpe"))
  if config.data.tokenizer == "bpe" and not 257 <= config.data.bpe_vocab_size <= config.model.vocab_size:
    _fail(
      "data.bpe_vocab_size",
      config.data.bpe_vocab_size,
      f"must be in [257, model.vocab_size={config.model.vocab_size}] (256 bytes + <|endoftext|> at least)",
    )
  if not config.data.eval_split:
    _in_range(config, "data.val_fraction", 0.0, 1.0)
    if config.data.val_fraction <= 0:
      _fail("data.val_fraction", config.data.val_fraction, "must be > 0 when data.eval_split is empty")
  _non_negative(config, "data.num_workers", "data.max_documents", "data.shuffle_seed")
  _positive_int(config, "data.prefetch")

  _positive_int(config, "train.batch_size", "train.grad_accum_steps", "train.max_bad_steps")
  _non_negative(config, "train.num_steps", "train.seq_len")
  if config.train.batch_size % config.train.grad_accum_steps:
    _fail(
      "train.grad_accum_steps",
      config.train.grad_accum_steps,
      f"must divide train.batch_size={config.train.batch_size}",
    )
  if config.train.seq_len > config.model.block_size:
    _fail("train.seq_len", config.train.seq_len, f"must be <= model.block_size={config.model.block_size}")

  o = "optim"
  _in_range(config, f"{o}.lr", 0.0, float("inf"))
  if config.optim.lr <= 0:
    _fail(f"{o}.lr", config.optim.lr, "must be > 0")
  _non_negative(config, f"{o}.warmup_steps", f"{o}.weight_decay", f"{o}.grad_clip", f"{o}.eps")
  _one_of(config, f"{o}.schedule", ("cosine", "linear", "constant"))
  _in_range(config, f"{o}.min_lr_ratio", 0.0, 1.0, hi_inclusive=True)
  _in_range(config, f"{o}.b1", 0.0, 1.0)
  _in_range(config, f"{o}.b2", 0.0, 1.0)

  _positive_int(config, "checkpoint.every_steps", "checkpoint.keep")
  _non_negative(config, "eval.every_steps", "eval.num_batches", "eval.batch_size")
  _validate_eval_tasks(config)
  _non_negative(config, "sample.num_samples", "sample.top_k")
  _positive_int(config, "log.every_steps")
  _non_negative(config, "log.peak_flops", "log.profile_steps")

  axes = ("data", "fsdp", "tensor")
  for a in axes:
    v = config.mesh[a]
    if isinstance(v, bool) or not isinstance(v, int) or (v <= 0 and v != -1):
      _fail(f"mesh.{a}", v, "must be a positive integer or -1 (all remaining devices)")
  if sum(config.mesh[a] == -1 for a in axes) > 1:
    _fail("mesh", {a: config.mesh[a] for a in axes}, "at most one of data/fsdp/tensor may be -1")
  if config.model.num_heads % max(config.mesh.tensor, 1):
    _fail("mesh.tensor", config.mesh.tensor, f"must divide model.num_heads={config.model.num_heads}")

  _non_negative(config, "sample.num_samples", "sample.max_new_tokens", "sample.temperature", "sample.top_k")
  _in_range(config, "sample.top_p", 0.0, 1.0, hi_inclusive=True)
  if config.sample.top_p <= 0:
    _fail("sample.top_p", config.sample.top_p, "must be in (0, 1]")
  return config


FINETUNE_TASKS = ("classification", "entailment", "similarity", "multiple_choice", "dialogue")


def check_run_inputs(config) -> None:
  """When pretraining starts: eval.tasks files exist and the end-of-run samples fit the model."""
  from pathlib import Path

  from gpt_jax import eval_tasks

  for spec in config.eval.tasks:
    path = eval_tasks.parse_spec(spec).path
    if path and not Path(path).is_file():
      _fail("eval.tasks", spec, f"no such file {path}")
  if config.sample.num_samples and not 0 < config.sample.max_new_tokens < config.model.block_size:
    _fail(
      "sample.max_new_tokens",
      config.sample.max_new_tokens,
      f"must be in [1, model.block_size={config.model.block_size}) when sample.num_samples > 0",
    )


def _validate_eval_tasks(config) -> None:
  """eval.tasks specs parse (their files are checked when a run starts: check_run_inputs)."""
  from gpt_jax import eval_tasks

  for spec in config.eval.tasks:
    try:
      eval_tasks.parse_spec(spec)
    except UserError as e:
      _fail("eval.tasks", spec, str(e))


def _validate_finetune(config) -> None:
  """config.finetune (see configs/base.py and gpt_jax/finetune.py)."""
  fc = config.finetune
  _one_of(config, "finetune.task", FINETUNE_TASKS)
  if config.init_from and fc.pretrained and config.init_from != fc.pretrained:
    _fail(
      "finetune.pretrained", fc.pretrained, f"differs from config.init_from={config.init_from!r}; give one"
    )
  if fc.task == "dialogue":
    if not fc.train_path.endswith(".jsonl"):
      _fail("finetune.train_path", fc.train_path, 'give a .jsonl file of {"turns": [...]} dialogues')
    if fc.eval_path and not fc.eval_path.endswith(".jsonl"):
      _fail("finetune.eval_path", fc.eval_path, "must be a .jsonl file (or empty)")
    if fc.tfds_name:
      _fail("finetune.tfds_name", fc.tfds_name, "dialogue data comes from finetune.train_path (JSONL)")
    _one_of(config, "finetune.loss_turns", ("last", "all"))
  else:
    if bool(fc.train_path) == bool(fc.tfds_name):
      _fail(
        "finetune.train_path",
        fc.train_path,
        "give exactly one of finetune.train_path (.jsonl / .csv / .tsv) or finetune.tfds_name",
      )
    if fc.tfds_name and fc.eval_path:
      _fail(
        "finetune.eval_path", fc.eval_path, "with finetune.tfds_name the eval data is finetune.eval_split"
      )
    if fc.regression and fc.task == "multiple_choice":
      _fail("finetune.regression", fc.regression, "multiple_choice scores choices; regression does not apply")
    if not fc.regression and fc.task != "multiple_choice":
      _positive_int(config, "finetune.num_classes")
      if fc.num_classes < 2:
        _fail("finetune.num_classes", fc.num_classes, "must be >= 2")
      names = [n for n in fc.labels.split(",") if n.strip()] if fc.labels else []
      if names and len(names) != fc.num_classes:
        _fail("finetune.labels", fc.labels, f"must name finetune.num_classes={fc.num_classes} labels")
    # Metrics where higher is better, as finetune.py selects best/ by them.
    binary = not fc.regression and fc.task != "multiple_choice" and fc.num_classes == 2
    allowed = {"": True, "accuracy": not fc.regression, "f1": binary}
    allowed.update(pearson=fc.regression, spearman=fc.regression)
    if not allowed.get(fc.best_metric, False):
      _fail(
        "finetune.best_metric",
        fc.best_metric,
        "allowed here: " + ", ".join(repr(k) for k, v in allowed.items() if v),
      )
  _non_negative(config, "finetune.lm_coef", "finetune.epochs", "finetune.max_len", "finetune.max_examples")
  _in_range(config, "finetune.head_dropout", 0.0, 1.0)
  _in_range(config, "finetune.warmup_fraction", 0.0, 1.0)
  if fc.max_len and fc.max_len < 8:
    _fail("finetune.max_len", fc.max_len, "must be 0 (model.block_size) or >= 8")


def seq_len(config) -> int:
  """Training sequence length: train.seq_len or the model's full context."""
  return config.train.seq_len or config.model.block_size

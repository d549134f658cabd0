"""The model's hyper-parameters as a frozen, hashable, typed dataclass, validated in one place.

Configs keep `config.model` as an ml_collections section (command-line
overrides, config.json); everything that builds or runs the model takes a
`ModelConfig` made from it with `of(...)`, which checks every field and
names the bad one (`config.model.num_heads=5 is invalid: ...`). Being frozen
and hashable, it keys compiled-program caches directly.
"""

from __future__ import annotations

import dataclasses

from gpt_jax import errors

DTYPE_NAMES = ("float32", "bfloat16", "float16")
ATTENTION_KINDS = ("dense", "local")
ATTENTION_IMPLS = ("xla", "dot_product_attention", "cudnn", "splash")
REMATS = ("none", "full", "dots_saveable", "dots_offloaded", "attention_saveable")
KERNEL_LAYOUTS = ("in_out", "out_in")

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


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """`config.model` (every field is commented in configs/base.py), plus two
  decoding layouts that no config file sets: the sampler chooses them."""

  vocab_size: int = 50257
  block_size: int = 1024
  num_layers: int = 12
  num_heads: int = 12
  d_model: int = 768
  mlp_ratio: int = 4
  norm_position: str = "pre"
  layer_norm_epsilon: float = 1e-5
  activation: str = "gelu_tanh"
  init_std: float = 0.02
  scale_residual_init: bool = True
  embd_dropout: float = 0.0
  attn_dropout: float = 0.0
  resid_dropout: float = 0.0
  attention_pattern: tuple[str, ...] = ("dense",)
  local_window: int = 256
  attention_impl: str = "xla"
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"
  scan_layers: bool = False
  vocab_pad_multiple: int = 1
  loss_chunk: int = 0
  # Projection kernels stored [inputs..., outputs...] ("in_out", as trained)
  # or [outputs..., inputs...] ("out_in"): XLA:CPU multiplies few rows by the
  # latter about 2x faster, so the sampler decodes on CPU with a transposed copy.
  kernel_layout: str = "in_out"
  # The tied LM head as [V, D] x [D, M] for M <= 64 rows: 1.5-2x faster on
  # XLA:CPU for the 50k-row table (the sampler sets it on CPU).
  few_row_head: bool = False

  def __post_init__(self):
    object.__setattr__(self, "attention_pattern", normalize_pattern(self.attention_pattern))
    validate(self)

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def mlp_width(self) -> int:
    return self.mlp_ratio * self.d_model

  def to_dict(self, *, with_layouts: bool = False) -> dict:
    """The `config.model` fields (layouts only when asked: no config file carries them)."""
    out = dataclasses.asdict(self)
    if not with_layouts:
      del out["kernel_layout"], out["few_row_head"]
    return out


FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))


def of(cfg, **changes) -> ModelConfig:
  """A ModelConfig from `config.model` (a ConfigDict, a dict, or a ModelConfig), with `changes`.

  Raises ConfigError naming the first invalid field, or a field `config.model` has that no
  ModelConfig knows.
  """
  if isinstance(cfg, ModelConfig):
    return dataclasses.replace(cfg, **changes) if changes else cfg
  values = dict(cfg.items() if hasattr(cfg, "items") else vars(cfg))
  unknown = sorted(set(values) - set(FIELDS))
  if unknown:
    raise errors.ConfigError(f"config.model.{unknown[0]}: no such model field (see configs/base.py)")
  return ModelConfig(**{**values, **changes})


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


def validate(m: ModelConfig) -> None:
  """Checks every field of `m` (ModelConfig calls it); errors name `config.model.<field>`."""
  p = "model"
  cfg = {p: _AsMapping(m)}
  ints = ("vocab_size", "block_size", "num_layers", "num_heads", "d_model", "mlp_ratio", "vocab_pad_multiple")
  errors.positive_int(cfg, *(f"{p}.{f}" for f in ints))
  if m.d_model % m.num_heads:
    errors.fail(
      f"{p}.num_heads", m.num_heads, f"must divide {p}.d_model={m.d_model} (head dim = d_model / num_heads)"
    )
  errors.one_of(cfg, f"{p}.norm_position", ("pre", "post"))
  errors.one_of(cfg, f"{p}.activation", ("gelu_tanh", "gelu"))
  errors.one_of(cfg, f"{p}.attention_impl", ATTENTION_IMPLS)
  errors.one_of(cfg, f"{p}.dtype", DTYPE_NAMES)
  errors.one_of(cfg, f"{p}.param_dtype", DTYPE_NAMES)
  errors.one_of(cfg, f"{p}.remat", REMATS)
  errors.boolean(cfg, f"{p}.scan_layers", f"{p}.scale_residual_init")
  errors.non_negative(cfg, f"{p}.init_std", f"{p}.layer_norm_epsilon")
  if isinstance(m.loss_chunk, bool) or not isinstance(m.loss_chunk, int) or m.loss_chunk < 0:
    errors.fail(f"{p}.loss_chunk", m.loss_chunk, "must be an integer >= 0 (0 = the plain loss)")
  for f in ("embd_dropout", "attn_dropout", "resid_dropout"):
    errors.in_range(cfg, f"{p}.{f}", 0.0, 1.0)
  pattern = m.attention_pattern
  if not isinstance(pattern, (tuple, list)) or not pattern or any(k not in ATTENTION_KINDS for k in pattern):
    errors.fail(
      f"{p}.attention_pattern",
      pattern,
      "must be a non-empty sequence of " + " / ".join(repr(k) for k in ATTENTION_KINDS),
    )
  if "local" in pattern:
    errors.positive_int(cfg, f"{p}.local_window")
    if m.local_window > m.block_size:
      errors.fail(f"{p}.local_window", m.local_window, f"must be <= {p}.block_size={m.block_size}")
  if m.attention_impl != "xla" and m.attn_dropout > 0:
    errors.fail(
      f"{p}.attn_dropout",
      m.attn_dropout,
      f"must be 0 with {p}.attention_impl={m.attention_impl!r} (it has no attention dropout)",
    )
  if m.attention_impl == "cudnn":
    # cuDNN's flash attention: 16-bit inputs, head dim a multiple of 8 and at
    # most 256 (128 before Hopper, which JAX reports when it compiles).
    if m.dtype not in ("bfloat16", "float16"):
      errors.fail(f"{p}.dtype", m.dtype, f"must be bfloat16 or float16 with {p}.attention_impl='cudnn'")
    head_dim = m.d_model // m.num_heads
    if head_dim % 8 or head_dim > 256:
      errors.fail(
        f"{p}.num_heads",
        m.num_heads,
        f"gives head dim {head_dim} (d_model / num_heads); {p}.attention_impl='cudnn' needs a "
        "multiple of 8, at most 256",
      )
  errors.one_of(cfg, f"{p}.kernel_layout", KERNEL_LAYOUTS)
  errors.boolean(cfg, f"{p}.few_row_head")


class _AsMapping:
  """Item access to a dataclass's attributes, for the dotted-field checks."""

  def __init__(self, obj):
    self._obj = obj

  def __getitem__(self, key):
    return getattr(self._obj, key)


# ------------------------------------------------------- derived quantities


def padded_vocab_size(cfg) -> int:
  """Rows of the embedding table: vocab_size rounded up to vocab_pad_multiple."""
  m = cfg.vocab_pad_multiple
  return -(-cfg.vocab_size // m) * m


def layer_windows(cfg) -> list[int | None]:
  """Attention window of each layer: None (dense) or cfg.local_window."""
  pattern = tuple(cfg.attention_pattern)
  return [None if pattern[i % len(pattern)] == "dense" else cfg.local_window for i in range(cfg.num_layers)]

"""The optax chain: global-norm clipping, AdamW with a decay mask, warmup + decay.

The schedule is given in steps (`optim.warmup_steps`, decay to
`train.num_steps`) or, as GPT-3 §B gives it, in tokens (`optim.warmup_tokens`,
`optim.decay_tokens`): then a batch-size ramp (ramp.py) leaves it intact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gpt_jax import errors, ramp
from gpt_jax import model as model_lib

SCHEDULES = ("cosine", "linear", "constant")


def validate(config) -> None:
  """config.optim (see configs/base.py)."""
  errors.positive(config, "optim.lr")
  errors.non_negative(config, "optim.warmup_steps", "optim.weight_decay", "optim.grad_clip", "optim.eps")
  errors.non_negative(config, "optim.warmup_tokens", "optim.decay_tokens")
  errors.boolean(config, "optim.offload_state")
  if 0 < config.optim.decay_tokens <= config.optim.warmup_tokens:
    errors.fail("optim.decay_tokens", config.optim.decay_tokens, "must exceed optim.warmup_tokens (or be 0)")
  errors.one_of(config, "optim.schedule", SCHEDULES)
  errors.in_range(config, "optim.min_lr_ratio", 0.0, 1.0, hi_inclusive=True)
  errors.in_range(config, "optim.b1", 0.0, 1.0)
  errors.in_range(config, "optim.b2", 0.0, 1.0)


def lr_schedule(optim_cfg, num_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then cosine / linear decay to lr * min_lr_ratio.

  The decay ends at `num_steps` (GPT-1 pretraining: cosine to 0; GPT-3 §B:
  cosine to 10%; GPT-1 fine-tuning: linear to 0).
  """
  o = optim_cfg
  peak, floor = o.lr, o.lr * o.min_lr_ratio
  warmup = optax.linear_schedule(0.0, peak, max(o.warmup_steps, 1))
  decay_steps = max(num_steps - o.warmup_steps, 1)
  if o.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=o.min_lr_ratio)
  elif o.schedule == "linear":
    decay = optax.linear_schedule(peak, floor, decay_steps)
  else:
    decay = optax.constant_schedule(peak)
  if o.warmup_steps == 0:
    return decay
  return optax.join_schedules([warmup, decay], [o.warmup_steps])


def uses_tokens(optim_cfg) -> bool:
  """True when the schedule is given in tokens (optim.warmup_tokens / optim.decay_tokens > 0)."""
  return bool(optim_cfg.warmup_tokens or optim_cfg.decay_tokens)


def lr_at_tokens(optim_cfg, decay_tokens: float):
  """tokens -> lr: linear warmup over optim.warmup_tokens, then cosine / linear / constant
  to lr * min_lr_ratio at `decay_tokens`, flat after (GPT-3 §B: 375M, 260B, 10%)."""
  o = optim_cfg
  peak, floor, warmup = o.lr, o.lr * o.min_lr_ratio, float(o.warmup_tokens)

  def lr(tokens):
    tokens = jnp.asarray(tokens, jnp.float32)
    rise = peak * tokens / max(warmup, 1.0)
    frac = jnp.clip((tokens - warmup) / max(decay_tokens - warmup, 1.0), 0.0, 1.0)
    if o.schedule == "cosine":
      fall = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(np.pi * frac))
    elif o.schedule == "linear":
      fall = peak + (floor - peak) * frac
    else:
      fall = jnp.full_like(frac, peak)
    return jnp.where(tokens < warmup, rise, fall)

  return lr


def schedule(config, stages: list[ramp.Stage] | None = None) -> optax.Schedule:
  """The run's schedule of the optimiser's update count: `lr_schedule` in steps, or in tokens
  when the config gives token fields, the count mapped to tokens through the batch `stages`
  (default: the constant train.batch_size). optim.decay_tokens = 0 ends the decay at
  train.num_steps; optim.warmup_steps is unused in tokens."""
  if not uses_tokens(config.optim):
    return lr_schedule(config.optim, config.train.num_steps)
  seq = config.train.seq_len or config.model.block_size  # config.seq_len, a floor above.
  stages = stages or ramp.stages(config.train.batch_size, seq)
  decay = config.optim.decay_tokens or float(ramp.sequences_before(config.train.num_steps, stages)) * seq
  lr = lr_at_tokens(config.optim, float(decay))
  # Sequences are exact in int32; tokens (up to 3e11) only as float32, where the schedule needs no more.
  return lambda count: lr(ramp.sequences_before(count, stages) * jnp.float32(seq))


def decay_mask(params, lookup_only=("wpe",)):
  """Weight decay on the matmul weights only: every kernel, and wte (it is
  also the tied output projection). Never on biases, LayerNorm gains or
  `lookup_only` tables (the position embeddings: model.position_tables),
  which multiply nothing.

  Scanned layers add a leading layer axis, so the test is on the name, not
  only on the rank.
  """

  def is_matmul_weight(path, x):
    names = [str(getattr(p, "key", p)) for p in path]
    return x.ndim >= 2 and names[-1] not in ("bias", "scale") and not set(names) & set(lookup_only)

  return jax.tree_util.tree_map_with_path(is_matmul_weight, params)


def make_optimizer(config, stages: list[ramp.Stage] | None = None) -> optax.GradientTransformation:
  o = config.optim
  parts = []
  if o.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(o.grad_clip))
  parts.append(
    optax.adamw(
      schedule(config, stages),
      b1=o.b1,
      b2=o.b2,
      eps=o.eps,
      weight_decay=o.weight_decay,
      mask=lambda params: decay_mask(params, tuple(model_lib.position_tables(config.model))),
    )
  )
  return optax.chain(*parts)

"""The optax chain: global-norm clipping, AdamW with a decay mask, warmup + decay."""

from __future__ import annotations

import jax
import optax

from gpt_jax import errors
from gpt_jax import model as model_lib

SCHEDULES = ("cosine", "linear", "constant")


def validate(config) -> None:
  """config.optim (see configs/base.py)."""
  errors.positive(config, "optim.lr")
  errors.non_negative(config, "optim.warmup_steps", "optim.weight_decay", "optim.grad_clip", "optim.eps")
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


def make_optimizer(config) -> optax.GradientTransformation:
  o = config.optim
  parts = []
  if o.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(o.grad_clip))
  parts.append(
    optax.adamw(
      lr_schedule(o, config.train.num_steps),
      b1=o.b1,
      b2=o.b2,
      eps=o.eps,
      weight_decay=o.weight_decay,
      mask=lambda params: decay_mask(params, tuple(model_lib.position_tables(config.model))),
    )
  )
  return optax.chain(*parts)

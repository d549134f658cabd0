"""Scaling-law ladder on Shakespeare: 4 model sizes x 3 token budgets + 1 held-out rung, on 2 CPU cores.

  python -m gpt_jax.ladder --config=configs/ladder_shakespeare.py --workdir=runs/ladder

Everything outside `ladder` is the shared training config of every rung (the
shakespeare.py job with a smaller batch); each rung sets model.num_layers /
d_model / num_heads, train.num_steps and optim.warmup_steps from the grid.
"""

import ml_collections

from configs import shakespeare


def get_config():
  c = shakespeare.get_config()
  # 16 x 128 = 2,048 tokens a step: the smallest budget is still ~60 steps.
  c.train.update(batch_size=16, num_steps=1000)
  c.optim.update(lr=3e-3, min_lr_ratio=0.1, weight_decay=0.1)
  c.checkpoint.every_steps = 250
  c.eval.update(every_steps=0, num_batches=0)  # One evaluation, at the end, on the whole validation split.
  c.log.every_steps = 25
  c.sample.num_samples = 0

  lc = c.ladder = ml_collections.ConfigDict()
  # Model shapes "LAYERSxD_MODEL" (heads = d_model / head_dim) or "LxDxHEADS",
  # comma-separated: --config.ladder.shapes=1x32,2x64. Depth grows with width
  # as in the GPT-2/3 families; the 2,048-id vocabulary makes the smallest
  # models mostly embedding (see ladder.n).
  lc.shapes = "1x32,2x48,2x64,3x96"
  lc.head_dim = 16
  # Token budgets D per shape (rounded to whole steps of batch x seq_len:
  # 49, 146 and 439 steps): a 9x range, so the fit can tell A/N^α from
  # B/D^β. The largest is under half an epoch of the training split.
  lc.tokens = (100_000, 300_000, 900_000)
  # IsoFLOP budgets instead (FLOPs; when given, `tokens` is ignored): every
  # shape trains for C / FLOPs-per-token tokens; budgets under min_steps steps
  # are left out.
  lc.flops = ()
  lc.min_steps = 20
  # A rung trained but left out of the fit, to check the prediction: a shape
  # bigger than the grid's at the largest budget (extrapolation in N and C).
  lc.holdout_shape = "4x128"  # shakespeare.py's model, 2x the largest fitted N.
  lc.holdout_tokens = 900_000
  lc.warmup_fraction = 0.1  # optim.warmup_steps = 10% of each rung's steps; 0 = keep optim.warmup_steps.
  # N in the fit: "matmul" (parameters minus the position table, the N of the
  # PaLM FLOPs formula; Chinchilla's total-parameter convention) or
  # "non_embedding" (Kaplan et al.).
  lc.n = "matmul"
  lc.huber_delta = 1e-3  # Hoffmann et al. §D.2.
  lc.bootstrap = 200  # Resamples of the runs for the confidence intervals.
  lc.ci_level = 0.9
  lc.seed = 0  # Of the bootstrap.
  return c

"""GPT-3 Small (Brown et al. 2020, Table 2.1): 12 x 768, 12 heads of 64, 2048 context, 125,226,240 params.

Also the GPT-3 family's common settings, which the other rungs
(gpt3_medium ... gpt3_175b) take through `rung`: 2048 context, layers
alternating dense and locally banded attention as in the Sparse Transformer
(GPT-3 §2.1; the paper does not give the band, 256 is ours), and Appendix B's
training: Adam b1 0.9, b2 0.95, eps 1e-8, global-norm clipping 1.0, weight
decay 0.1, linear warmup over the first 375M tokens, cosine decay to 10% of
the peak at 260B tokens, 300B tokens in all. The schedule is in tokens
(optim.warmup_tokens / decay_tokens), so it stays the paper's whatever the
batch. Table 2.1's batch is in tokens; here it is sequences of 2048 (its "M"
is 2^20: 0.5M = 256 sequences). Small: 0.5M tokens, lr 6e-4.
"""

import math

from configs import base

TRAIN_TOKENS = 300_000_000_000  # GPT-3 §2.2: every model is trained on 300B tokens.


def rung(num_layers: int, d_model: int, num_heads: int, batch_size: int, lr: float):
  """A GPT-3 family member: Table 2.1's shape, batch (sequences of 2048 tokens) and peak lr."""
  c = base.get_config()
  c.model.update(
    block_size=2048,
    num_layers=num_layers,
    d_model=d_model,
    num_heads=num_heads,
    attention_pattern=("dense", "local"),
    local_window=256,
    dtype="bfloat16",
    scan_layers=True,
  )
  c.train.batch_size = batch_size
  c.train.num_steps = math.ceil(TRAIN_TOKENS / (batch_size * 2048))
  c.optim.update(lr=lr, warmup_tokens=375_000_000, decay_tokens=260_000_000_000, min_lr_ratio=0.1)
  c.optim.update(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0)
  c.checkpoint.every_steps = 1000
  c.eval.every_steps = 1000
  return c


def get_config():
  return rung(num_layers=12, d_model=768, num_heads=12, batch_size=256, lr=6e-4)

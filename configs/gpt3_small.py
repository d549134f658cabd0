"""GPT-3 Small (Brown et al. 2020, Table 2.1): 12 x 768, 12 heads, 2048 context, ~125M.

Layers alternate dense and locally banded attention, as in the Sparse
Transformer (GPT-3 §2.1). The paper does not give the band width; 256 is
ours. Batch 0.5M tokens (256 x 2048), lr 6e-4, 375M warmup tokens, cosine
to 10% over 260B tokens, beta2 0.95, weight decay 0.1, clipping 1.0.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.model.update(
    block_size=2048,
    num_layers=12,
    d_model=768,
    num_heads=12,
    attention_pattern=("dense", "local"),
    local_window=256,
    dtype="bfloat16",
    scan_layers=True,
  )
  c.train.batch_size = 256
  c.train.num_steps = 500_000  # 260B tokens / 0.5M tokens per step.
  c.optim.update(lr=6e-4, warmup_steps=715, min_lr_ratio=0.1)
  return c

"""GPT-2 small: 12 layers, d_model 768, 12 heads, 124,439,808 parameters.

Radford et al. 2019, Table 2 ("117M"). Batch 512 x 1024 tokens (GPT-2 §2.3);
learning rate and warmup from GPT-3 Table 2.1 for the same width (125M).
"""

from configs import base


def get_config():
  c = base.get_config()
  c.model.update(num_layers=12, d_model=768, num_heads=12, dtype="bfloat16", scan_layers=True)
  c.train.batch_size = 512
  # ~300B tokens as in GPT-3 would be 572k steps of 512 x 1024 tokens.
  c.train.num_steps = 600_000
  c.optim.update(lr=6e-4, warmup_steps=715)  # 375M warmup tokens (GPT-3 §B).
  c.checkpoint.every_steps = 1000
  c.eval.every_steps = 1000
  c.data.tokenizer = "gpt2"
  return c

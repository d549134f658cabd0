"""GPT-3 2.7B (Table 2.1): 32 x 2560, 32 heads of 80, batch 1M tokens, lr 1.6e-4; 2,651,553,280 params."""

from configs import gpt3_xl


def get_config():
  return gpt3_xl.sharded_rung(num_layers=32, d_model=2560, num_heads=32, batch_size=512, lr=1.6e-4)

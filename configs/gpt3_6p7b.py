"""GPT-3 6.7B (Table 2.1): 32 x 4096, 32 heads of 128, batch 2M tokens, lr 1.2e-4; 6,658,404,352 params."""

from configs import gpt3_xl


def get_config():
  return gpt3_xl.sharded_rung(num_layers=32, d_model=4096, num_heads=32, batch_size=1024, lr=1.2e-4)

"""GPT-3 Large (Table 2.1): 24 x 1536, 16 heads of 96, batch 0.5M tokens, lr 2.5e-4; 760,300,032 params."""

from configs import gpt3_small


def get_config():
  return gpt3_small.rung(num_layers=24, d_model=1536, num_heads=16, batch_size=256, lr=2.5e-4)

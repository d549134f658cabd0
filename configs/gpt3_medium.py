"""GPT-3 Medium (Table 2.1): 24 x 1024, 16 heads of 64, batch 0.5M tokens, lr 3e-4; 355,871,744 params."""

from configs import gpt3_small


def get_config():
  return gpt3_small.rung(num_layers=24, d_model=1024, num_heads=16, batch_size=256, lr=3e-4)

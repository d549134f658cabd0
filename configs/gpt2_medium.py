"""GPT-2 medium: 24 layers, d_model 1024, 16 heads, 354,823,168 parameters ("345M")."""

from configs import gpt2_small


def get_config():
  c = gpt2_small.get_config()
  c.model.update(num_layers=24, d_model=1024, num_heads=16)
  c.optim.lr = 3e-4  # GPT-3 Table 2.1, 350M.
  return c

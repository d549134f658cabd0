"""GPT-2 XL: 48 layers, d_model 1600, 25 heads, 1,557,611,200 parameters ("1542M").

25 heads of 64: tensor parallelism must divide 25 (1 or 5), so the default
layout is pure FSDP. `python -m gpt_jax.plan` shows per-device memory.
"""

from configs import gpt2_small


def get_config():
  c = gpt2_small.get_config()
  c.model.update(num_layers=48, d_model=1600, num_heads=25, remat="full")
  c.optim.lr = 2e-4  # GPT-3 Table 2.1, 1.3B.
  c.mesh.update(data=1, fsdp=-1)
  return c

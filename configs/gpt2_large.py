"""GPT-2 large: 36 layers, d_model 1280, 20 heads, 774,030,080 parameters ("762M")."""

from configs import gpt2_small


def get_config():
  c = gpt2_small.get_config()
  c.model.update(num_layers=36, d_model=1280, num_heads=20, remat="dots_saveable")
  c.optim.lr = 2.5e-4  # GPT-3 Table 2.1, 760M.
  c.mesh.update(data=1, fsdp=-1)  # Shard params and optimiser state over all devices.
  return c

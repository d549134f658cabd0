"""GPT-3 13B (Table 2.1): 40 x 5120, 40 heads of 128, batch 2M tokens, lr 1e-4; 12,853,386,240 params.

d_model: the table prints 5140 beside 40 heads of 128, which are 5120 wide
(and 5140 / 40 = 128.5 is no head width). We take 5120 = 40 x 128, keeping
the printed heads and head width so attention is exactly d_model wide; 5120
is also a multiple of 128 (TPU lanes) and of every power-of-two FSDP degree
up to 1024, which 5140 (= 4 x 5 x 257) is not.
"""

from configs import gpt3_xl


def get_config():
  return gpt3_xl.sharded_rung(num_layers=40, d_model=5120, num_heads=40, batch_size=1024, lr=1e-4)

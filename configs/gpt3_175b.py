"""GPT-3 175B (Table 2.1): 96 x 12288, 96 heads of 128, batch 3.2M tokens, lr 6e-5; 174,604,259,328 params.

Batch: 3.2M tokens is no whole number of 2048-token sequences (3.2 x 2^20 /
2048 = 1638.4); we take 1536 sequences (3,145,728 tokens), the batch of
MLPerf's GPT-3 175B benchmark, which 512 chips (a v5p-1024) divide evenly.
"""

from configs import gpt3_xl


def get_config():
  return gpt3_xl.sharded_rung(num_layers=96, d_model=12288, num_heads=96, batch_size=1536, lr=6e-5)

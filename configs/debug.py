"""Tiny model for tests: every code path in seconds on a CPU."""

from configs import base


def get_config():
  c = base.get_config()
  c.model.update(vocab_size=320, block_size=32, num_layers=2, d_model=32, num_heads=4, local_window=8)
  c.data.update(tokenizer="bpe", bpe_vocab_size=320, max_documents=200)
  c.train.update(batch_size=8, num_steps=10)
  c.optim.update(lr=1e-3, warmup_steps=2)
  c.checkpoint.every_steps = 5
  c.eval.update(every_steps=5, num_batches=2)
  c.log.every_steps = 1
  c.sample.update(num_samples=1, max_new_tokens=8)
  return c

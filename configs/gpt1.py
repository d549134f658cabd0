"""GPT-1 (Radford et al. 2018): post-LN, 512 context, 12 x 768, 12 heads.

Vocabulary: 40,478 BPE tokens (40,000 merges + 478 base symbols); our
trained byte-level BPE of that size reserves its last id for <|endoftext|>.
Fine-tuning appends its start / delimiter / extract tokens (gpt_jax.finetune).
Pretraining: Adam lr 2.5e-4, 2000 warmup updates then cosine to 0,
minibatches of 64 x 512 tokens, dropout 0.1, L2 0.01 on non-bias weights.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.model.update(
    vocab_size=40478,
    block_size=512,
    num_layers=12,
    d_model=768,
    num_heads=12,
    norm_position="post",
    scale_residual_init=False,
    embd_dropout=0.1,
    attn_dropout=0.1,
    resid_dropout=0.1,
  )
  c.data.update(tokenizer="bpe", bpe_vocab_size=40478)
  c.train.batch_size = 64
  c.train.num_steps = 100_000
  c.optim.update(
    lr=2.5e-4, warmup_steps=2000, schedule="cosine", min_lr_ratio=0.0, b2=0.999, weight_decay=0.01
  )
  return c

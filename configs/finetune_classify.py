"""GPT-1 fine-tuning (Radford et al. 2018, §3.3 and §4.1) on a local classification file.

    python -m gpt_jax.finetune --config=configs/finetune_classify.py --workdir=runs/clf \
        --config.init_from=runs/pretrain \
        --config.finetune.train_path=train.jsonl --config.finetune.eval_path=dev.jsonl

Rows: {"text": ..., "label": 0 | 1 | a name from finetune.labels}. The model's
shape comes from the pretrained checkpoint; this file sets only GPT-1's
fine-tuning recipe, which the other configs/finetune_*.py files reuse.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.job = "finetune"
  # GPT-1 keeps its 0.1 dropout on embeddings, attention and residuals while fine-tuning.
  c.model.update(embd_dropout=0.1, attn_dropout=0.1, resid_dropout=0.1)
  c.train.batch_size = 32  # §4.1: batch size 32.
  # §4.1: lr 6.25e-5, linear warmup over 0.2% of training (finetune.warmup_fraction),
  # then linear decay to 0; Adam as in pretraining, with L2 0.01 on the weights.
  c.optim.update(lr=6.25e-5, schedule="linear", min_lr_ratio=0.0, b2=0.999, weight_decay=0.01, grad_clip=1.0)
  # §4.1: 3 epochs, λ = 0.5, classifier dropout 0.1.
  c.finetune.update(task="classification", epochs=3.0, lm_coef=0.5, head_dropout=0.1, warmup_fraction=0.002)
  c.checkpoint.every_steps = 1000
  c.log.every_steps = 50
  c.sample.num_samples = 0
  return c

"""DialoGPT-style forward dialogue model (Zhang et al. 2020): P(response | history).

    python -m gpt_jax.finetune --config=configs/dialogue.py --workdir=runs/dialogue \
        --config.init_from=runs/pretrain --config.finetune.train_path=dialogues.jsonl
    python -m gpt_jax.chat --workdir=runs/dialogue

Rows: {"turns": ["...", "...", ...]}; the loss covers the last turn (set
finetune.loss_turns="all" to train on every turn after the first).
"""

from configs import base


def get_config():
  c = base.get_config()
  c.job = "finetune"
  c.finetune.update(task="dialogue", loss_turns="last", epochs=3.0, warmup_fraction=0.01)
  c.train.batch_size = 32
  # Not from the paper (which trains 117M-762M models from scratch or from
  # GPT-2 with its own schedule): a fine-tuning rate that suits small models.
  c.optim.update(lr=1e-4, schedule="linear", min_lr_ratio=0.0, weight_decay=0.01)
  c.eval.batch_size = 0
  c.checkpoint.every_steps = 1000
  c.log.every_steps = 50
  c.sample.num_samples = 0
  return c

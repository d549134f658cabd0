"""A DialoGPT-style dialogue model from the default job's small model (runs/shakespeare), on
exchanges of the plays that `python -m gpt_jax.finetune --make_example=runs/examples` writes.

    python -m gpt_jax.finetune --make_example=runs/examples
    python -m gpt_jax.finetune --config=configs/shakespeare_dialogue.py --workdir=runs/dialogue \
        --config.init_from=runs/shakespeare
    python -m gpt_jax.chat --workdir=runs/dialogue --once "What news, my lord?"

configs/dialogue.py's rate (1e-4, 3 epochs) suits a pretrained GPT-2; the
default job's ~1M-parameter model needs 10x that and 10 epochs to answer in
the corpus's words. configs/shakespeare_dialogue_backward.py is its MMI partner.
"""

from configs import dialogue


def get_config():
  c = dialogue.get_config()
  c.finetune.update(
    train_path="runs/examples/dialogues_train.jsonl",
    eval_path="runs/examples/dialogues_dev.jsonl",
    epochs=10.0,
  )
  c.optim.lr = 1e-3
  c.log.every_steps = 20
  return c

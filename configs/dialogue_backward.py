"""The backward dialogue model for MMI reranking: P(source | response) (DialoGPT §4).

Same data and recipe as configs/dialogue.py with the turns reversed, and the
loss on every turn after the (now first) response, i.e. on the whole source.

    python -m gpt_jax.chat --workdir=runs/dialogue --mmi_workdir=runs/dialogue_backward
"""

from configs import dialogue


def get_config():
  c = dialogue.get_config()
  c.finetune.update(reverse_turns=True, loss_turns="all")
  return c

"""The backward (MMI) partner of configs/shakespeare_dialogue.py: P(source | response).

    python -m gpt_jax.finetune --config=configs/shakespeare_dialogue_backward.py \
        --workdir=runs/dialogue_backward --config.init_from=runs/shakespeare
    python -m gpt_jax.chat --workdir=runs/dialogue --mmi_workdir=runs/dialogue_backward
"""

from configs import shakespeare_dialogue


def get_config():
  c = shakespeare_dialogue.get_config()
  c.finetune.update(reverse_turns=True, loss_turns="all")
  return c

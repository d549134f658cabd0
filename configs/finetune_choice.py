"""GPT-1 multiple-choice fine-tuning on local files: `start context delim answer_k extract` per answer.

Rows: {"context": ..., "choices": ["...", "...", ...], "label": index of the
right choice}; in CSV / TSV the choices are the columns choices_0, choices_1, ...
(GPT-1 used this for RACE and the Story Cloze Test.)
"""

from configs import finetune_classify


def get_config():
  c = finetune_classify.get_config()
  c.finetune.task = "multiple_choice"
  return c

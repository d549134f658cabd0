"""GPT-1 entailment fine-tuning on local files: `start premise delim hypothesis extract`.

Rows: {"premise": ..., "hypothesis": ..., "label": 0 | 1 | ...}; set
finetune.num_classes=3 and finetune.labels for MNLI-style three-way labels.
"""

from configs import finetune_classify


def get_config():
  c = finetune_classify.get_config()
  c.finetune.task = "entailment"
  return c

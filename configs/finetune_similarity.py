"""GPT-1 similarity fine-tuning on local files: both orders, extract states added.

Rows: {"text_a": ..., "text_b": ..., "label": 0 | 1} (paraphrase, as MRPC / QQP);
for graded scores (STS-B) add --config.finetune.regression=True.
"""

from configs import finetune_classify


def get_config():
  c = finetune_classify.get_config()
  c.finetune.task = "similarity"
  return c

"""GPT-1 on STS-B (the paper: 82.0 Pearson), from TFDS glue/stsb: similarity with a regression head.

Scores 0-5; mean squared error, Pearson and Spearman on validation; best/
keeps the highest Pearson.
"""

from configs import finetune_classify


def get_config():
  c = finetune_classify.get_config()
  c.finetune.update(task="similarity", tfds_name="glue/stsb", fields="sentence1,sentence2", regression=True)
  return c

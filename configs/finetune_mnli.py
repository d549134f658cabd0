"""GPT-1 on MNLI (the paper: 82.1 / 81.4 matched / mismatched), from TFDS glue/mnli."""

from configs import finetune_classify


def get_config():
  c = finetune_classify.get_config()
  c.finetune.update(
    task="entailment",
    tfds_name="glue/mnli",
    eval_split="validation_matched",
    num_classes=3,
    labels="entailment,neutral,contradiction",
  )
  return c

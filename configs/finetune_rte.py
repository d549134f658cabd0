"""GPT-1 on RTE (the paper: 56.0% accuracy), from TFDS glue/rte."""

from configs import finetune_classify


def get_config():
  c = finetune_classify.get_config()
  c.finetune.update(
    task="entailment", tfds_name="glue/rte", fields="sentence1,sentence2", labels="entailment,not_entailment"
  )
  return c

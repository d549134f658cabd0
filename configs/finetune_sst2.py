"""GPT-1 on SST-2 (GLUE sentiment; the paper reports 91.3% accuracy), from TFDS glue/sst2.

The TFDS dataset is prepared as array_record in finetune.tfds_data_dir (or
TFDS's default directory) on first use; that step needs its download.
"""

from configs import finetune_classify


def get_config():
  c = finetune_classify.get_config()
  c.finetune.update(tfds_name="glue/sst2", fields="sentence", labels="negative,positive")
  return c

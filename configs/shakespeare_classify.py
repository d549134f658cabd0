"""Fine-tune the default job's small model (runs/shakespeare) on the keyword task that
`python -m gpt_jax.finetune --make_example=runs/examples` writes.

    python -m gpt_jax.finetune --make_example=runs/examples
    python -m gpt_jax.finetune --config=configs/shakespeare_classify.py --workdir=runs/clf \
        --config.init_from=runs/shakespeare

GPT-1's recipe (configs/finetune_classify.py: lr 6.25e-5, 3 epochs) suits a
117M model pretrained for days; the default job's ~1M-parameter model, trained
for minutes, moves too little at that rate (about 0.7 validation accuracy on
this task). A 16x larger learning rate and 6 epochs take it to >= 0.95 in
under a minute. Everything else is GPT-1's: the input transform, the head, the
auxiliary LM loss, dropout.
"""

from configs import finetune_classify


def get_config():
  c = finetune_classify.get_config()
  c.finetune.update(
    train_path="runs/examples/keyword_train.csv",
    eval_path="runs/examples/keyword_dev.csv",
    labels="negative,positive",
    epochs=6.0,
  )
  c.optim.lr = 1e-3
  c.log.every_steps = 5
  return c

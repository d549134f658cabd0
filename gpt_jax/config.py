"""Configuration validation: once, at start-up, every section by its owner.

`validate(config)` normalises the few fields the command line can only give
as strings, then calls each section's own validator; a bad value raises
`errors.ConfigError` naming the dotted field and what is allowed. Checks that
need the run's inputs (files, devices, the workdir) happen where those are
met: pretrain.check_run_inputs, train.check_batch, sharding.make_mesh.
"""

from __future__ import annotations

import ml_collections

from gpt_jax import (
  data_sources,
  errors,
  eval_tasks,
  finetune_data,
  metrics,
  model_config,
  optim,
  sampling,
  sharding,
  train,
)

JOBS = ("pretrain", "finetune")


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every field; normalises a few; returns the same config."""
  with config.unlocked():
    config.model.attention_pattern = model_config.normalize_pattern(config.model.attention_pattern)
  model_config.of(config.model)
  errors.one_of(config, "job", JOBS)
  if config.job == "finetune":
    finetune_data.validate(config)
  data_sources.validate(config)
  train.validate(config)
  optim.validate(config)
  eval_tasks.validate(config)
  metrics.validate(config)
  sharding.validate(config)
  s = config.sample
  errors.non_negative(config, "sample.num_samples")
  try:
    sampling.check_sampling(s.temperature, s.top_k, s.top_p, s.max_new_tokens, prefix="config.sample.")
  except errors.UserError as e:
    raise errors.ConfigError(str(e)) from None
  return config


def seq_len(config) -> int:
  """Training sequence length: train.seq_len or the model's full context."""
  return config.train.seq_len or config.model.block_size

"""Language-model pretraining: the `Task` that `train.run` trains for `job="pretrain"`.

Next-token cross-entropy over packed windows of the token cache (data.py),
the run's tokenizer pinned in the workdir, zero-shot tasks at each
evaluation (`eval.tasks`), and at the end the unigram baseline and samples.
`train_program` builds the same task without data, for the planner and the
benchmark to compile exactly the step `run` trains with.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

from gpt_jax import config as config_lib
from gpt_jax import data, errors, eval_tasks, evaluate, loss, model, paths, sample, sharding, train
from gpt_jax import tokenizer as tokenizer_lib


def lm_loss_fn(model_cfg, *, document_mask_eot: int | None = None, reset_positions: bool = False):
  """Next-token cross-entropy over `batch["tokens"]` [B, T+1], float32; with
  model.loss_chunk, over the tied head in chunks (loss.py), never [B, T, V] at once.

  document_mask_eot: the <|endoftext|> id, to keep attention inside each
  document of a window (data.segments; data.document_mask), with positions
  restarting per document if reset_positions.
  """
  gpt = model.GPT(model_cfg)
  m = gpt.cfg

  def loss_fn(params, batch, rng, deterministic):
    tokens_BT1 = batch["tokens"]
    inputs_BT = tokens_BT1[:, :-1]
    kw = {}
    if document_mask_eot is not None:
      kw["segment_ids_BT"], positions_BT = data.segments(inputs_BT, document_mask_eot)
      if reset_positions:
        kw["positions_BT"] = positions_BT
    rngs = {"dropout": rng}
    if m.loss_chunk:
      h_BTD = gpt.apply(
        {"params": params}, inputs_BT, deterministic=deterministic, rngs=rngs, lm_head=False, **kw
      )
      mask_BT = batch.get("mask", jnp.ones(h_BTD.shape[:2], jnp.float32))
      nll_sum = loss.chunked_cross_entropy(
        h_BTD, params["wte"], tokens_BT1[:, 1:], mask_BT,
        chunk=m.loss_chunk, vocab_size=m.vocab_size, dtype=model.DTYPES[m.dtype],
      )  # fmt: skip
      return nll_sum, mask_BT.sum(), {}
    logits_BTV = gpt.apply({"params": params}, inputs_BT, deterministic=deterministic, rngs=rngs, **kw)
    nll_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, tokens_BT1[:, 1:])
    mask_BT = batch.get("mask", jnp.ones_like(nll_BT))
    return (nll_BT * mask_BT).sum(), mask_BT.sum(), {}

  return loss_fn


def check_run_inputs(config) -> None:
  """When pretraining starts: eval.tasks files exist and the end-of-run samples fit the model."""
  for spec in config.eval.tasks:
    path = eval_tasks.parse_spec(spec).path
    if path and not Path(path).is_file():
      errors.fail("eval.tasks", spec, f"no such file {path}")
  if config.sample.num_samples and not 0 < config.sample.max_new_tokens < config.model.block_size:
    errors.fail(
      "sample.max_new_tokens",
      config.sample.max_new_tokens,
      f"must be in [1, model.block_size={config.model.block_size}) when sample.num_samples > 0",
    )


def _task(
  config, eot_id: int, train_iter=None, eval_batches=(), meta=None, extra_eval=None, finish=None
) -> train.Task:
  d = config.data
  return train.Task(
    init_params=lambda rng: model.init_params(config.model, rng),
    param_specs=model.logical_specs(config.model),
    loss_fn=lm_loss_fn(
      config.model, document_mask_eot=eot_id if d.document_mask else None, reset_positions=d.reset_positions
    ),
    train_iter=train_iter,
    eval_batches=eval_batches if isinstance(eval_batches, dict) else list(eval_batches),
    meta=meta or {},
    extra_eval=extra_eval,
    finish=finish,
    tokens_per_example=config_lib.seq_len(config),
  )


def pretrain_task(config, workdir: str, mesh) -> train.Task:
  """Language-model pretraining on config.data with the run's tokenizer."""
  check_run_inputs(config)
  # Refuses a vocabulary larger than the model's. Written to the workdir by Task.pin, once
  # nothing can refuse the run (at once with several processes: the others wait for its files).
  tok = tokenizer_lib.for_run(config, workdir, pin=jax.process_count() > 1)
  pi, pc = jax.process_index(), jax.process_count()
  # A batch ramp reads the stream in units of train.ramp_unit sequences (train.batch_size without one).
  unit = train.ramp_unit(config, mesh)
  iter_config = config if unit == config.train.batch_size else _with_batch_size(config, unit)
  train_iter = data.make_train_iterator(iter_config, tok, workdir, process_index=pi, process_count=pc)
  eval_bs = config.eval.batch_size or config.train.batch_size
  eval_batches = data.make_eval_batches(
    config,
    tok,
    workdir,
    process_index=pi,
    process_count=pc,
    batch_size=eval_bs,
    num_batches=config.eval.num_batches,
  )
  data.check_same_on_every_process(
    [
      data.prepare_cache(s.data, tok, workdir, process_index=pi, process_count=pc)
      for s in data.sources(config)
    ]
  )

  extra_eval = None
  if config.eval.tasks:

    def extra_eval(params):
      results = evaluate.run_tasks(config.model, params, tok, list(config.eval.tasks), batch_size=eval_bs)
      return {
        f"{name}/{k}": v
        for name, m in results.items()
        for k, v in m.items()
        if isinstance(v, int | float) and not k.endswith("_stderr")
      }

  def finish(params):
    main = jax.process_index() == 0
    s = config.sample
    if s.num_samples > 0:
      # Every process samples: the parameters are sharded over all of them.
      prompts = [s.prompt] * s.num_samples
      texts = sample.generate_text(
        config.model,
        params,
        tok,
        prompts,
        max_new_tokens=s.max_new_tokens,
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p,
        seed=config.train.seed,
      )
      for i, text in enumerate(texts if main else []):
        print(f"--- sample {i + 1} ---\n{s.prompt}{text}", flush=True)
    if not main:
      return None
    # What a model that learnt only token frequencies scores: the number to beat. A mixture's is
    # per source, and overall the mean weighted by validation tokens, as eval_loss is.
    out, total, weighted = {}, 0, 0.0
    for source in data.sources(config):
      baseline = data.unigram_loss(source.data, tok, workdir)
      n = max(len(data.prepare_cache(source.data, tok, workdir).tokens("validation")) - 1, 1)
      total, weighted = total + n, weighted + n * baseline
      if config.data.mixture:
        out[f"unigram/{source.name}/loss"] = baseline
    baseline = weighted / total
    out.update(unigram_loss=baseline, unigram_perplexity=math.exp(min(baseline, 50.0)))
    return out

  task = _task(
    config, tok.eot_id, train_iter, eval_batches, {"tokenizer": tok.fingerprint}, extra_eval, finish
  )
  return dataclasses.replace(
    task,
    next_steps=next_steps(config, workdir),
    pin=lambda: tokenizer_lib.pin_tokenizer(tok, config, workdir),
  )


def _with_batch_size(config, batch_size: int):
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.train.batch_size = batch_size
  return config


def next_steps(config, workdir: str) -> tuple[str, ...]:
  """Commands to run on the finished run, its workdir filled in."""
  w = paths.display(workdir)
  prompt = config.sample.prompt if config.sample.prompt.strip() else "Hello"
  steps = [f"python -m gpt_jax.sample --workdir={w} --prompt={shlex.quote(prompt)} --top_k=50"]
  if config.data.source == "shakespeare":
    # examples.py writes this run's held-out scenes and small tasks made from the plays.
    steps += [
      "python -m gpt_jax.finetune --make_example=runs/examples",
      f"python -m gpt_jax.evaluate --workdir={w} "
      "--task=perplexity:runs/examples/shakespeare_validation.jsonl",
      f"python -m gpt_jax.finetune --config=configs/shakespeare_classify.py --workdir=runs/clf "
      f"--config.init_from={w}",
    ]
  else:
    steps.append(
      f'python -m gpt_jax.evaluate --workdir={w} --task=perplexity:FILE.jsonl  # lines {{"text": ...}}'
    )
  m = config.model
  if m.norm_position == "pre" and set(m.attention_pattern) == {"dense"}:  # What HF GPT-2 can hold.
    steps.append(f"python -m gpt_jax.convert --ckpt={w} --to_hf={w}_hf")
  if config.log.tensorboard:
    steps.append(f"tensorboard --logdir={w}/tensorboard  # pip install -e .[tensorboard]")
  return tuple(steps)


def run(config, workdir: str) -> dict:
  """Pretrains `config` in `workdir` (resuming it); returns the final metrics."""
  return train.run(config, workdir, pretrain_task)


def abstract_batch(config, mesh) -> dict:
  """One global training batch as ShapeDtypeStructs: tokens [batch_size, seq_len + 1]."""
  shape = (config.train.batch_size, config_lib.seq_len(config) + 1)
  return {"tokens": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding.batch_sharding(mesh))}


def train_program(config, mesh) -> tuple[train.Program, dict, train.Task]:
  """(program, abstract batch, task) of pretraining `config` on `mesh`, without data:
  `train.build` on the task `run` trains, for the planner and the benchmark."""
  # The id only enters the program as a constant when data.document_mask is on:
  # the last id is where both the GPT-2 BPE and a trained BPE put <|endoftext|>.
  task = _task(config, config.model.vocab_size - 1)
  return train.build(task, config, mesh), abstract_batch(config, mesh), task

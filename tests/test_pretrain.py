"""Language-model pretraining: the task, its start-up checks, and the one train-step builder."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gpt_jax import config as config_lib
from gpt_jax import data_sources, model, pretrain, sharding, train
from gpt_jax.errors import ConfigError


def test_the_planner_compiles_the_step_training_runs(debug_config, tmp_path, monkeypatch):
  """plan.py and bench.py compile pretrain.train_program; train.run trains with train.build's
  program: the two lowered train steps must be the same program, text for text."""
  built = []
  real_build = train.build

  def recording(task, config, mesh):
    program = real_build(task, config, mesh)
    built.append((program, mesh))
    return program

  monkeypatch.setattr(train, "build", recording)
  debug_config.data.max_documents = 6
  debug_config.train.update(num_steps=1, compilation_cache_dir="none", batch_size=16, grad_accum_steps=2)
  debug_config.sample.num_samples = 0
  config = config_lib.validate(debug_config)
  pretrain.run(config, str(tmp_path / "run"))
  ((ran, mesh),) = built

  planned, batch, _ = pretrain.train_program(config, mesh)
  with sharding.activate(mesh, sharding.rules(config)):
    ran_text = ran.step.lower(ran.abstract, batch).as_text()
    planned_text = planned.step.lower(planned.abstract, batch).as_text()
  assert "donated" in ran_text or "tf.aliasing_output" in ran_text  # The state is donated.
  assert ran_text == planned_text
  assert ran.abstract == planned.abstract  # Same shapes, dtypes and shardings of the state.


def test_pretraining_runs_eval_tasks_and_prints_baseline_and_samples(debug_config, tmp_path, capsys):
  task_file = tmp_path / "mc.jsonl"
  rows = [{"context": "to be or not", "choices": [" to be", " xq zw"], "label": 0}] * 3
  task_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
  debug_config.data.max_documents = 6
  debug_config.train.update(num_steps=4, compilation_cache_dir="none")
  debug_config.eval.update(every_steps=2, tasks=(f"multiple_choice:{task_file}",))
  debug_config.sample.update(num_samples=2, prompt="ROMEO:", max_new_tokens=5)
  final = pretrain.run(debug_config, str(tmp_path / "run"))
  rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  evals = [r for r in rows if "mc/acc" in r]
  assert [r["step"] for r in evals] == [2, 4] and final["mc/acc"] in (0.0, 1.0)
  assert all(
    0 < r["eval_loss"] and r["eval_perplexity"] == pytest.approx(np.exp(r["eval_loss"])) for r in evals
  )
  logged = [r for r in rows if "loss" in r]
  for key in ("lr", "grad_norm", "tokens_per_sec", "mfu", "data_wait_fraction", "skipped_steps"):
    assert all(key in r for r in logged), key
  out = capsys.readouterr().out
  assert out.count("--- sample ") == 2 and "--- sample 2 ---\nROMEO:" in out
  # The end-of-run summary: once, the baseline in nats and perplexity, logged too; the next commands.
  assert out.count("unigram baseline") == 1 and out.count("finished ") == 1
  baseline = [r for r in rows if "unigram_loss" in r]
  assert len(baseline) == 1 and baseline[0]["step"] == 4
  assert baseline[0]["unigram_perplexity"] == pytest.approx(np.exp(baseline[0]["unigram_loss"]))
  assert f"unigram baseline {baseline[0]['unigram_loss']:.4f} (perplexity" in out
  assert f"validation loss {final['eval_loss']:.4f}" in out
  assert "python -m gpt_jax.sample --workdir=" in out and (tmp_path / "run" / "curves.png").stat().st_size
  # A rerun of the finished job says so in one line and recomputes nothing.
  again = pretrain.run(debug_config, str(tmp_path / "run"))
  out = capsys.readouterr().out
  assert out.strip().splitlines() == [
    f"{tmp_path / 'run'} has finished: step 4 of train.num_steps=4 (raise train.num_steps to train on)"
  ]
  assert again["step"] == 4 and again["eval_loss"] == final["eval_loss"]
  assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == len(rows)


def test_bad_eval_task_and_sample_length_fail_at_start_up(debug_config, tmp_path):
  debug_config.eval.tasks = ("multiple_choice:/no/such/file.jsonl",)
  with pytest.raises(ConfigError, match="config.eval.tasks=.*no such file /no/such/file.jsonl"):
    pretrain.pretrain_task(config_lib.validate(debug_config), str(tmp_path), None)
  debug_config.eval.tasks = ("ranking:x.jsonl",)
  with pytest.raises(ConfigError, match="unknown task kind 'ranking'"):
    config_lib.validate(debug_config)
  debug_config.eval.tasks = ()
  debug_config.sample.max_new_tokens = debug_config.model.block_size
  with pytest.raises(ConfigError, match="config.sample.max_new_tokens=32 is invalid"):
    pretrain.pretrain_task(config_lib.validate(debug_config), str(tmp_path), None)


# ------------------------------------------------------- document masking


@pytest.mark.parametrize("reset_positions", [True, False])
def test_masked_loss_is_the_sum_of_each_documents_loss(debug_config, reset_positions):
  """A window of several documents, masked, scores exactly as its pieces scored alone.

  A piece is [<|endoftext|>, the next document's tokens...] (the window's first
  piece: its start), predicting the tokens after each of its inputs.
  """
  m = debug_config.model
  eot, T = m.vocab_size - 1, m.block_size
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, eot, (2, T + 1))
  tokens[0, [4, 5, 17, 30]] = eot  # a one-token document (4..5) and a document cut by the window's end
  tokens[1, [0, 20]] = eot  # a window starting at a boundary
  params = model.init_params(m, jax.random.key(1))
  loss_fn = pretrain.lm_loss_fn(m, document_mask_eot=eot, reset_positions=reset_positions)
  masked, weight, _ = jax.jit(lambda p, b: loss_fn(p, b, jax.random.key(0), True))(
    params, {"tokens": jnp.asarray(tokens)}
  )
  assert weight == 2 * T

  gpt = model.GPT(m)
  total = 0.0
  for row in tokens:
    starts = sorted({0, *np.flatnonzero(row[:T] == eot)})
    for a, b in zip(starts, [*starts[1:], T]):
      positions = np.arange(b - a) + (0 if reset_positions else a)
      logits = gpt.apply(
        {"params": params}, jnp.asarray(row[None, a:b]), positions_BT=jnp.asarray(positions[None])
      )
      total += float(
        optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(row[None, a + 1 : b + 1])).sum()
      )
  np.testing.assert_allclose(float(masked), total, rtol=2e-6)
  unmasked, _, _ = pretrain.lm_loss_fn(m)(params, {"tokens": jnp.asarray(tokens)}, jax.random.key(0), True)
  assert abs(float(unmasked) - total) > 1e-3  # masking changed the loss


# --------------------------------------------------------------- mixtures


def test_a_mixture_reports_each_sources_validation(debug_config, tmp_path, capsys):
  docs = data_sources.shakespeare_documents()[200:230]
  (tmp_path / "books.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
  debug_config.data.max_documents = 0
  debug_config.data.mixture = {
    "plays": {"weight": 3, "max_documents": 12},
    "books": {"weight": 1, "source": "files", "paths": str(tmp_path / "books.jsonl"), "val_fraction": 0.2},
  }
  debug_config.data.document_mask = True
  debug_config.train.update(num_steps=2, compilation_cache_dir="none")
  debug_config.eval.update(every_steps=2, num_batches=0)
  debug_config.sample.num_samples = 0
  final = pretrain.run(config_lib.validate(debug_config), str(tmp_path / "run"))
  rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  (ev,) = [r for r in rows if "eval_loss" in r]
  for name in ("plays", "books"):
    assert ev[f"eval/{name}/perplexity"] == pytest.approx(np.exp(ev[f"eval/{name}/loss"]))
  lo, hi = sorted([ev["eval/plays/loss"], ev["eval/books/loss"]])
  assert lo < ev["eval_loss"] < hi and final["eval_loss"] == ev["eval_loss"]  # weighted by tokens
  # The unigram baseline per source, and overall weighted by validation tokens as eval_loss is.
  lo, hi = sorted([final["unigram/plays/loss"], final["unigram/books/loss"]])
  assert lo < final["unigram_loss"] < hi
  assert f"unigram baseline {final['unigram_loss']:.4f}" in capsys.readouterr().out


def test_a_mixture_run_resumes_exactly(debug_config, tmp_path):
  """Stopped at step 2 and resumed, a mixture run logs the losses of the run that never stopped."""
  docs = data_sources.shakespeare_documents()[200:260]
  (tmp_path / "books.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
  debug_config.data.max_documents = 0
  debug_config.data.mixture = {
    "plays": {"weight": 0.7, "max_documents": 20},
    "books": {"weight": 0.3, "source": "files", "paths": str(tmp_path / "books.jsonl")},
  }
  debug_config.train.update(num_steps=4, compilation_cache_dir=str(tmp_path / "jax_cache"))
  debug_config.checkpoint.every_steps = 2
  debug_config.eval.every_steps = 0
  debug_config.sample.num_samples = 0

  def losses(workdir, num_steps):
    debug_config.train.num_steps = num_steps
    pretrain.run(config_lib.validate(debug_config), str(workdir))
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}

  whole = losses(tmp_path / "whole", 4)
  losses(tmp_path / "stopped", 2)
  resumed = losses(tmp_path / "stopped", 4)
  assert [resumed[s] for s in (3, 4)] == [whole[s] for s in (3, 4)]  # bitwise: same batches, same order


def test_a_batch_ramp_run_resumes_exactly(debug_config, tmp_path):
  """GPT-3's ramp through the real data iterator (read in units of data x fsdp sequences): the
  stages' batches, and a run stopped inside the ramp logs the uninterrupted losses bitwise."""
  seq = debug_config.model.block_size
  debug_config.train.update(batch_size=24, batch_ramp_start=8, batch_ramp_tokens=48 * seq)
  debug_config.train.compilation_cache_dir = str(tmp_path / "jax_cache")
  debug_config.optim.update(warmup_tokens=16 * seq, decay_tokens=1000 * seq)
  debug_config.checkpoint.every_steps = 4
  debug_config.eval.every_steps = 0
  debug_config.log.every_steps = 1
  debug_config.sample.num_samples = 0

  def records(workdir, num_steps):
    debug_config.train.num_steps = num_steps
    pretrain.run(config_lib.validate(debug_config), str(workdir))
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["batch_size"]) for r in rows if "loss" in r}

  whole = records(tmp_path / "whole", 6)
  assert [whole[s][1] for s in range(1, 7)] == [8, 8, 8, 16, 16, 24]  # 8 devices: multiples of 8.
  records(tmp_path / "stopped", 4)  # Inside the 16-sequence stage.
  resumed = records(tmp_path / "stopped", 6)
  assert [resumed[s] for s in (5, 6)] == [whole[s] for s in (5, 6)]

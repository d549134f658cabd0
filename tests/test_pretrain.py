"""Language-model pretraining: the task, its start-up checks, and the one train-step builder."""

import json

import numpy as np
import pytest

from gpt_jax import config as config_lib
from gpt_jax import pretrain, sharding, train
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

"""Benchmarks report consistent figures (no speed is asserted here: `python -m gpt_jax.bench` prints them)."""

import subprocess
import sys
from pathlib import Path

import pytest

from configs import debug
from gpt_jax import bench, errors, metrics
from gpt_jax import config as config_lib

ROOT = Path(__file__).resolve().parents[1]


def test_step_statistics():
  s = bench._stats([0.2, 0.1, 0.4, 0.3])
  assert s["median_s"] == pytest.approx(0.25) and s["min_s"] == 0.1 and s["steps"] == 4
  assert s["iqr_pct"] == pytest.approx(100 * (0.325 - 0.175) / 0.25)


def test_train_benchmark_against_transformers_is_self_consistent():
  config = config_lib.validate(debug.get_config())
  r = bench.bench_train(
    config, steps=2, warmup=1, rounds=2, compare="hf_torch", threads=1, log=lambda s: None
  )
  seq = config.model.block_size
  assert r["tokens_per_step"] == config.train.batch_size * seq
  assert r["params"] == 36_736
  assert r["flops_per_token"] == metrics.flops_per_token(config.model, seq, r["params"])
  assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["step_median_s"])
  assert r["mfu"] == pytest.approx(r["flops_per_token"] * r["tokens_per_s"] / r["peak_flops"])
  assert r["speedup_vs_hf_torch"] == pytest.approx(r["tokens_per_s"] / r["hf_torch_tokens_per_s"])
  assert r["step_steps"] == r["hf_torch_step_steps"] == 2
  assert "measured float32" in r["peak_source"] and r["peak_memory_bytes"] > 0
  # On CPU the peak is the process's, torch's model and optimiser included.
  assert "transformers" in r["peak_memory_source"] and r["torch_threads"] == 1
  # The timed steps trained on their fixed batch.
  assert r["loss_last_call"] < r["loss_first_call"]
  text = bench.format_train(r)
  assert "speed-up vs transformers" in text and "MFU" in text
  assert r["hf_torch_differs"] == [] and "note:" not in text  # debug.py: GPT-2's architecture, on CPU.


def test_train_comparison_says_where_transformers_differs():
  m = config_lib.validate(debug.get_config()).model
  assert bench.reference_differences(m, "cpu") == []
  m.update(norm_position="post", attention_pattern=("dense", "local"), vocab_pad_multiple=128)
  notes = bench.reference_differences(m, "gpu")
  assert len(notes) == 4
  assert "post-LN" in notes[0] and "locally banded" in notes[1] and "384 rows" in notes[2]
  assert notes[3] == "transformers runs on this host's CPU (CPU torch), this model on gpu"


def test_sample_benchmark_wires_the_shape_through():
  config = config_lib.validate(debug.get_config())
  r = bench.bench_sample(
    config,
    compare="hf_torch",
    threads=1,
    batch_sizes=(2,),
    prompt_len=4,
    max_new_tokens=4,
    log=lambda s: None,
  )
  assert r["benchmark"] == "sample" and r["model"].startswith("2x32") and r["repeats"] == 3
  assert r["hf_torch_differs"] == []  # Both on this CPU.
  assert any(k.startswith("b2_") and "transformers" in k for k in r)
  # Tokens/s, time per step and bandwidth share are the same median call.
  for who in ("b2_greedy", "b2_topk_transformers"):
    step_s = r[f"{who}_ms_per_step"] / 1e3
    assert r[f"{who}_tokens_per_s"] == pytest.approx(2 / step_s, rel=0.02)
    expected = 100 * r["weight_bytes_per_step"] / step_s / (r["read_bandwidth_gb_per_s"] * 1e9)
    assert r[f"{who}_bandwidth_pct"] == pytest.approx(expected, rel=0.05)
  # Every weight but the position table (debug: 32 positions x 32 wide), in float32.
  assert r["weight_bytes_per_step"] == 4 * (36_736 - 32 * 32)
  assert r["peak_memory_bytes"] > 0 and r["b2_greedy_same_tokens"]
  assert r["torch_threads"] == 1 and "transformers" in r["peak_memory_source"]


def test_cli_usage_error_is_one_line():
  r = subprocess.run(
    [sys.executable, "-m", "gpt_jax.bench", "fly", "--config=configs/debug.py"],
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  assert r.returncode == 2 and r.stderr.count("\n") == 1 and "train|sample" in r.stderr, r.stderr


def test_train_benchmark_without_warmup_times_every_step():
  config = config_lib.validate(debug.get_config())
  r = bench.bench_train(config, steps=3, warmup=0, rounds=2, log=lambda s: None)
  # 3 steps over 2 rounds: 2 + 1, all timed; the first call's loss is a timed step's.
  assert r["step_steps"] == 3 and r["loss_first_call"] is not None and r["loss_last_call"] is not None
  assert "torch_threads" not in r and "transformers" not in r["peak_memory_source"]


@pytest.fixture
def nothing_runs(monkeypatch):
  """Bad arguments must be rejected before anything is built or compiled."""

  def fail(*args, **kwargs):
    raise AssertionError("the benchmark started despite bad arguments")

  monkeypatch.setattr(bench, "_JaxTrainer", fail)
  monkeypatch.setattr(bench, "_TorchTrainer", fail)
  monkeypatch.setattr(bench, "benchmark_generate", fail)


@pytest.mark.parametrize(
  "kw, flag",
  [
    (dict(warmup=-1), "--warmup=-1"),
    (dict(rounds=0), "--rounds=0"),
    (dict(steps=0), "--steps=0"),
    (dict(steps=2, rounds=3), "--steps=2 is fewer than --rounds=3"),
    (dict(threads=-1, compare="hf_torch"), "--threads=-1"),
    (dict(compare="bogus"), "--compare='bogus'"),
  ],
)
def test_train_benchmark_rejects_bad_arguments_up_front(nothing_runs, kw, flag):
  config = config_lib.validate(debug.get_config())
  with pytest.raises(errors.UserError) as e:
    bench.bench_train(config, **{"steps": 4, "warmup": 1, "rounds": 2, **kw}, log=lambda s: None)
  assert str(e.value).startswith(flag), str(e.value)


@pytest.mark.parametrize(
  "kw, flag",
  [
    (dict(max_new_tokens=0), "--max_new_tokens=0"),
    (dict(rounds=0), "--rounds=0"),
    (dict(batch_sizes=(0,)), "--batch_sizes=0"),
    (dict(batch_sizes=()), "--batch_sizes"),
    (dict(batch_sizes=(2, 2)), "--batch_sizes=2,2"),
    (dict(prompt_len=0), "--prompt_len=0"),
    (dict(prompt_len=16, max_new_tokens=17), "--prompt_len=16 + --max_new_tokens=17"),  # block_size 32
    (dict(threads=-1), "--threads=-1"),
    (dict(compare="bogus"), "--compare='bogus'"),
  ],
)
def test_sample_benchmark_rejects_bad_arguments_up_front(nothing_runs, kw, flag):
  config = config_lib.validate(debug.get_config())
  args = {"batch_sizes": (1,), "prompt_len": 4, "max_new_tokens": 4, "rounds": 1, **kw}
  with pytest.raises(errors.UserError) as e:
    bench.bench_sample(config, **args, log=lambda s: None)
  assert str(e.value).startswith(flag), str(e.value)


@pytest.mark.parametrize(
  "args, flag",
  [
    (["train", "--json_out=/nonexistent/dir/x.json"], "--json_out=/nonexistent/dir/x.json"),
    (["train", "--json_out=."], "--json_out=."),
    (["train", "--steps=2", "--rounds=3"], "--steps=2"),
    (["sample", "--batch_sizes=x"], "--batch_sizes=x"),
    (["sample", "--max_new_tokens=0"], "--max_new_tokens=0"),
    (["sample"], "--prompt_len=16 + --max_new_tokens=128"),  # Defaults overflow debug's 32 positions.
  ],
)
def test_cli_rejects_bad_arguments_in_one_line_before_running(args, flag):
  r = subprocess.run(
    [sys.executable, "-m", "gpt_jax.bench", *args, "--config=configs/debug.py"],
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
  assert r.stderr.startswith(f"error: {flag}") and not r.stdout, r.stderr

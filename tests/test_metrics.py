"""metrics.jsonl records and their resume, MFU arithmetic (FLOPs per token, peak FLOP/s), config.log."""

import json
import os

import jax
import numpy as np
import pytest

from configs import gpt2_small
from gpt_jax import errors, metrics, model_config


def test_flops_per_token_gpt2_small_golden():
  m = model_config.of(gpt2_small.get_config().model)
  n = 124_439_808  # All parameters (Radford et al. 2019, Table 2).
  # PaLM App. B: 6 N + 12 L H Q T, N without wpe (1024 x 768 = 786,432):
  # 6 x 123,653,376 + 12 x 12 x 12 x 64 x 1024 = 741,920,256 + 113,246,208.
  assert metrics.flops_per_token(m, 1024, n) == 855_166_464.0
  # Only the attention term depends on the sequence length: T = 512 halves it.
  assert metrics.flops_per_token(m, 512, n) == 741_920_256.0 + 56_623_104.0


def test_flops_per_token_debug_model(debug_config):
  # L=2, H=4, Q=8, D=32, block 32: 36,736 params of which wpe 32 x 32.
  assert metrics.flops_per_token(debug_config.model, 16, 36_736) == 6 * (36_736 - 1024) + 12 * 2 * 4 * 8 * 16


class _Device:
  def __init__(self, platform, device_kind):
    self.platform, self.device_kind = platform, device_kind


def test_configured_peak_flops_counts_every_device():
  n = len(jax.devices())
  assert metrics.peak_flops(2e12) == (2e12 * n, f"configured log.peak_flops=2e+12 x {n} devices")


@pytest.mark.parametrize(
  "platform, kind, per_chip",
  [("tpu", "TPU v5 lite", 197e12), ("tpu", "TPU v4", 275e12), ("gpu", "NVIDIA H100 80GB HBM3", 989e12)],
)
def test_peak_flops_of_a_known_accelerator_is_looked_up(monkeypatch, platform, kind, per_chip):
  monkeypatch.setattr(jax, "devices", lambda: [_Device(platform, kind)] * 4)
  monkeypatch.setattr(metrics, "measure_matmul_peak", lambda: pytest.fail("measured a known chip"))
  flops, source = metrics.peak_flops(0.0)
  assert flops == 4 * per_chip and source == f"{kind} bf16 peak {per_chip:g} x 4 devices"


@pytest.mark.parametrize("platform, kind", [("gpu", "Mystery GPU"), ("cpu", "cpu")])
def test_peak_flops_otherwise_measures_one_matmul(monkeypatch, platform, kind):
  # Fake CPU devices share the same cores: one matmul's rate, not times the device count.
  monkeypatch.setattr(jax, "devices", lambda: [_Device(platform, kind)] * 4)
  monkeypatch.setattr(metrics, "measure_matmul_peak", lambda: 3e9)
  assert metrics.peak_flops(0.0) == (3e9, f"measured float32 matmul peak on {kind.lower()} (3.0 GFLOP/s)")


@pytest.mark.parametrize(
  "field, value, allowed",
  [
    ("every_steps", 0, "must be a positive integer"),
    ("peak_flops", -1.0, "must be a number >= 0"),
    ("profile_steps", -2, "must be a number >= 0"),
    ("tensorboard", "yes", "must be True or False"),
  ],
)
def test_validate_names_the_field(debug_config, field, value, allowed):
  with debug_config.log.ignore_type():
    debug_config.log[field] = value
  with pytest.raises(errors.ConfigError) as e:
    metrics.validate(debug_config)
  assert str(e.value) == f"config.log.{field}={value!r} is invalid: {allowed}"


def _records(path):
  return [json.loads(line) for line in open(path)]


def test_writer_writes_one_json_record_per_line(tmp_path):
  w = metrics.MetricsWriter(str(tmp_path / "run"), tensorboard=True)
  w.write(1, {"loss": np.float32(2.5), "lr": 1e-3, "tokens": np.int64(512), "note": "x"})
  w.write(2, {"loss": float("nan")})  # Kept in the JSON record; TensorBoard gets finite values only.
  w.close()
  rows = _records(tmp_path / "run" / metrics.METRICS_FILE)
  assert rows[0] == {"step": 1, "loss": 2.5, "lr": 1e-3, "tokens": 512, "note": "x"}
  assert rows[1]["step"] == 2 and np.isnan(rows[1]["loss"])
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "run" / "tensorboard"))


def test_resume_moves_the_records_of_redone_steps_aside(tmp_path):
  run = tmp_path / "run"
  run.mkdir()
  lines = [json.dumps({"step": s, "loss": float(s)}) for s in (1, 2, 3, 4)]
  (run / metrics.METRICS_FILE).write_text("\n".join([*lines[:2], "not json", *lines[2:], '{"step": 5, "lo']))
  w = metrics.MetricsWriter(str(run), tensorboard=False, start_step=2)
  w.write(3, {"loss": 30.0})
  w.close()
  kept = (run / metrics.METRICS_FILE).read_text().splitlines()
  # Steps 3 and 4 will be redone: each step appears once. Lines that are not records stay.
  assert kept == [*lines[:2], "not json", '{"step": 5, "lo', json.dumps({"step": 3, "loss": 30.0})]
  assert [r["step"] for r in _records(run / metrics.SUPERSEDED_FILE)] == [3, 4]
  assert sorted(os.listdir(run)) == [metrics.METRICS_FILE, metrics.SUPERSEDED_FILE]  # No .tmp left.
  # A second resume before step 3 appends to the superseded records.
  metrics.MetricsWriter(str(run), tensorboard=False, start_step=1).close()
  assert [r["step"] for r in _records(run / metrics.SUPERSEDED_FILE)] == [3, 4, 2, 3]


def test_a_fresh_start_or_nothing_to_redo_leaves_the_file_alone(tmp_path):
  (tmp_path / metrics.METRICS_FILE).write_text('{"step": 1}\n{"step": 2}\n')
  metrics.MetricsWriter(str(tmp_path), tensorboard=False, start_step=2).close()
  metrics.MetricsWriter(str(tmp_path), tensorboard=False).close()
  assert (tmp_path / metrics.METRICS_FILE).read_text() == '{"step": 1}\n{"step": 2}\n'
  assert not (tmp_path / metrics.SUPERSEDED_FILE).exists()


def test_curves_png_and_last_records(tmp_path):
  w = metrics.MetricsWriter(str(tmp_path), tensorboard=False)
  for step, loss in ((1, 5.0), (2, 4.0), (3, 3.5)):
    w.write(step, {"loss": loss})
  w.write(3, {"eval_loss": 3.9, "eval_perplexity": float(np.exp(3.9))})
  w.write(3, {"unigram_loss": 5.9})
  w.flush()
  w.close()
  png = (tmp_path / metrics.CURVES_FILE).read_bytes()
  assert png.startswith(b"\x89PNG") and w.curves_path == f"{tmp_path}/{metrics.CURVES_FILE}"
  assert metrics.last_records(str(tmp_path)) == {
    "step": 3,
    "loss": 3.5,
    "eval_loss": 3.9,
    "eval_perplexity": pytest.approx(np.exp(3.9)),
    "unigram_loss": 5.9,
  }


@pytest.mark.slow
def test_tensorboard_serves_the_run_scalars(tmp_path):
  """The viewer the README points to (pip install -e .[tensorboard]) starts headless and serves
  what MetricsWriter logged."""
  import re
  import subprocess
  import sys
  import time
  import urllib.request

  w = metrics.MetricsWriter(str(tmp_path), tensorboard=True)
  for step in range(1, 6):
    w.write(step, {"loss": 6.0 - step})
  w.close()
  proc = subprocess.Popen(
    [sys.executable, "-m", "tensorboard.main", f"--logdir={tmp_path / 'tensorboard'}", "--host=127.0.0.1",
     "--port=0", "--load_fast=false"],
    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
  )  # fmt: skip
  try:
    url, deadline, out = None, time.time() + 120, ""
    while url is None and time.time() < deadline:
      line = proc.stdout.readline()
      out += line
      m = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
      url = m and m.group(1)
      assert line or proc.poll() is None, out
    assert url, out
    while time.time() < deadline:
      tags = json.loads(urllib.request.urlopen(f"{url}/data/plugin/scalars/tags", timeout=10).read())
      if tags.get(".", {}).get("loss"):
        break
      time.sleep(0.5)
    query = f"{url}/data/plugin/scalars/scalars?tag=loss&run=."
    points = json.loads(urllib.request.urlopen(query, timeout=10).read())
    assert [(p[1], p[2]) for p in points] == [(s, 6.0 - s) for s in range(1, 6)]
  finally:
    proc.terminate()
    proc.wait(timeout=30)

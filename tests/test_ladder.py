"""The scaling-law ladder: grid, shared tokenizer / token cache, resumption, report, prediction, CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import ladder_shakespeare
from gpt_jax import cli, ladder, metrics, plan, pretrain, scaling
from gpt_jax import config as config_lib
from gpt_jax.errors import ConfigError, UserError

ROOT = Path(__file__).resolve().parents[1]
# A ladder that trains in seconds: 3 shapes x 2 budgets (2 and 6 steps of 8 x 32 tokens) + a held-out
# rung, a 300-id BPE of 30 scenes. Heads are even so the slow test can split them over tensor=2.
TINY = [
  "--config.data.max_documents=30",
  "--config.data.bpe_vocab_size=300",
  "--config.model.vocab_size=300",
  "--config.model.block_size=32",
  "--config.train.batch_size=8",
  "--config.checkpoint.every_steps=1000",  # One save, at the end.
  "--config.log.every_steps=2",
  "--config.log.tensorboard=False",
  "--config.optim.lr=0.01",
  "--config.ladder.shapes=1x32,2x32,1x64",
  "--config.ladder.tokens=(512,1536)",
  "--config.ladder.holdout_shape=2x64",
  "--config.ladder.holdout_tokens=1536",
  "--config.ladder.bootstrap=30",
]
NAMES = [
  "1x32_D512",
  "1x32_D1.536k",
  "2x32_D512",
  "2x32_D1.536k",
  "1x64_D512",
  "1x64_D1.536k",
  "2x64_D1.536k",
]
# The fake runs' losses follow this law exactly (N = matmul parameters, D = tokens).
TRUTH = scaling.Chinchilla(E=2.0, A=100.0, B=20.0, alpha=0.4, beta=0.3)


LADDER_CONFIG = str(ROOT / "configs" / "ladder_shakespeare.py")


def tiny_config(*extra):
  config = cli.load_config(LADDER_CONFIG, [*TINY, *extra], lock=False)
  return config_lib.validate(config)


class Interrupted(Exception):
  pass


def fake_train(fail_at=None):
  """A train_fn that writes the metrics a run of TRUTH's loss would, and records its calls."""
  calls = []

  def train_fn(config, workdir):
    calls.append(os.path.basename(workdir))
    if fail_at is not None and len(calls) == fail_at:
      raise Interrupted  # The ladder is interrupted inside this rung.
    steps = config.train.num_steps
    n = ladder.param_counts(config.model)["matmul_params"]
    loss = float(TRUTH.loss(n, steps * config.train.batch_size * config_lib.seq_len(config)))
    assert (Path(workdir) / "tokenizer" / "gpt_jax_tokenizer.json").exists()  # Copied before training.
    with open(Path(workdir) / metrics.METRICS_FILE, "a") as f:
      f.write(json.dumps({"step": steps, "loss": loss + 0.1}) + "\n")
      f.write(json.dumps({"step": steps, "eval_loss": loss}) + "\n")
    return {"eval_loss": loss}

  return train_fn, calls


# ---------------------------------------------------------------- the grid


def test_grid_names_steps_and_holdout():
  rungs = ladder.validate(tiny_config())
  assert [r.name for r in rungs] == NAMES
  assert [r.steps for r in rungs] == [2, 6, 2, 6, 2, 6, 6]
  assert [r.tokens for r in rungs] == [512, 1536] * 3 + [1536]
  assert [r.held_out for r in rungs] == [False] * 6 + [True]
  assert (rungs[-1].num_layers, rungs[-1].d_model, rungs[-1].num_heads) == (2, 64, 4)
  # A hold-out on the grid moves out of the fit instead of training twice.
  rungs = ladder.validate(tiny_config("--config.ladder.shapes=1x32,2x32,1x64,2x64"))
  assert len(rungs) == 8 and [r.name for r in rungs if r.held_out] == ["2x64_D1.536k"]
  assert ladder.parse_shape("3x96x4", 16) == (3, 96, 4)


def test_default_ladder_is_the_documented_grid():
  rungs = ladder.validate(config_lib.validate(ladder_shakespeare.get_config()))
  assert len(rungs) == 13 and sorted({r.steps for r in rungs}) == [49, 146, 439]
  assert [r.name for r in rungs if r.held_out] == ["4x128_D900k"]


def test_isoflop_grid_trains_each_shape_for_the_budget():
  config = tiny_config("--config.ladder.flops=(2e9,6e9)", "--config.ladder.min_steps=1")
  rungs = [r for r in ladder.validate(config) if not r.held_out]
  for r in rungs:
    fpt = ladder.flops_per_token(config, r.num_layers, r.d_model, r.num_heads)
    budget = float(r.budget[1:])
    assert abs(r.tokens * fpt - budget) <= 0.5 * 256 * fpt  # Within half a step of the budget.


@pytest.mark.parametrize(
  "override, field",
  [
    ("--config.ladder.shapes=2x", "shapes"),
    ("--config.ladder.shapes=1x40", "shapes"),  # 40 is no multiple of head_dim 16.
    ("--config.ladder.shapes=1x32,1x32,2x32,1x64", "shapes"),
    ("--config.ladder.shapes=1x32,2x32", "shapes"),  # 4 rungs to fit: too few.
    ("--config.ladder.tokens=(512,-3)", "tokens"),
    ("--config.ladder.tokens=(100,512)", "tokens"),  # Less than one 256-token step.
    ("--config.ladder.n=total", "n"),
    ("--config.ladder.ci_level=1.5", "ci_level"),
    ("--config.ladder.bootstrap=0", "bootstrap"),
    ("--config.ladder.holdout_shape=2y64", "holdout_shape"),
  ],
)
def test_bad_ladder_values_name_the_field(override, field):
  with pytest.raises(ConfigError, match=rf"^config\.ladder\.{field}="):
    ladder.validate(tiny_config(override))


def test_rung_config_is_the_resume_command():
  """The stored command (main's flags) rebuilds exactly the config the ladder trained."""
  config = tiny_config()
  rung = ladder.validate(config)[3]
  overrides = ladder.rung_overrides(config, rung, "/w")
  rc = ladder.rung_config(config, overrides)
  command = ladder.resume_command("configs/ladder_shakespeare.py", TINY[:3], overrides, "/w/runs/x")
  assert command.startswith("python -m gpt_jax.main --config=configs/ladder_shakespeare.py")
  flags = [a for a in command.split() if a.startswith("--config.")]
  rebuilt = cli.load_config(LADDER_CONFIG, [*TINY, *flags], lock=False)
  del rebuilt["ladder"]
  assert rebuilt.to_dict() == rc.to_dict()
  assert (rc.model.num_layers, rc.model.d_model, rc.train.num_steps, rc.optim.warmup_steps) == (2, 32, 6, 1)
  assert rc.data.data_dir == "/w/shared/data" and "ladder" not in rc
  assert ladder.user_overrides(["--config.a=1", "--config.ladder.n=x", "--config.b", "2", "--x"]) == [
    "--config.a=1",
    "--config.b=2",
  ]


# -------------------------------------------------- running and resuming


@pytest.fixture(scope="module")
def fake_ladder(tmp_path_factory):
  """A ladder interrupted in its third rung, then run again to the end (fake training)."""
  workdir = str(tmp_path_factory.mktemp("ladder"))
  config = tiny_config()
  first, first_calls = fake_train(fail_at=3)
  with pytest.raises(Interrupted):
    ladder.run(config, workdir, train_fn=first, log=lambda s: None)
  finished = {n: (Path(workdir) / "runs" / n / metrics.METRICS_FILE).read_bytes() for n in first_calls[:2]}
  second, second_calls = fake_train()
  report, boots = ladder.run(config, workdir, train_fn=second, log=lambda s: None)
  return {
    "workdir": workdir,
    "report": report,
    "boots": boots,
    "calls": (first_calls, second_calls),
    "finished": finished,
  }


def test_interrupted_ladder_resumes_without_retraining_finished_runs(fake_ladder):
  first, second = fake_ladder["calls"]
  assert first == NAMES[:3]
  assert second == NAMES[2:]  # The interrupted rung again, then the rest; never the finished two.
  for name, before in fake_ladder["finished"].items():
    assert (Path(fake_ladder["workdir"]) / "runs" / name / metrics.METRICS_FILE).read_bytes() == before
  again, calls = fake_train()
  ladder.run(tiny_config(), fake_ladder["workdir"], train_fn=again, log=lambda s: None)
  assert calls == []


def test_shared_tokenizer_is_pinned_once_and_copied(fake_ladder):
  root = Path(fake_ladder["workdir"])
  shared = (root / "shared" / "tokenizer" / "vocab.json").read_bytes()
  for name in NAMES:
    assert (root / "runs" / name / "tokenizer" / "vocab.json").read_bytes() == shared


def test_report_numbers_are_the_runs_metrics(fake_ladder):
  report = fake_ladder["report"]
  on_disk = json.loads((Path(fake_ladder["workdir"]) / ladder.REPORT_FILE).read_text())
  assert on_disk["runs"] == report["runs"]
  assert (Path(fake_ladder["workdir"]) / ladder.PLOT_FILE).read_bytes()[:4] == b"\x89PNG"
  config = tiny_config()
  for row in report["runs"]:
    lines = (Path(row["workdir"]) / metrics.METRICS_FILE).read_text().splitlines()
    final = [json.loads(x) for x in lines if "eval_loss" in x][-1]
    assert row["eval_loss"] == final["eval_loss"] and final["step"] == row["steps"]
    m = ladder.model_config(config, row["num_layers"], row["d_model"], row["num_heads"])
    assert row["params"] == plan.param_counts(m)["params"]
    assert row["n"] == row["params"] - m.block_size * m.d_model  # Matmul params: no position table.
    assert row["flops_per_token"] == metrics.flops_per_token(m, 32, row["params"])
    assert row["compute"] == row["flops_per_token"] * row["tokens"]


def test_fit_recovers_the_law_behind_the_runs(fake_ladder):
  """The fake runs' losses are TRUTH exactly: the fit and the held-out prediction recover it,
  so N, D and the losses reach the fit unchanged."""
  report = fake_ladder["report"]
  fit = report["analysis"]["fit"]
  assert fit["points"] == 6
  # N spans 3 sizes: α and A are pinned down. D takes two values, along which E and B/D^β
  # trade off (any β fits two points), so only their sum at those D is.
  assert (fit["alpha"], fit["A"]) == (pytest.approx(TRUTH.alpha, rel=1e-6), pytest.approx(TRUTH.A, rel=1e-6))
  h = report["holdout"]
  assert h["name"] == "2x64_D1.536k" and abs(h["relative_error"]) < 1e-3
  held = next(r for r in report["runs"] if r["held_out"])
  assert h["actual"] == pytest.approx(TRUTH.loss(held["n"], held["tokens"]))
  k = report["analysis"]["frontier"]["k"]
  fitted = [r for r in report["runs"] if not r["held_out"]]
  assert k == pytest.approx(np.mean([r["flops_per_token"] / r["n"] for r in fitted]))


def test_changed_settings_are_refused(fake_ladder):
  with pytest.raises(UserError, match=r"1x32_D512 was trained with optim\.lr=0\.01, this config has 0\.02"):
    ladder.run(tiny_config("--config.optim.lr=0.02"), fake_ladder["workdir"], train=False, log=lambda s: None)


def test_prediction_line_counts_the_named_config(fake_ladder):
  from configs import gpt2_small

  target = config_lib.validate(gpt2_small.get_config())
  line, notes = ladder.prediction_line(fake_ladder["report"], fake_ladder["boots"], target, 3e9, "gpt2_small")
  n = 124_439_808 - 1024 * 768  # README's count, minus the position table.
  assert line.startswith(f"prediction gpt2_small: N={n:.4g} (matmul), D=3e+09 tokens")
  f = fake_ladder["report"]["analysis"]["fit"]
  fit = scaling.Chinchilla(**{k: f[k] for k in ("E", "A", "B", "alpha", "beta")})
  assert "\n" not in line and f"loss {fit.loss(n, 3e9):.4f} nats/token" in line
  assert len(notes) == 2 and "tokenizer" in notes[0] and "extrapolation" in notes[1]


def test_notrain_without_enough_runs_says_so(tmp_path):
  with pytest.raises(UserError, match="0 finished rungs to fit"):
    ladder.run(tiny_config(), str(tmp_path), train=False, log=lambda s: None)


# --------------------------------------------------------------- the CLI


def _cli(*args, timeout=600):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  return subprocess.run(
    [sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
  )


def test_cli_bad_value_is_one_line(tmp_path):
  r = _cli(
    "gpt_jax.ladder",
    "--config=configs/ladder_shakespeare.py",
    f"--workdir={tmp_path}",
    "--config.ladder.n=total",
  )
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [
    "error: config.ladder.n='total' is invalid: allowed values are 'matmul', 'non_embedding'"
  ]
  assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_cli_predicts_and_main_refits(fake_ladder):
  """--notrain --predict on a finished ladder prints one line; gpt_jax.main --ladder (the launch/*
  path) refits the same finished runs without training."""
  workdir = fake_ladder["workdir"]
  args = ["--config=configs/ladder_shakespeare.py", f"--workdir={workdir}", *TINY]
  r = _cli("gpt_jax.ladder", *args, "--notrain", "--predict=configs/gpt2_small.py", "--tokens=3e9")
  assert r.returncode == 0, r.stderr[-2000:]
  lines = [x for x in r.stdout.splitlines() if x.startswith("prediction ")]
  assert len(lines) == 1 and "N=1.237e+08 (matmul), D=3e+09 tokens" in lines[0]
  report = Path(workdir, ladder.REPORT_FILE)
  report.unlink()
  r = _cli("gpt_jax.main", *args, "--ladder")
  assert r.returncode == 0, r.stderr[-2000:]
  assert json.loads(report.read_text())["runs"] == fake_ladder["report"]["runs"]


# ------------------------------------------------------- a real tiny ladder


@pytest.mark.slow
def test_tiny_ladder_trains_on_a_mesh_and_predicts_its_held_out_rung(tmp_path):
  """Seven real runs of 2-6 steps on a data x fsdp x tensor = 2x2x2 mesh.

  Tolerance: after 2-6 steps every loss is still near ln(300) = 5.7, so the
  fit has little to work with and this checks the plumbing end to end more
  than the law: the held-out rung's prediction must land within 5% (the
  measured error on the default Shakespeare ladder is in the README).
  """
  config = tiny_config(
    *("--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"),
    # A constant learning rate makes a shape's train step the same program at both budgets, so
    # the second compiles from the ladder's shared cache; a configured peak skips the matmul
    # that measures one.
    *(
      "--config.optim.schedule=constant",
      "--config.ladder.warmup_fraction=0",
      "--config.log.peak_flops=1e11",
    ),
  )
  calls = []

  def counted(c, w):
    calls.append(os.path.basename(w))
    return pretrain.run(c, w)

  report, _ = ladder.run(config, str(tmp_path), train_fn=counted, log=lambda s: None)
  assert calls == NAMES
  assert len(list((tmp_path / "shared" / "data" / "tokens").iterdir())) == 1  # Tokenised once.
  for row in report["runs"]:
    records = [json.loads(x) for x in (Path(row["workdir"]) / metrics.METRICS_FILE).read_text().splitlines()]
    assert row["eval_loss"] == [r["eval_loss"] for r in records if "eval_loss" in r][-1]
    assert 4.0 < row["eval_loss"] < 6.5
  assert abs(report["holdout"]["relative_error"]) < 0.05, report["holdout"]
  calls.clear()
  again, _ = ladder.run(config, str(tmp_path), train_fn=counted, log=lambda s: None)
  assert calls == [] and again["runs"] == report["runs"]

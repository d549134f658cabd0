"""The training entry point: flags to a validated config, handed to pretraining or fine-tuning.

Each case runs `gpt_jax.main` in a subprocess whose pretrain.run, finetune.run
and distributed.initialize only print what they were given.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROGRAM = """
from gpt_jax import cli, main

main.distributed.initialize = lambda *args: print("initialize", *args)
main.pretrain.run = lambda config, workdir: print("pretrain", config.log.profile_steps, workdir)
main.finetune.run = lambda config, workdir: print("finetune", config.finetune.task, workdir)
cli.run(main.main)
"""


def _main(*args):
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  return subprocess.run(
    [sys.executable, "-c", PROGRAM, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
  )


@pytest.mark.parametrize(
  "args, stdout",
  [
    (["--config=configs/debug.py", "--workdir=/tmp/w"], ["initialize None None None", "pretrain 0 /tmp/w"]),
    # --profile traces PROFILE_STEPS steps unless config.log.profile_steps says how many.
    (["--config=configs/debug.py", "--workdir=/tmp/w", "--profile"],
     ["initialize None None None", "pretrain 5 /tmp/w"]),
    (["--config=configs/debug.py", "--workdir=/tmp/w", "--profile", "--config.log.profile_steps=3"],
     ["initialize None None None", "pretrain 3 /tmp/w"]),
    (["--config=configs/finetune_classify.py", "--workdir=/tmp/f", "--config.finetune.train_path=t.jsonl",
      "--coordinator_address=10.0.0.1:1234", "--num_processes=2", "--process_id=1"],
     ["initialize 10.0.0.1:1234 2 1", "finetune classification /tmp/f"]),
  ],
)  # fmt: skip
def test_the_config_goes_to_its_job(args, stdout):
  r = _main(*args)
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.splitlines() == stdout


@pytest.mark.parametrize(
  "args, error",
  [
    (["--config=configs/debug.py", "--workdir=/tmp/w", "extra"], "error: unexpected arguments: extra"),
    (["--config=configs/debug.py"], "error: flag --workdir=None: Flag --workdir must have a value"),
    (["--config=configs/debug.py", "--workdir=/tmp/w", "--config.model.num_heads=5"],
     "error: config.model.num_heads=5 is invalid: must divide model.d_model=32"),
  ],
)  # fmt: skip
def test_bad_invocations_are_one_line_before_anything_runs(args, error):
  r = _main(*args)
  assert r.returncode == 2 and r.stdout == "", r.stderr[-2000:]
  lines = r.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith(error), r.stderr

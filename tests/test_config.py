"""Config files load and validate; parameter counts of the GPT-2 ladder; one-line config errors."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import pytest

from configs import debug
from gpt_jax import config as config_lib
from gpt_jax import errors, model, plan

ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(p for p in (ROOT / "configs").glob("*.py") if p.name != "__init__.py")


def _load_by_path(path: Path):
  """Imports a config file from its path, as ml_collections.config_flags does for --config=FILE."""
  spec = importlib.util.spec_from_file_location(f"_config_under_test_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.stem for p in CONFIG_FILES])
def test_every_config_file_loads_and_validates(path):
  config = _load_by_path(path)
  if config.job == "finetune" and not config.finetune.train_path and not config.finetune.tfds_name:
    # Fine-tuning templates take their data on the command line (--config.finetune.train_path=...).
    with pytest.raises(errors.ConfigError, match=r"^config\.finetune\.train_path=''"):
      config_lib.validate(config)
    config.finetune.train_path = "train.jsonl"
  config = config_lib.validate(config)
  assert isinstance(config.model.attention_pattern, tuple)
  # Every rung builds a model: shapes trace without errors.
  assert model.param_count(model.abstract_params(config.model)) > 0


# Radford et al. 2019, Table 2 (vocab 50257, context 1024, tied embeddings).
GPT2_PARAMS = {
  "gpt2_small": 124_439_808,
  "gpt2_medium": 354_823_168,
  "gpt2_large": 774_030_080,
  "gpt2_xl": 1_557_611_200,
}


@pytest.mark.parametrize("name", sorted(GPT2_PARAMS))
def test_gpt2_parameter_counts(name):
  m = _load_by_path(ROOT / "configs" / f"{name}.py").model
  shapes = nn.unbox(model.abstract_params(m))  # jax.eval_shape: no memory.
  assert model.param_count(shapes) == GPT2_PARAMS[name]
  # Derived by hand: a pre-LN block has 12 D^2 (qkv 3, proj 1, MLP 8) + 13 D (biases and gains);
  # plus the final LayerNorm (2 D). Embeddings: V x D + block_size x D.
  L, D = m.num_layers, m.d_model
  non_embedding = L * (12 * D * D + 13 * D) + 2 * D
  counts = plan.param_counts(m)
  assert counts == {"params": GPT2_PARAMS[name], "non_embedding_params": non_embedding}
  assert GPT2_PARAMS[name] - non_embedding == (50257 + 1024) * D


def _debug(**changes):
  c = debug.get_config()
  for dotted, value in changes.items():
    section, field = dotted.split("__")
    with c[section].ignore_type():  # Wrong types too: a hand-written config file can hold anything.
      c[section][field] = value
  return c


# One bad value per section: validate asks each section's owner, whose tests name every field.
@pytest.mark.parametrize(
  "changes, field",
  [
    ({"model__num_heads": 5}, "model.num_heads"),  # 5 does not divide d_model=32
    ({"mesh__data": -1, "mesh__fsdp": -1}, "mesh"),
    ({"train__seq_len": 64}, "train.seq_len"),  # > block_size=32
    ({"optim__lr": 0.0}, "optim.lr"),
    ({"data__source": "web"}, "data.source"),
    ({"sample__top_p": 0.0}, "sample.top_p"),
    ({"eval__tasks": ("ranking:/x.jsonl",)}, "eval.tasks"),
    ({"log__every_steps": 0}, "log.every_steps"),
  ],
)
def test_bad_values_give_one_line_error_naming_the_field(changes, field):
  with pytest.raises(errors.ConfigError) as e:
    config_lib.validate(_debug(**changes))
  msg = str(e.value)
  assert msg.startswith(f"config.{field}=") and "\n" not in msg, msg


def _run_plan(*args, config="configs/debug.py"):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  return subprocess.run(
    [sys.executable, "-m", "gpt_jax.plan", f"--config={config}", *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
  )


@pytest.mark.slow
@pytest.mark.parametrize(
  "args, config, names",
  [
    (["--config.model.num_heads=5"], "configs/debug.py", "model.num_heads"),
    (["--config.model.bogus=1"], "configs/debug.py", "--config.model.bogus: no such config field"),
    (["--config.model.num_heads=abc"], "configs/debug.py", "--config.model.num_heads=abc"),
    (["--no_such_flag=1"], "configs/debug.py", "no_such_flag"),
    ([], "configs/no_such_rung.py", "--config=configs/no_such_rung.py: cannot load it"),
  ],
)
def test_entry_point_exits_2_with_one_line_naming_the_field(args, config, names):
  r = _run_plan(*args, config=config)
  assert r.returncode == 2, r.stderr
  lines = r.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], r.stderr
  assert r.stdout == ""


@pytest.mark.slow
def test_plan_json_prints_one_object():
  r = _run_plan("--json")
  assert r.returncode == 0, r.stderr
  out = json.loads(r.stdout)  # Exactly one JSON document on stdout.
  # configs/debug.py: L=2, D=32, V=320, block 32: 2 (12 D^2 + 13 D) + 2 D and (320 + 32) D.
  assert out["non_embedding_params"] == 2 * (12 * 32 * 32 + 13 * 32) + 2 * 32 == 25_472
  assert out["params"] == 25_472 + (320 + 32) * 32 == 36_736

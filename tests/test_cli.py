"""Command-line plumbing: config files and overrides parsed as every entry point parses them, and
every bad flag, config file, override or UserError ending as one `error:` line with exit status 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from gpt_jax import cli
from gpt_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "configs" / "debug.py")


def _entry_point_config(monkeypatch, argv):
  """The config an entry point gets: its flag defined at import (overrides found in sys.argv),
  argv parsed by cli.parse (cli.run's flags parser)."""
  monkeypatch.setattr(sys, "argv", argv)
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "A config file.", flag_values=fv, lock_config=True)
  assert cli.parse(fv, argv) == argv[:1]
  return fv.config


def test_load_config_applies_overrides_as_an_entry_point_does(monkeypatch):
  overrides = [
    "--config.optim.lr=0.5",
    "--config.train.batch_size=16",
    "--config.model.scan_layers=true",
    "--config.model.attention_pattern=('dense', 'local')",
    "--config.eval.tasks=('perplexity:/x.jsonl',)",
    "--config.mesh.data=-1",
    "--config.data.source=files",
  ]
  got = cli.load_config(DEBUG, overrides)
  want = _entry_point_config(monkeypatch, ["prog", f"--config={DEBUG}", *overrides])
  assert got.to_dict() == want.to_dict()
  assert type(got.optim.lr) is float and got.optim.lr == 0.5
  assert type(got.train.batch_size) is int and got.train.batch_size == 16
  assert got.model.scan_layers is True and got.data.source == "files" and got.mesh.data == -1
  assert got.model.attention_pattern == ("dense", "local") and got.eval.tasks == ("perplexity:/x.jsonl",)
  assert got.model.num_layers == 2  # configs/debug.py's own value where nothing overrides it.
  with pytest.raises(AttributeError):  # Locked, as entry points lock theirs: no new fields.
    got.train.no_such_field = 1
  unlocked = cli.load_config(DEBUG, lock=False)
  unlocked.train.new_field = 1


def test_load_config_reads_values_with_the_entry_points_parser():
  # The planner's --ladder rungs are read by config_flags, the parser of every entry point.
  debug = DEBUG
  with pytest.raises(UserError, match=r"^flag --config.train.batch_size=abc: invalid literal for int"):
    cli.load_config(debug, ["--config.train.batch_size=abc"])
  with pytest.raises(UserError, match=r"^flag --config.model.scan_layers=maybe: .*Non-boolean"):
    cli.load_config(debug, ["--config.model.scan_layers=maybe"])
  assert cli.load_config(debug, ["--config.model.scan_layers=false"]).model.scan_layers is False


@pytest.mark.parametrize("override", ["--config.model.bogus=1", "--config.nosection.x=1"])
def test_an_override_of_no_field_names_it(override):
  with pytest.raises(UserError) as e:
    cli.load_config(DEBUG, [override])
  assert str(e.value) == f"{override.split('=')[0]}: no such config field (see configs/base.py)"


def test_an_unknown_flag_or_bad_flag_value_is_one_line():
  fv = flags.FlagValues()
  flags.DEFINE_integer("n", 1, "A number.", flag_values=fv)
  with pytest.raises(UserError, match=r"^Unknown command line flag 'no_such'$"):
    cli.parse(fv, ["prog", "--no_such=1"])
  with pytest.raises(UserError, match=r"^flag --n=x: invalid literal for int\(\) with base 10: 'x'$"):
    cli.parse(fv, ["prog", "--n=x"])
  assert cli.parse(fv, ["prog", "extra", "--n=3"]) == ["prog", "extra"] and fv.n == 3


@pytest.mark.parametrize(
  "source, cause",
  [
    (None, "OSError: [Errno 2] No such file or directory"),
    ("def get_config(:\n", "SyntaxError: invalid syntax"),
    ("import no_such_module_xyz\n", "ModuleNotFoundError: No module named 'no_such_module_xyz'"),
    ("def get_config():\n  return undefined_name\n", "NameError: name 'undefined_name' is not defined"),
    ("def get_config():\n  raise ValueError('no way')\n", "ValueError: no way"),
    # Not an unknown override: the file's own KeyError.
    ("def get_config():\n  return {}['k']\n", "KeyError: 'k'"),
  ],
  ids=["missing", "syntax", "import", "name", "value", "key"],
)
def test_an_unloadable_config_file_is_one_line_naming_it(tmp_path, source, cause):
  path = tmp_path / "rung.py"
  if source is not None:
    path.write_text(source)
  with pytest.raises(UserError) as e:
    cli.load_config(str(path))
  msg = str(e.value)
  assert msg.startswith(f"--config={path}: cannot load it ({cause}") and "\n" not in msg, msg


# ------------------------------------------------------------ cli.run (subprocess)

PROGRAM = """
from absl import flags
from ml_collections import config_flags
from gpt_jax import cli
from gpt_jax.errors import UserError

N = flags.DEFINE_integer("n", 1, "A number.")
CONFIG = config_flags.DEFINE_config_file("config", None, "A config file.")

def main(argv):
  if N.value < 0:
    raise UserError("--n must be >= 0")
  print("ok", CONFIG.value.train.batch_size if CONFIG.value else None)

cli.run(main)
"""


@pytest.mark.parametrize(
  "args, error",
  [
    ([], None),
    ([f"--config={DEBUG}", "--config.train.batch_size=4"], None),
    (["--n=-1"], "error: --n must be >= 0"),
    (["--n=x"], "error: flag --n=x: invalid literal for int() with base 10: 'x'"),
    (["--nope=1"], "error: Unknown command line flag 'nope'"),
    ([f"--config={DEBUG}", "--config.train.bogus=4"], "error: --config.train.bogus: no such config field"),
    (
      ["--config=configs/no_such_rung.py"],
      "error: --config=configs/no_such_rung.py: cannot load it (OSError",
    ),
  ],
)
def test_run_exits_2_with_one_error_line(args, error):
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  r = subprocess.run(
    [sys.executable, "-c", PROGRAM, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
  )
  if error is None:
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout == ("ok 4\n" if args else "ok None\n")
    return
  assert r.returncode == 2 and r.stdout == "", r.stderr
  lines = r.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith(error), r.stderr


def test_packaged_config_paths_work_from_any_directory(tmp_path, monkeypatch):
  # With the package installed, `--config=configs/NAME.py` names the packaged file when the
  # current directory has no such file; a path that exists here, or names no packaged file, stays.
  monkeypatch.chdir(tmp_path)
  assert Path(cli.config_path("configs/debug.py")) == ROOT / "configs" / "debug.py"
  assert cli.config_path("configs/debug.py:x") == f"{ROOT / 'configs' / 'debug.py'}:x"
  assert cli.config_path("configs/no_such.py") == "configs/no_such.py"
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "debug.py").write_text("def get_config():\n  return None\n")
  assert cli.config_path("configs/debug.py") == "configs/debug.py"
  (tmp_path / "configs" / "debug.py").unlink()
  assert cli.load_config("configs/debug.py", ["--config.train.batch_size=3"]).train.batch_size == 3
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  out = subprocess.run(
    [sys.executable, "-m", "gpt_jax.plan", "--config=configs/debug.py", "--json"],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr
  assert json.loads(out.stdout)["params"] == 36736  # configs/debug.py's model (tests/test_model.py).

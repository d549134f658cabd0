"""Command-line plumbing shared by every entry point.

`run(main)` is `absl.app.run(main)` where a bad flag, config file or
`--config.a.b=value` override, and any `UserError` raised by `main`, end as
one `error: ...` line on stderr and exit status 2. `load_config(path,
overrides)` reads a config file with the same parser (ml_collections'
config_flags) for tools that load several configs in one run.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags
from ml_collections.config_flags.config_flags import is_config_flag

from gpt_jax.errors import UserError


def cli_main(fn):
  """Wraps an absl `main(argv)`: a UserError becomes `error: ...` and exit 2."""

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except UserError as e:
      die(str(e))

  return wrapper


def die(message: str):
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def _root_cause(e: BaseException) -> BaseException:
  while e.__cause__ is not None or e.__context__ is not None:
    e = e.__cause__ or e.__context__
  return e


def _cannot_load(name: str, filename: str, e: BaseException) -> str:
  cause = _root_cause(e)
  detail = str(cause).strip().splitlines()[-1].strip() if str(cause).strip() else ""
  return f"--{name}={filename}: cannot load it ({type(cause).__name__}: {detail})"


def config_path(path: str) -> str:
  """`path` as given, or, where it does not exist from the current directory and reads
  `configs/NAME.py[:ARG]`, that file of the installed `configs` package: with the package
  installed (`pip install -e .`), `--config=configs/gpt2_small.py` works from any directory."""
  file, sep, arg = path.partition(":")
  parts = Path(file).parts
  if Path(file).exists() or len(parts) < 2 or parts[0] != "configs":
    return path
  spec = importlib.util.find_spec("configs")
  for root in (spec.submodule_search_locations or []) if spec is not None else []:
    candidate = Path(root).joinpath(*parts[1:])
    if candidate.is_file():
      return f"{candidate}{sep}{arg}"
  return path


class _ConfigFileError(Exception):
  """A config file that failed to load, carried out of absl's flag parsing unchanged."""


class _ConfigFileParser(flags.ArgumentParser):
  """config_flags' file parser, except that any failure to load the file leaves absl as
  _ConfigFileError: absl turns a TypeError / ValueError (from get_config, or a file without
  one) into "Error whilst parsing config file:" and lets the rest (a syntax error, a failed
  import, a NameError) through as a traceback; a KeyError would read as an unknown override."""

  def __init__(self, name: str, inner: flags.ArgumentParser):
    self.name, self.inner = name, inner

  def parse(self, argument):
    try:
      return self.inner.parse(config_path(argument))
    except Exception as e:  # noqa: BLE001 - any failure to load the file is the user's to fix
      raise _ConfigFileError(_cannot_load(self.name, argument, e)) from e

  def flag_type(self):
    return self.inner.flag_type()


def parse(flag_values: flags.FlagValues, argv: list[str]) -> list[str]:
  """Parses argv into flag_values; a bad flag, config file or override raises UserError (one line)."""
  config_names = [name for name in list(flag_values) if is_config_flag(flag_values[name])]
  for name in config_names:
    flag = flag_values[name]
    if not isinstance(flag.parser, _ConfigFileParser):
      flag.parser = _ConfigFileParser(name, flag.parser)
  try:
    rest = flag_values(argv)
  except _ConfigFileError as e:
    raise UserError(str(e)) from None
  except flags.Error as e:
    raise UserError(str(e).splitlines()[0]) from None
  except (AttributeError, KeyError) as e:  # An override naming a field the config file lacks.
    key = str(e).strip("'\"")
    bad = [a.split("=")[0] for a in argv[1:] if a.startswith("--") and key in a.split("=")[0].split(".")]
    raise UserError(f"{bad[0] if bad else key}: no such config field (see configs/base.py)") from None
  except (TypeError, ValueError) as e:
    raise UserError(f"bad command-line value: {e}") from None
  for name in config_names:
    flag = flag_values[name]
    if flag.present:
      try:
        flag.value.keys()  # A missing file surfaces on first access (config_flags defers it).
      except Exception as e:  # noqa: BLE001 - any failure to load the file is the user's to fix
        raise UserError(_cannot_load(name, config_flags.get_config_filename(flag), e)) from None
  return rest


def _parse_flags(argv):
  try:
    return parse(flags.FLAGS, argv)
  except UserError as e:
    die(str(e))


def run(main):
  """`app.run(main)` for every entry point: bad flags, config files, overrides and
  UserErrors all end as one `error: ...` line and exit code 2."""
  app.run(cli_main(main), flags_parser=_parse_flags)


def load_config(path: str, overrides=(), *, lock: bool = True):
  """The ConfigDict of a config file with `--config.FIELD=VALUE` overrides, parsed by
  config_flags exactly as an entry point's `--config=path --config.FIELD=VALUE` would be."""
  argv = ["gpt_jax", f"--config={path}", *overrides]
  fv = flags.FlagValues()
  # config_flags defines a flag per `--config.FIELD` it finds in sys_argv.
  config_flags.DEFINE_config_file("config", path, flag_values=fv, lock_config=lock, sys_argv=argv)
  parse(fv, argv)
  return fv.config

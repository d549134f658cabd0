"""The errors every module raises for bad input, and the field checks that raise them.

A `UserError` is bad input from the user (config, data, files, flags): the
entry points print it as one `error: ...` line and exit with status 2
(cli.py). A `ConfigError` names the dotted config field, its value and what
is allowed. The checks below are shared by each config section's own
validator (model_config, data_sources, optim, train, ...), so every field
range is worded the same way.
"""

from __future__ import annotations


class UserError(Exception):
  """Bad input from the user (config, data, files): reported in one line, exit 2."""


class ConfigError(UserError):
  pass


def fail(field: str, value, allowed: str):
  raise ConfigError(f"config.{field}={value!r} is invalid: {allowed}")


def get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def _number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def positive_int(config, *fields) -> None:
  for f in fields:
    v = get(config, f)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
      fail(f, v, "must be a positive integer")


def non_negative(config, *fields) -> None:
  for f in fields:
    v = get(config, f)
    if not _number(v) or not v >= 0:  # NaN too: it compares false both ways.
      fail(f, v, "must be a number >= 0")


def positive(config, *fields) -> None:
  for f in fields:
    v = get(config, f)
    if not _number(v) or not v > 0:
      fail(f, v, "must be a number > 0")


def boolean(config, *fields) -> None:
  for f in fields:
    v = get(config, f)
    if not isinstance(v, bool):
      fail(f, v, "must be True or False")


def one_of(config, field: str, allowed) -> None:
  v = get(config, field)
  if v not in allowed:
    fail(field, v, "allowed values are " + ", ".join(repr(a) for a in allowed))


def in_range(config, field: str, lo, hi, *, lo_inclusive: bool = True, hi_inclusive: bool = False) -> None:
  """lo <= v < hi by default; the brackets of the message say which ends are included."""
  v = get(config, field)
  ok = _number(v) and (lo <= v if lo_inclusive else lo < v) and (v <= hi if hi_inclusive else v < hi)
  if not ok:
    left, right = "[" if lo_inclusive else "(", "]" if hi_inclusive else ")"
    fail(field, v, f"must be in {left}{lo}, {hi}{right}")

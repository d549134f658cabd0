"""Run directories: local paths or bucket URLs, their host-local stand-ins, and config.json.

A run directory (a training workdir, a params export) is a local path or a
`gs://BUCKET/PATH` URL read and written through etils.epath (gcsfs) and
Orbax (tensorstore); what must sit on a local disk (the memory-mapped token
cache, metrics before their upload) goes to `local_dir(url)` on each host.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os

import ml_collections
from etils import epath

from gpt_jax.errors import UserError

URL_SCHEMES = ("gs",)  # Buckets that etils.epath (gcsfs) and Orbax (tensorstore) both open.
CONFIG_FILE = "config.json"


def is_url(path) -> bool:
  return "://" in str(path)


def run_dir(path, flag: str = "--workdir") -> str:
  """A run directory: a URL (gs://BUCKET/PATH) as given, a local path made absolute."""
  p = str(path)
  if not p.strip():
    raise UserError(f"{flag} is empty")
  if not is_url(p):
    return os.path.abspath(os.path.expanduser(p))
  scheme, rest = p.split("://", 1)
  parts = [x for x in rest.split("/") if x]
  if scheme not in URL_SCHEMES:
    known = ", ".join(f"{s}://" for s in URL_SCHEMES)
    raise UserError(f"{flag}={p}: unsupported URL scheme {scheme}:// (use a local path or {known})")
  if not parts or any(x in (".", "..") for x in parts):
    raise UserError(f"{flag}={p}: expected {scheme}://BUCKET/PATH without '.' or '..' parts")
  _setup_bucket_io(flag)
  return f"{scheme}://{'/'.join(parts)}"


@functools.cache
def _setup_bucket_io(flag: str) -> None:
  """Once, before the first bucket access: gcsfs must be there, and must not
  cache listings (it keeps them for good, and other processes write the
  same folders: a waiting process would never see their files)."""
  import fsspec

  for protocol in ("gs", "gcs"):
    fsspec.config.conf.setdefault(protocol, {})["use_listings_cache"] = False
  try:
    fsspec.get_filesystem_class("gcs")
  except (ImportError, ValueError):
    if importlib.util.find_spec("tensorflow") is None:  # etils.epath's other way to a bucket.
      raise UserError(f"{flag}: a gs:// path needs gcsfs: pip install -r requirements-gcs.txt") from None


def local_dir(url: str, *names: str) -> str:
  """The host-local folder that stands in for a URL run directory's local files:
  $XDG_CACHE_HOME/gpt_jax/<scheme>/<bucket>/<path>/<names> (default ~/.cache)."""
  scheme, rest = run_dir(url).split("://", 1)
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "gpt_jax", scheme, *rest.split("/"), *names)


def display(path) -> str:
  """A run directory as a user would type it: relative to the current folder when inside it."""
  p = str(path)
  if is_url(p):
    return p
  rel = os.path.relpath(p)
  return p if rel.startswith("..") else rel


def absolute(path) -> epath.Path:
  """Orbax needs absolute paths (a relative one fails only at save time); a URL stays one."""
  p = str(path)
  return epath.Path(p if is_url(p) else os.path.abspath(os.path.expanduser(p)))


# ------------------------------------------------------------- config.json


def read_config(path) -> ml_collections.ConfigDict:
  """A run's config.json, with the tuple fields of configs/base.py restored (JSON has lists)."""
  path = absolute(path)
  try:
    raw = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise UserError(f"cannot read config {path}: {e}") from e
  # Before the ConfigDict is made: it keeps a field's first type, turning a tuple assigned later into a list.
  if "model" in raw:
    raw["model"]["attention_pattern"] = tuple(raw["model"]["attention_pattern"])
  if "mesh" in raw:
    raw["mesh"]["rules"] = tuple((n, tuple(a) if isinstance(a, list) else a) for n, a in raw["mesh"]["rules"])
  if "eval" in raw:
    raw["eval"]["tasks"] = tuple(raw["eval"]["tasks"])
  return ml_collections.ConfigDict(raw)


def write_config(path, config) -> None:
  """Replaces `path` with `config` as JSON, atomically on a local disk."""
  path = absolute(path)
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text(config.to_json_best_effort(indent=2, sort_keys=True))
  tmp.replace(path)

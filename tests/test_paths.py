"""Run directories (local paths or gs:// URLs), their host-local stand-ins, and config.json."""

import importlib.util
import json
import os

import fsspec
import pytest

from gpt_jax import paths
from gpt_jax.errors import UserError


def test_is_url_and_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert paths.is_url("gs://b/x") and not paths.is_url("/a/b") and not paths.is_url("rel/gs:")
  # Orbax fails on a relative path only when it saves: every run directory is made absolute.
  assert str(paths.absolute("rel/x")) == str(tmp_path / "rel" / "x")
  assert str(paths.absolute("~/x")) == str(tmp_path / "home" / "x")
  assert str(paths.absolute("gs://b/x")) == "gs://b/x"
  assert paths.run_dir("~/runs/a") == str(tmp_path / "home" / "runs" / "a")


@pytest.mark.parametrize(
  "url, message",
  [
    ("ftp://host/run", "unsupported URL scheme ftp://"),
    ("gs://", "expected gs://BUCKET/PATH"),
    ("gs://bkt/../other", "expected gs://BUCKET/PATH"),
    ("  ", "--workdir is empty"),
  ],
)
def test_bad_urls_are_refused(url, message):
  with pytest.raises(UserError, match=message):
    paths.run_dir(url)


def test_the_flag_named_in_refusals_is_the_callers():
  with pytest.raises(UserError, match=r"^--hf_dir=ftp://h/x: unsupported URL scheme ftp:// \(use a local"):
    paths.run_dir("ftp://h/x", "--hf_dir")
  with pytest.raises(UserError, match=r"^--ckpt is empty$"):
    paths.run_dir("", "--ckpt")


def test_run_dir_and_local_dir(bucket, monkeypatch, tmp_path):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert paths.run_dir("gs://b//x/y/") == "gs://b/x/y"
  assert paths.run_dir("rel") == os.path.abspath("rel")
  assert paths.local_dir("gs://b/x/", "data") == str(tmp_path / "gpt_jax" / "gs" / "b" / "x" / "data")


def test_local_dir_defaults_to_the_home_cache(bucket, monkeypatch, tmp_path):
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert paths.local_dir("gs://b/x") == str(tmp_path / "home" / ".cache" / "gpt_jax" / "gs" / "b" / "x")


def test_a_bucket_without_gcsfs_is_one_line(monkeypatch):
  def no_gcsfs(protocol):
    raise ImportError("Install gcsfs to access Google Storage")

  monkeypatch.setattr(fsspec, "get_filesystem_class", no_gcsfs)
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  paths._setup_bucket_io.cache_clear()
  with pytest.raises(UserError, match="--workdir: a gs:// path needs gcsfs: pip install -r requirements-gcs"):
    paths.run_dir("gs://bkt/run")
  paths._setup_bucket_io.cache_clear()


def test_bucket_listings_are_not_cached(bucket):
  """gcsfs would keep every listing for good and hide what other processes write."""
  for protocol in ("gs", "gcs"):
    fsspec.config.conf.pop(protocol, None)
  paths._setup_bucket_io.cache_clear()
  paths.run_dir("gs://bkt/run")
  assert fsspec.config.conf["gcs"]["use_listings_cache"] is False
  assert fsspec.config.conf["gs"]["use_listings_cache"] is False


# ------------------------------------------------------------- config.json


def test_config_json_round_trip_restores_the_tuple_fields(debug_config, tmp_path):
  debug_config.model.attention_pattern = ("dense", "local")
  debug_config.eval.tasks = ("perplexity:/x.jsonl", "last_word:tfds:lambada")
  path = tmp_path / "config.json"
  paths.write_config(path, debug_config)
  raw = json.loads(path.read_text())
  assert raw["model"]["attention_pattern"] == ["dense", "local"]  # JSON has lists only.
  assert raw["mesh"]["rules"][0] == ["batch", ["data", "fsdp"]]
  back = paths.read_config(path)
  assert back.to_dict() == debug_config.to_dict()
  assert back.model.attention_pattern == ("dense", "local")
  assert back.eval.tasks == ("perplexity:/x.jsonl", "last_word:tfds:lambada")
  rules = dict(back.mesh.rules)
  assert back.mesh.rules == debug_config.mesh.rules and isinstance(back.mesh.rules, tuple)
  assert rules["batch"] == ("data", "fsdp") and rules["embed"] == "fsdp" and rules["length"] is None


def test_a_config_without_those_sections_reads_as_written(tmp_path):
  (tmp_path / "c.json").write_text('{"job": "pretrain", "train": {"num_steps": 3}}')
  assert paths.read_config(tmp_path / "c.json").to_dict() == {"job": "pretrain", "train": {"num_steps": 3}}


def test_write_config_replaces_the_file_atomically(debug_config, tmp_path, monkeypatch):
  path = tmp_path / "config.json"
  paths.write_config(path, debug_config)
  debug_config.train.num_steps = 7
  paths.write_config(path, debug_config)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # No config.json.tmp left.
  assert json.loads(path.read_text())["train"]["num_steps"] == 7
  # Killed between writing and renaming: the file still holds the previous config, whole.
  before = path.read_text()

  def killed(self, target):
    raise KeyboardInterrupt

  monkeypatch.setattr(type(paths.absolute(path)), "replace", killed)
  debug_config.train.num_steps = 9
  with pytest.raises(KeyboardInterrupt):
    paths.write_config(path, debug_config)
  assert path.read_text() == before
  assert json.loads((tmp_path / "config.json.tmp").read_text())["train"]["num_steps"] == 9


@pytest.mark.parametrize("content", [None, "{not json", ""])
def test_an_unreadable_config_is_one_line(tmp_path, content):
  path = tmp_path / "config.json"
  if content is not None:
    path.write_text(content)
  with pytest.raises(UserError) as e:
    paths.read_config(path)
  assert str(e.value).startswith(f"cannot read config {path}: ") and "\n" not in str(e.value)

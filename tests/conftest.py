"""Test session set-up: 8 fake CPU devices and strict rank promotion.

XLA_FLAGS must be set before jax is imported anywhere in the session.
"""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

import fake_gcs  # noqa: E402

from configs import debug  # noqa: E402
from gpt_jax import config as config_lib  # noqa: E402


@pytest.fixture
def debug_config():
  """A fresh, validated copy of configs/debug.py."""
  return config_lib.validate(debug.get_config())


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """A fake gs:// under tmp_path/gcs (tests/fake_gcs.py); the host-local caches under tmp_path/cache."""
  root = tmp_path / "gcs"
  root.mkdir()
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  monkeypatch.chdir(tmp_path)
  uninstall = fake_gcs.install(str(root))
  yield root
  uninstall()

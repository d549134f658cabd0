"""A fake gs:// for tests: bucket URLs mapped onto a local folder.

etils.epath (without TensorFlow) opens gs:// through fsspec's "gcs"
filesystem, which `install` replaces with a LocalFileSystem that rewrites the
URL; Orbax reaches a real bucket through tensorstore, so paths.absolute maps
its gs:// paths onto the same folder. Everything else takes the code path a
real bucket takes. Subprocesses get it from a sitecustomize.py that calls
`install($FAKE_GCS_ROOT)` (see `subprocess_env`).
"""

import os

import fsspec
from etils.epath import backend as epath_backend
from fsspec.implementations.local import LocalFileSystem


class FakeGCS(LocalFileSystem):
  protocol = ("gs", "gcs")
  root = ""

  def __init__(self, *args, **kwargs):  # gcsfs options (finalize_on_close=...) mean nothing here.
    super().__init__()

  @classmethod
  def _strip_protocol(cls, path):
    path = os.fspath(path)
    if path.startswith(("gs://", "gcs://")):
      path = os.path.join(cls.root, path.split("://", 1)[1])
    return super()._strip_protocol(path)


def install(root: str):
  """Maps gs://BUCKET/PATH onto root/BUCKET/PATH; returns a function that undoes it."""
  from gpt_jax import paths

  FakeGCS.root = str(root)
  for name in ("gs", "gcs"):
    fsspec.register_implementation(name, FakeGCS, clobber=True)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()
  real_abs = paths.absolute

  def orbax_abs(path):
    p = str(path)
    return real_abs(os.path.join(FakeGCS.root, p[len("gs://") :]) if p.startswith("gs://") else p)

  paths.absolute = orbax_abs

  def uninstall():
    paths.absolute = real_abs
    epath_backend.fsspec_backend._get_filesystem.cache_clear()

  return uninstall


def subprocess_env(env: dict, root, site_dir) -> dict:
  """env for a Python subprocess that sees the fake gs:// (root) from its start."""
  os.makedirs(site_dir, exist_ok=True)
  with open(os.path.join(site_dir, "sitecustomize.py"), "w") as f:
    f.write("import os, sys\n")
    f.write(f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n")
    f.write("import fake_gcs\nfake_gcs.install(os.environ['FAKE_GCS_ROOT'])\n")
  path = os.pathsep.join(p for p in (str(site_dir), env.get("PYTHONPATH", "")) if p)
  return {**env, "PYTHONPATH": path, "FAKE_GCS_ROOT": str(root)}

"""Metrics: metrics.jsonl, TensorBoard (tensorboardX, no TensorFlow), MFU arithmetic."""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from gpt_jax import errors, hardware, paths
from gpt_jax import model as model_lib

METRICS_FILE = "metrics.jsonl"
SUPERSEDED_FILE = "metrics.superseded.jsonl"
CURVES_FILE = "curves.png"


def validate(config) -> None:
  """config.log (see configs/base.py)."""
  errors.positive_int(config, "log.every_steps")
  errors.non_negative(config, "log.peak_flops", "log.profile_steps")
  errors.boolean(config, "log.tensorboard")


def flops_per_token(model_cfg, seq_len: int, num_params: int) -> float:
  """Training FLOPs per token, PaLM App. B: 6N + 12·L·H·Q·T.

  N counts the parameters that take part in matmuls: everything but the
  position embeddings (model.position_tables; the tied token table does the
  LM-head matmul). The second term is attention's QK^T and AV, forward and
  backward.
  """
  n = num_params - sum(int(np.prod(s)) for s in model_lib.position_tables(model_cfg).values())
  head_dim = model_cfg.d_model // model_cfg.num_heads
  return 6.0 * n + 12.0 * model_cfg.num_layers * model_cfg.num_heads * head_dim * seq_len


def _best_seconds(f, x, reps: int) -> float:
  f(x).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return best


def measure_matmul_peak(size: int = 1024, reps: int = 5) -> float:
  """FLOP/s of a float32 square matmul on the default device: the CPU's practical peak."""
  x = jnp.ones((size, size), jnp.float32)
  return 2.0 * size**3 / _best_seconds(jax.jit(lambda a: a @ a), x, reps)


def measure_read_bandwidth(mib: int = 512, reps: int = 5) -> float:
  """Bytes/s of a float32 sum over `mib` MiB on the default device: the rate
  at which decoding can stream weights that no cache holds."""
  x = jnp.ones((mib * 2**18,), jnp.float32)
  return x.nbytes / _best_seconds(jax.jit(jnp.sum), x, reps)


def peak_flops(configured: float) -> tuple[float, str]:
  """Peak FLOP/s of the whole job and where the number comes from."""
  devices = jax.devices()
  if configured > 0:
    return configured * len(devices), f"configured log.peak_flops={configured:g} x {len(devices)} devices"
  kind = devices[0].device_kind.lower()
  if devices[0].platform != "cpu":
    chip = hardware.for_device_kind(kind)
    if chip is not None:
      flops = chip.peak_flops
      return flops * len(devices), f"{devices[0].device_kind} bf16 peak {flops:g} x {len(devices)} devices"
    logging.warning("unknown device kind %r: set log.peak_flops for MFU; measuring a matmul", kind)
  # Fake CPU devices share the same cores, so the machine's peak is one matmul's.
  flops = measure_matmul_peak()
  return flops, f"measured float32 matmul peak on {kind or 'cpu'} ({flops / 1e9:.1f} GFLOP/s)"


class MetricsWriter:
  """metrics.jsonl (one JSON object per record) + TensorBoard scalars, on process 0.

  In a URL workdir (gs://...) these files, and a profile, are written under
  `paths.local_dir(workdir)` and copied to the workdir on close and by the
  first write at least `upload_every_s` seconds after the previous copy (a
  bucket object cannot be appended to).
  """

  def __init__(
    self,
    workdir: str,
    *,
    tensorboard: bool = True,
    start_step: int | None = None,
    upload_every_s: float = 60.0,
  ):
    """start_step: the step the run starts (resumes) from. Records of later
    steps, written before the run stopped and now about to be redone, move
    from metrics.jsonl to metrics.superseded.jsonl, so each step appears once."""
    self.enabled = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    self.metrics_path = f"{workdir}/{METRICS_FILE}"  # As the user names it (a URL stays one).
    self.curves_path = ""  # Set once flush() has drawn the curves.
    self._workdir = workdir
    self._mirror = RunFileMirror(workdir, upload_every_s) if paths.is_url(workdir) else None
    # Where this run's local files go: the workdir, or its local stand-in.
    self.files_dir = self._mirror.local if self._mirror else workdir
    if not self.enabled:
      return
    os.makedirs(self.files_dir, exist_ok=True)
    path = os.path.join(self.files_dir, METRICS_FILE)
    if self._mirror:  # The bucket holds the run's history; this host may hold none or an older copy.
      self._mirror.pull(METRICS_FILE, SUPERSEDED_FILE)
    if start_step is not None and os.path.exists(path):
      _supersede_after(path, start_step, os.path.join(self.files_dir, SUPERSEDED_FILE))
    self._jsonl = open(path, "a", buffering=1)
    if tensorboard:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(os.path.join(self.files_dir, "tensorboard"))

  def write(self, step: int, values: dict) -> None:
    if not self.enabled:
      return
    clean = {k: (v.item() if isinstance(v, np.generic | np.ndarray) else v) for k, v in values.items()}
    self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
    if self._tb is not None:
      for k, v in clean.items():
        if isinstance(v, int | float) and np.isfinite(v):
          self._tb.add_scalar(k, v, step)
    if self._mirror and self._mirror.due():
      if self._tb is not None:
        self._tb.flush()
      self._upload()

  def flush(self) -> None:
    """Everything written so far on disk (uploaded, for a URL workdir), and the curves drawn."""
    if not self.enabled:
      return
    self._jsonl.flush()
    if self._tb is not None:
      self._tb.flush()
    try:
      plot_curves(os.path.join(self.files_dir, METRICS_FILE), os.path.join(self.files_dir, CURVES_FILE))
      self.curves_path = f"{self._workdir}/{CURVES_FILE}"
    except Exception as e:  # noqa: BLE001 - a missing plot must never fail a finished run.
      logging.warning("could not draw %s: %s: %s", CURVES_FILE, type(e).__name__, e)
    if self._mirror:
      self._upload()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
    if self._mirror and self.enabled:
      self._upload()

  def _upload(self) -> None:
    """A failed upload is logged, not raised: training goes on, and the next upload retries."""
    try:
      self._mirror.push()
    except Exception as e:  # noqa: BLE001 - any storage error
      logging.error(
        "could not copy run files to %s (%s: %s); retrying later", self._mirror.url, type(e).__name__, e
      )


def read_records(path) -> list[dict]:
  """The records of a metrics.jsonl (local or URL); lines that are not records are skipped."""
  p = epath.Path(path)
  if not p.exists():
    return []
  out = []
  for line in p.read_text().splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(record, dict) and "step" in record:
      out.append(record)
  return out


def last_records(workdir: str) -> dict:
  """Every metric's last logged value in a run's metrics.jsonl ({} without one)."""
  merged = {}
  for record in read_records(f"{workdir}/{METRICS_FILE}"):
    merged.update(record)
  return merged


def plot_curves(metrics_path: str, png_path: str) -> None:
  """Training and validation loss against the step, with the unigram baseline if logged, as a PNG."""
  import matplotlib

  matplotlib.use("Agg")  # No display: files only.
  from matplotlib import pyplot as plt

  records = read_records(metrics_path)
  fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
  for key, label, style in (("loss", "train", "-"), ("eval_loss", "validation", "o-")):
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float)]
    if points:
      ax.plot(*zip(*points), style, label=label, markersize=4)
  baseline = [r["unigram_loss"] for r in records if "unigram_loss" in r]
  if baseline:
    ax.axhline(baseline[-1], color="gray", linestyle="--", label="unigram baseline")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats / token)")
  ax.set_title(os.path.basename(os.path.dirname(os.path.abspath(metrics_path))))
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  tmp = png_path + ".tmp.png"
  fig.savefig(tmp)
  plt.close(fig)
  os.replace(tmp, png_path)


class RunFileMirror:
  """A URL run directory's appendable files, kept in a local folder and copied up.

  `local` is `paths.local_dir(url)`; push copies every file under NAMES
  there that changed since the last push (by size and mtime) to the same
  relative path under the URL.
  """

  NAMES = (METRICS_FILE, SUPERSEDED_FILE, CURVES_FILE, "tensorboard", "profile")

  def __init__(self, url: str, every_s: float = 60.0):
    self.url = paths.run_dir(url)
    self.local = paths.local_dir(self.url)
    self.every_s = every_s
    self._sent: dict[str, tuple[int, int]] = {}
    self._last = time.monotonic()

  def due(self) -> bool:
    return time.monotonic() - self._last >= self.every_s

  def pull(self, *names: str) -> None:
    """Replaces the local copies of `names` with the URL's (removed where the URL has none)."""
    for name in names:
      src, dst = epath.Path(self.url) / name, os.path.join(self.local, name)
      if src.exists():
        with open(dst, "wb") as f:
          f.write(src.read_bytes())
        st = os.stat(dst)
        self._sent[name] = (st.st_size, st.st_mtime_ns)
      elif os.path.exists(dst):
        os.remove(dst)

  def _local_files(self):
    for name in self.NAMES:
      top = os.path.join(self.local, name)
      if os.path.isfile(top):
        yield name
      for root, _, files in os.walk(top):
        yield from (os.path.relpath(os.path.join(root, f), self.local) for f in files)

  def push(self) -> int:
    """Copies the changed local files up; returns how many."""
    self._last = time.monotonic()
    copied = 0
    for rel in self._local_files():
      path = os.path.join(self.local, rel)
      st = os.stat(path)
      if self._sent.get(rel) == (st.st_size, st.st_mtime_ns):
        continue
      dst = epath.Path(self.url) / rel
      dst.parent.mkdir(parents=True, exist_ok=True)
      with open(path, "rb") as f:
        dst.write_bytes(f.read())
      self._sent[rel] = (st.st_size, st.st_mtime_ns)
      copied += 1
    return copied


def _supersede_after(path: str, step: int, superseded: str) -> None:
  """Moves the records of steps after `step` from `path` to the end of `superseded`."""
  keep, moved = [], []
  with open(path) as f:
    for line in f:
      try:
        later = int(json.loads(line)["step"]) > step
      except (ValueError, KeyError, TypeError):
        later = False  # Not a record of ours (or a line cut by a crash): left where it is.
      (moved if later else keep).append(line if line.endswith("\n") else line + "\n")
  if not moved:
    return
  with open(superseded, "a") as f:
    f.writelines(moved)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(keep)
  os.replace(tmp, path)

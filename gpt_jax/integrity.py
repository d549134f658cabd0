"""Checkpoints that cannot lie: on-device checksums, a finiteness guard, quiet restores.

Orbax 0.12.8 writes array chunks that nothing verifies on read: OCDBT
checks its manifest and B-tree nodes (CRC-32C), but a flipped byte inside a
chunk comes back as a wrong value (notes: /work/notes/ckpt_findings.md).
So every saved array gets a checksum of its bit pattern, computed on the
devices by one jitted global reduction and stored in the checkpoint's JSON
`meta` item, itself sealed by a SHA-256 of its canonical form; a restore
recomputes the checksums of what it got and compares.

The checksum of an array is the wrapping uint32 sum over its elements of
fmix32(word + GOLDEN * flat_index), fmix32 being MurmurHash3's finaliser (a
bijection). A changed element always changes the sum (the bijection), two
swapped elements change it unless the hashes collide (~2^-32), and integer
addition is associative: the value is the same for any sharding and any
reduction order, on every process, so every host reaches the same verdict.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging as py_logging
import re
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax import lax

from gpt_jax.errors import UserError

FORMAT = 1  # Bumped if the checksum function ever changes.
META_KEY = "checksums"  # {"format", "arrays": {path: hex}, ...} inside the sealed meta item.
DIGEST_KEY = "digest"  # SHA-256 of the meta item's canonical JSON without this key.

_GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: consecutive indices land far apart.


class CorruptCheckpoint(UserError):
  """A checkpoint whose bytes are not what was saved (restore fell back or was refused)."""


class NonFiniteState(UserError):
  """A state holding NaN or inf: never written (the run stops, the last good checkpoint stays)."""


# ------------------------------------------------------------- checksums


def _fmix32(h):
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _words(x):
  """The array's bit pattern as uint32 words (16- and 8-bit types widened, 64-bit split in two)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}.get(x.dtype.itemsize)
  if unsigned is None or jnp.issubdtype(x.dtype, jnp.complexfloating):
    raise TypeError(f"no checksum for dtype {x.dtype}")
  return lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)  # 64-bit: a trailing axis of 2.


def _leaf_checksum(x):
  w = _words(x)
  index = jnp.zeros(w.shape, jnp.uint32)
  stride = 1
  for d in reversed(range(w.ndim)):
    index = index + lax.broadcasted_iota(jnp.uint32, w.shape, d) * jnp.uint32(stride % 2**32)
    stride *= w.shape[d]
  return jnp.sum(_fmix32(w + index * jnp.uint32(_GOLDEN)), dtype=jnp.uint32)


def _leaf_finite(x):
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.all(jnp.isfinite(x))
  return jnp.ones((), jnp.bool_)


@jax.jit
def _sums_and_finite(leaves):
  return jnp.stack([_leaf_checksum(x) for x in leaves]), jnp.stack([_leaf_finite(x) for x in leaves])


def _host(x) -> np.ndarray:
  """A small result on every process: global reductions come back replicated."""
  if x.is_fully_addressable:
    return np.asarray(x)
  if x.is_fully_replicated:
    return np.asarray(x.addressable_shards[0].data)
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _in_device_memory(x):
  """Arrays kept in host memory (optim.offload_state's moments) copied to device memory: a program
  takes its operands from one memory space. The train step brings them in for every update, so
  between steps there is room for them."""
  sharding = getattr(x, "sharding", None)
  if getattr(sharding, "memory_kind", None) in (None, "device"):
    return x
  return jax.device_put(x, sharding.with_memory_kind("device"))


def leaf_paths(tree) -> list[str]:
  """'params/block_0/attn/c_attn/kernel': the same for a TrainState and for {"params": ...}."""
  return [
    jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in jax.tree_util.tree_leaves_with_path(tree)
  ]


def digest(tree) -> tuple[dict[str, str], list[str]]:
  """({leaf path: checksum as 8 hex digits}, paths of floating-point leaves holding NaN or inf).

  One jitted call on the leaves' devices; every process gets the same answer.
  """
  leaves = [_in_device_memory(x) for x in jax.tree.leaves(tree)]
  if not leaves:
    return {}, []
  sums, finite = (_host(a) for a in _sums_and_finite(leaves))
  paths = leaf_paths(tree)
  return dict(zip(paths, (f"{int(v):08x}" for v in sums))), [p for p, ok in zip(paths, finite) if not ok]


def checksums(tree) -> dict[str, str]:
  return digest(tree)[0]


def nonfinite_leaves(tree) -> list[str]:
  return digest(tree)[1]


@jax.jit  # One program: op-by-op, every leaf's reduction would be its own cross-device program.
def all_finite(tree) -> jax.Array:
  """On-device bool: every floating-point leaf is finite (no host sync; can go into a step's `ok`)."""
  return jnp.all(jnp.stack([_leaf_finite(x) for x in jax.tree.leaves(tree)]))


# ---------------------------------------------------- the sealed meta item


def _at(where: str, text: str) -> str:
  return f"{where}: {text}" if where else text


def json_digest(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal(meta: dict, sums: dict[str, str], **extra) -> dict:
  """The meta item to save: `meta` + the checksums (+ `extra`), sealed by a digest of the whole."""
  out = {k: v for k, v in meta.items() if k not in (META_KEY, DIGEST_KEY)}  # Sealing twice: as once.
  out[META_KEY] = {"format": FORMAT, "arrays": sums, **extra}
  out[DIGEST_KEY] = json_digest(out)
  return out


def sealed_meta(state, meta: dict, where: str, **extra) -> dict:
  """The meta item for a save of `state`, or NonFiniteState (one pass over the state for both)."""
  sums, bad = digest(state)
  if bad:
    raise NonFiniteState(
      f"state of {where} not saved: {len(bad)} arrays hold NaN or inf (first: {bad[0]}); "
      "the last good checkpoint is kept"
    )
  return seal(meta, sums, **extra)


def unseal(meta: dict, where: str = "") -> tuple[dict, dict | None]:
  """(meta without the integrity keys, the checksums record or None for a checkpoint written before them)."""
  if META_KEY not in meta and DIGEST_KEY not in meta:
    return meta, None
  body = {k: v for k, v in meta.items() if k != DIGEST_KEY}
  if meta.get(DIGEST_KEY) != json_digest(body) or not isinstance(meta.get(META_KEY), dict):
    raise CorruptCheckpoint(_at(where, "its meta item does not match its digest"))
  record = body.pop(META_KEY)
  if record.get("format") != FORMAT:
    raise CorruptCheckpoint(_at(where, f"checksum format {record.get('format')!r}; this code reads {FORMAT}"))
  return body, record


def verify(tree, record: dict | None, where: str = "") -> None:
  """Raises CorruptCheckpoint naming the first array that differs from its checksum or is not finite.

  A partial restore checks what it read ({"params": ...} of a TrainState has
  the same paths); a leaf with no stored checksum is a mismatch. `record`
  None (a checkpoint written before checksums): only finiteness is checked.
  """
  sums, nonfinite = digest(tree)
  for path, got in sums.items() if record is not None else ():
    want = record["arrays"].get(path, "none")
    if want != got:
      raise CorruptCheckpoint(
        _at(where, f"array {path} does not match its checksum (saved {want}, read {got})")
      )
  if nonfinite:
    raise CorruptCheckpoint(_at(where, f"array {nonfinite[0]} holds NaN or inf"))


# ----------------------------------------------------------- quiet restores

# The traceback flood of a failed restore comes from sys.unraisablehook:
# Orbax reads the shards of an array under asyncio.gather; the first failed
# read ends its event loop while TensorStore still completes the others,
# whose callbacks then call `loop.call_soon_threadsafe` on the closed loop
# (RuntimeError: Event loop is closed, reported with PyErr_WriteUnraisable
# from a TensorStore thread, also after the restore has returned), and
# abandoned Orbax read coroutines raise while being closed (`Exception
# ignored in: <coroutine ...>`). Only those are dropped, for the whole
# process; every other unraisable exception still reaches the previous hook.
_LIBRARY_FILE = re.compile(r"[/\\](orbax|tensorstore)[/\\]")
# Python's warning when such an abandoned read coroutine is collected unstarted.
_NEVER_AWAITED = (
  r"coroutine '(_read_array_index_and_device_put|_read_and_create_array|async_deserialize)' was never"
)
_previous_unraisablehook = None


def _is_restore_noise(unraisable) -> bool:
  exc = unraisable.exc_value
  if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
    tb = unraisable.exc_traceback
    while tb is not None and tb.tb_next is not None:
      tb = tb.tb_next
    return tb is None or "asyncio" in tb.tb_frame.f_code.co_filename
  code = getattr(unraisable.object, "cr_code", None)
  return code is not None and _LIBRARY_FILE.search(code.co_filename) is not None


def _unraisablehook(unraisable) -> None:
  if not _is_restore_noise(unraisable):
    _previous_unraisablehook(unraisable)


class _OrbaxFilter(py_logging.Filter):
  """Orbax's records: from WARNING up unless `keep_info`; none while a restore is `silent`."""

  keep_info = True
  silent = 0

  def filter(self, record) -> bool:
    if not _LIBRARY_FILE.search(record.pathname or ""):
      return True
    return not self.silent and (self.keep_info or record.levelno >= py_logging.WARNING)


def _raised_in_orbax(exc) -> bool:
  seen = 0
  while exc is not None and seen < 20:
    tb = exc.__traceback__
    while tb is not None:
      if _LIBRARY_FILE.search(tb.tb_frame.f_code.co_filename):
        return True
      tb = tb.tb_next
    exc, seen = exc.__cause__ or exc.__context__, seen + 1
  return False


# A TensorStore error message: the spec it dumps, or the OCDBT file it failed on.
_TENSORSTORE_ERROR = re.compile(r"tensorstore_spec=|in OCDBT database at ")


class _AsyncioFilter(py_logging.Filter):
  """Drops asyncio's 'Task (Future) exception was never retrieved' (with a TensorStore spec dump)
  of the reads Orbax abandoned when another read of the same restore failed. A Future that
  TensorStore completed carries no Python frames of Orbax: its message tells it apart."""

  def filter(self, record) -> bool:
    if not record.exc_info or record.exc_info[1] is None:
      return True
    exc = record.exc_info[1]
    return not (_raised_in_orbax(exc) or _TENSORSTORE_ERROR.search(str(exc)))


_orbax_filter = _OrbaxFilter()
_asyncio_filter = _AsyncioFilter()


def _install_orbax_filter() -> None:
  # Orbax logs through absl's Python logger "absl": a filter there holds for
  # every handler (absl's stderr handler, pytest's capture, a log file).
  logger = py_logging.getLogger("absl")
  if _orbax_filter not in logger.filters:
    logger.addFilter(_orbax_filter)


def verbosity_requested() -> bool:
  return flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].present > 0


def quiet_orbax_logs(keep_info: bool | None = None) -> None:
  """Keeps Orbax's per-call INFO lines out: inference tools, and training unless --verbosity is given."""
  _install_orbax_filter()
  _orbax_filter.keep_info = verbosity_requested() if keep_info is None else keep_info


def install_restore_noise_filters() -> None:
  """Idempotent, process-wide: the unraisable-exception, asyncio and warning filters described above."""
  global _previous_unraisablehook
  if _previous_unraisablehook is None:
    _previous_unraisablehook = sys.unraisablehook
    sys.unraisablehook = _unraisablehook
  asyncio_logger = py_logging.getLogger("asyncio")
  if _asyncio_filter not in asyncio_logger.filters:
    asyncio_logger.addFilter(_asyncio_filter)
    warnings.filterwarnings("ignore", message=_NEVER_AWAITED, category=RuntimeWarning)


@contextlib.contextmanager
def quiet_restore():
  """Around a restore: no Orbax log lines at all (the caller reports the outcome in one line)."""
  install_restore_noise_filters()
  _install_orbax_filter()
  _orbax_filter.silent += 1
  try:
    yield
  finally:
    _orbax_filter.silent -= 1


_ARRAY_IN_MESSAGE = (
  re.compile(r'Error (?:reading|writing) "([^"]+?)/(?:\.z|zarr\.json|c/|\d)'),
  re.compile(r"'path': '([^']+?)/?'"),
)


def restore_error_line(exc: BaseException) -> str:
  """'ValueError (array params.wte): OUT_OF_RANGE: ... not valid for value of size 8586': one line.

  Orbax wraps TensorStore's error in an Exception whose text is the whole
  TensorStore spec; the innermost cause says what went wrong, and the
  spec or the message names the array.
  """
  chain = []
  e = exc
  while e is not None and len(chain) < 20:
    chain.append(e)
    e = e.__cause__ or e.__context__
  root = chain[-1]
  text = str(root).strip().splitlines()[0] if str(root).strip() else ""
  names = (m.group(1) for e in chain for p in _ARRAY_IN_MESSAGE for m in [p.search(str(e))] if m)
  array = next((n for n in names if not n.startswith("/")), None)
  text = re.sub(r" \[tensorstore_spec.*", "", text)
  files = re.findall(r'local file "([^"]+)"', text)
  # TensorStore's status: "CODE: Error opening ...: Error reading ...: what went wrong"; keep the
  # code and the clauses after the last of those frames.
  m = re.match(r"([A-Z_]+): (.*)$", text)
  if m:
    clauses = m.group(2).split(": ")
    frames = [i for i, c in enumerate(clauses) if re.match(r"Error (opening|reading|decoding|writing) ", c)]
    text = f"{m.group(1)}: {': '.join(clauses[frames[-1] + 1 :] if frames else clauses)}"
  where = [f"array {array}"] if array else []
  if files:
    where.append("file " + "/".join(files[-1].rstrip("/").split("/")[-3:]))
  if len(text) > 240:
    text = text[:120] + " ... " + text[-115:]
  detail = f" ({', '.join(where)})" if where else ""
  return f"{type(root).__name__}{detail}: {text}"

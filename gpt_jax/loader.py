"""grain plumbing shared by every training data stream (pretraining windows, fine-tuning rows).

One global order, cut per process:
1. Every source is `MapDataset.source(items).shuffle(seed_k).repeat()`: a
   fresh permutation per epoch of that source, whatever the others do.
   Several sources are interleaved by grain's `MapDataset.mix` in proportion
   to their weights (a deterministic interleave, not sampling: any 100
   consecutive items of a 0.7 / 0.3 mixture hold 70 +- 1 of the first), each
   drawn in its own order, so the global sequence is one indexable MapDataset.
2. Global batch s holds global items [s*B, (s+1)*B); process p of P takes rows
   [p*B/P, (p+1)*B/P) of it: `items[w:].batch(B/P)[p::P]`. The global batch at
   step s is therefore the same set of rows, in the same order, for any P.
3. The iterator state is the global position w (items consumed by all
   processes) plus what fixes the order (seed, sources, weights, lengths):
   plain JSON, the same on every process. It restores under any process
   count, any number of grain workers (`data.num_workers`) and even another
   global batch size; nothing per process or per worker is stored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import signal
from collections.abc import Sequence

import grain
from absl import flags

from gpt_jax.errors import UserError


def ignore_sigterm(worker_index: int, worker_count: int) -> None:
  # Schedulers signal the whole process group on preemption; the trainer
  # handles SIGTERM and saves, which needs its data workers alive.
  del worker_index, worker_count
  signal.signal(signal.SIGTERM, signal.SIG_IGN)


def rows_per_process(total: int, process_count: int, field: str) -> int:
  if total % process_count:
    raise UserError(f"config.{field}={total} must be divisible by the number of processes ({process_count})")
  return total // process_count


@dataclasses.dataclass(frozen=True)
class Source:
  """A named random-access source (len() and [i]) and its mixture weight."""

  name: str
  items: object
  weight: float = 1.0


def source_seed(seed: int, name: str) -> int:
  """Each source's shuffle seed: adding or reweighting a source leaves the others' orders alone."""
  return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:4], "little")


def global_order(sources: Sequence[Source], seed: int) -> grain.MapDataset:
  """The infinite global sequence of items (see the module docstring)."""
  names = [s.name for s in sources]
  if not sources or len(set(names)) != len(names):
    raise ValueError(f"sources need distinct names, got {names}")
  per_source = []
  for s in sources:
    if len(s.items) == 0:
      raise UserError(f"data source {s.name!r} has no items (windows / rows) to train on")
    # One source keeps the seed as given: its order is the one today's runs had.
    k_seed = int(seed) if len(sources) == 1 else source_seed(seed, s.name)
    per_source.append(grain.MapDataset.source(s.items).shuffle(seed=k_seed).repeat())
  if len(per_source) == 1:
    return per_source[0]
  # mix() ends with its shortest input: every input is infinite, so each source epochs on its own.
  return grain.MapDataset.mix(per_source, [float(s.weight) for s in sources])


class ElasticIterator:
  """This process's batches of the global order; its state (a global position) restores under any P.

  Batches are dicts of numpy arrays with `global_batch / process_count` rows.
  `get_state()` / `set_state()` hold plain JSON: {"position": items consumed
  by all processes, "seed", "sources": [[name, weight, length], ...], **key}.
  A state whose seed, sources or key differ is refused in one line: the same
  position in another order would be other items.
  """

  def __init__(
    self,
    sources: Sequence[Source],
    *,
    seed: int,
    global_batch: int,
    process_index: int,
    process_count: int,
    num_workers: int = 0,
    prefetch: int = 16,
    key: dict | None = None,
  ):
    self.rows = rows_per_process(global_batch, process_count, "train.batch_size")
    self.items = global_order(sources, seed)
    self.global_batch, self.process_index, self.process_count = global_batch, process_index, process_count
    self.num_workers, self.prefetch = int(num_workers), int(prefetch)
    self.key = {
      "seed": int(seed),
      "sources": [[s.name, float(s.weight), len(s.items)] for s in sources],
      **(key or {}),
    }
    self.position = 0
    self._it = None

  def dataset(self) -> grain.MapDataset:
    """This process's batches from the current position on."""
    ds = self.items[self.position :].batch(self.rows, drop_remainder=True)
    return ds[self.process_index :: self.process_count]

  def _start(self):
    # Reading a row is a memmap slice or an array index: two threads keep up
    # with any step time; grain's defaults (16 threads, 500 batches ahead)
    # only cost memory.
    read = grain.ReadOptions(num_threads=2, prefetch_buffer_size=self.prefetch)
    it = self.dataset().to_iter_dataset(read)
    if self.num_workers > 0:
      if not flags.FLAGS.is_parsed():
        # grain reads its absl flags when starting workers; outside app.run
        # (tests, notebooks) their defaults are what we want.
        flags.FLAGS.mark_as_parsed()
      it = it.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=self.num_workers), worker_init_fn=ignore_sigterm
      )
    return iter(it)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._it is None:
      self._it = self._start()
    batch = next(self._it)
    self.position += self.global_batch
    return batch

  def get_state(self) -> dict:
    return {"position": self.position, **self.key}

  def set_state(self, state: dict) -> None:
    for k, want in self.key.items():
      if state.get(k) != want:
        raise UserError(
          f"the checkpoint's data order has {k}={state.get(k)!r} but this run has {want!r}; "
          "resume with the data.* settings it was written with"
        )
    self.close()
    self.position = int(state["position"])

  def close(self) -> None:
    if self._it is not None and hasattr(self._it, "close"):
      self._it.close()
    self._it = None


def batches(source, *, batch_size: int, seed: int, process_index: int, process_count: int, data_cfg):
  """This process's ElasticIterator over one random-access source (fine-tuning rows)."""
  return ElasticIterator(
    [Source("train", source)],
    seed=seed,
    global_batch=batch_size,
    process_index=process_index,
    process_count=process_count,
    num_workers=data_cfg.num_workers,
    prefetch=data_cfg.prefetch,
  )

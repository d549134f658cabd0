"""grain plumbing shared by every training data stream (pretraining windows, fine-tuning rows).

`batches(source, ...)` turns a random-access source into this process's
infinite, checkpointable iterator of batches: a fresh shuffle each epoch,
disjoint rows per process, read ahead by threads (and, with
`data.num_workers`, by worker processes that ignore the scheduler's SIGTERM).
"""

from __future__ import annotations

import signal

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


def batches(source, *, batch_size: int, seed: int, process_index: int, process_count: int, data_cfg):
  """This process's iterator of batches of `batch_size // process_count` rows of `source`.

  Checkpoint it with grain.checkpoint.CheckpointSave / CheckpointRestore;
  the state restores only under the same data.num_workers.
  """
  rows = rows_per_process(batch_size, process_count, "train.batch_size")
  ds = grain.MapDataset.source(source).shuffle(seed=int(seed)).repeat()
  ds = ds[process_index::process_count].batch(rows, drop_remainder=True)
  # Reading a row is a memmap slice or an array index: two threads keep up
  # with any step time; grain's defaults (16 threads, 500 batches ahead)
  # only cost memory.
  read = grain.ReadOptions(num_threads=2, prefetch_buffer_size=int(data_cfg.prefetch))
  it = ds.to_iter_dataset(read)
  if data_cfg.num_workers > 0:
    if not flags.FLAGS.is_parsed():
      # grain reads its absl flags when starting workers; outside app.run
      # (tests, notebooks) their defaults are what we want.
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=int(data_cfg.num_workers)), worker_init_fn=ignore_sigterm
    )
  return iter(it)

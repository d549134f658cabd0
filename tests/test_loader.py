"""grain plumbing: per-process batches that cover each epoch once, resumable iterators, refusals."""

import signal

import ml_collections
import numpy as np
import pytest

from gpt_jax import loader
from gpt_jax.errors import UserError

DATA = ml_collections.ConfigDict(dict(prefetch=2, num_workers=0))


def _take(it, n):
  return [np.asarray(next(it)) for _ in range(n)]


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_processes_read_disjoint_rows_covering_each_epoch(process_count):
  rows, batch = 32, 8
  steps = rows // batch  # Global batches per epoch.
  its = [
    loader.batches(
      np.arange(rows), batch_size=batch, seed=3, process_index=p, process_count=process_count, data_cfg=DATA
    )
    for p in range(process_count)
  ]
  per_process = [_take(it, 2 * steps) for it in its]
  assert all(b.shape == (batch // process_count,) for bs in per_process for b in bs)
  for epoch in range(2):
    seen = np.concatenate([b for bs in per_process for b in bs[epoch * steps : (epoch + 1) * steps]])
    assert sorted(seen) == list(range(rows))  # Every row once: disjoint across processes.
  first = np.concatenate([b for bs in per_process for b in bs[:steps]])
  second = np.concatenate([b for bs in per_process for b in bs[steps:]])
  assert not np.array_equal(first, second)  # A fresh shuffle each epoch.


def test_the_seed_fixes_the_order():
  make = lambda seed: loader.batches(
    np.arange(40), batch_size=4, seed=seed, process_index=0, process_count=1, data_cfg=DATA
  )
  a, b, c = (np.concatenate(_take(make(s), 10)) for s in (0, 0, 1))
  assert np.array_equal(a, b) and not np.array_equal(a, c)
  assert sorted(a) == list(range(40)) and not np.array_equal(a, np.arange(40))


def test_a_restored_iterator_continues_exactly():
  make = lambda: loader.batches(
    np.arange(24), batch_size=4, seed=0, process_index=1, process_count=2, data_cfg=DATA
  )
  it = make()
  _take(it, 5)  # Into the second epoch (6 rows per process per epoch, 2 per batch).
  state = it.get_state()
  expected = _take(it, 4)
  resumed = make()
  resumed.set_state(state)
  assert all(np.array_equal(a, b) for a, b in zip(_take(resumed, 4), expected, strict=True))


def test_a_batch_processes_cannot_share_is_one_line():
  with pytest.raises(UserError) as e:
    loader.batches(np.arange(24), batch_size=6, seed=0, process_index=0, process_count=4, data_cfg=DATA)
  assert str(e.value) == "config.train.batch_size=6 must be divisible by the number of processes (4)"
  assert loader.rows_per_process(12, 4, "eval.batch_size") == 3
  with pytest.raises(UserError, match=r"^config\.eval\.batch_size=10 must be divisible .* \(4\)$"):
    loader.rows_per_process(10, 4, "eval.batch_size")


def test_workers_ignore_the_schedulers_sigterm():
  before = signal.getsignal(signal.SIGTERM)
  try:
    loader.ignore_sigterm(0, 2)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
  finally:
    signal.signal(signal.SIGTERM, before)

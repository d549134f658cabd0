"""Global item order: the same global batches under any process count, mixtures, elastic resume;
grain plumbing: per-process batches that cover each epoch once, resumable iterators, refusals."""

import json
import signal

import ml_collections
import numpy as np
import pytest

from gpt_jax import loader
from gpt_jax.errors import UserError

T = 8


# grain's index_shuffle costs ~20 ms per index for a dozen items, ~0.2 ms from
# a thousand on: sources here have at least a thousand items.


class Windows:
  """Item i: tokens [i*T, i*T + T] (a window of the stream 0, 1, 2, ...), its index and source id."""

  def __init__(self, count, source_id=0):
    self.count, self.source_id = count, source_id

  def __len__(self):
    return self.count

  def __getitem__(self, i):
    i = int(i)
    return {
      "tokens": np.arange(i * T, i * T + T + 1, dtype=np.int32),
      "index": np.int64(i),
      "source": np.int32(self.source_id),
    }


def source(name, count, weight=1.0, source_id=0):
  return loader.Source(name, Windows(count, source_id), weight)


def iterators(sources, process_count, global_batch=8, seed=3, **kw):
  return [
    loader.ElasticIterator(
      sources, seed=seed, global_batch=global_batch, process_index=p, process_count=process_count, **kw
    )
    for p in range(process_count)
  ]


def global_batches(its, steps):
  """[steps, B, 2] (source, item index): each step's rows of every process, in process order."""
  out = []
  for _ in range(steps):
    rows = [next(it) for it in its]
    out.append(np.concatenate([np.stack([r["source"], r["index"]], -1) for r in rows]))
  return np.stack(out)


def test_items_and_each_epoch_is_a_permutation():
  (it,) = iterators([source("a", 1000)], 1)
  batch = next(it)
  assert batch["tokens"].shape == (8, T + 1) and batch["tokens"].dtype == np.int32
  for row, i in zip(batch["tokens"], batch["index"]):
    np.testing.assert_array_equal(row, np.arange(i * T, i * T + T + 1))
  items = loader.global_order([source("a", 1000)], seed=3)
  order = np.array([items[i]["index"] for i in range(2000)])
  np.testing.assert_array_equal(order[:8], batch["index"])
  assert sorted(order[:1000]) == list(range(1000)) and sorted(order[1000:]) == list(range(1000))
  assert (order[:1000] != order[1000:]).mean() > 0.9  # reshuffled per epoch


def test_global_batch_is_the_same_for_any_process_count():
  sources = [source("a", 1000)]
  want = global_batches(iterators(sources, 1), 12)
  for process_count in (2, 4, 8):
    np.testing.assert_array_equal(global_batches(iterators(sources, process_count), 12), want)
  with pytest.raises(UserError, match="batch_size=8 must be divisible by the number of processes \\(3\\)"):
    iterators(sources, 3)


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2), (2, 4), (4, 2)])
def test_elastic_resume_continues_the_global_stream(before, after):
  sources = [source("web", 1200, 0.7), source("books", 500, 0.3, source_id=1)]
  want = global_batches(iterators(sources, 1), 15)
  its = iterators(sources, before)
  np.testing.assert_array_equal(global_batches(its, 6), want[:6])
  states = [it.get_state() for it in its]
  assert all(s == states[0] for s in states) and states[0]["position"] == 6 * 8  # one state for all processes
  saved = json.loads(json.dumps(states[0]))
  resumed = iterators(sources, after)
  for it in resumed:
    it.set_state(saved)
  np.testing.assert_array_equal(global_batches(resumed, 9), want[6:])


def test_resume_with_another_global_batch_size_continues_at_the_same_item():
  sources = [source("a", 1000)]
  flat = global_batches(iterators(sources, 1, global_batch=4), 30).reshape(-1, 2)
  its = iterators(sources, 2, global_batch=8)
  global_batches(its, 5)
  resumed = iterators(sources, 1, global_batch=4)
  resumed[0].set_state(its[0].get_state())
  np.testing.assert_array_equal(global_batches(resumed, 10).reshape(-1, 2), flat[40:80])


def test_a_state_of_another_order_is_refused():
  sources = [source("a", 1000)]
  (it,) = iterators(sources, 1, key={"seq_len": T})
  next(it)
  state = it.get_state()
  for other, field in (
    (iterators(sources, 1, seed=4, key={"seq_len": T})[0], "seed"),
    (iterators([source("a", 999)], 1, key={"seq_len": T})[0], "sources"),
    (iterators([source("a", 1000, 0.5), source("b", 1000)], 1, key={"seq_len": T})[0], "sources"),
    (iterators(sources, 1, key={"seq_len": 2 * T})[0], "seq_len"),
  ):
    with pytest.raises(UserError, match=f"the checkpoint's data order has {field}=") as err:
      other.set_state(state)
    assert "\n" not in str(err.value)


def test_mixture_proportions_and_independent_epochs():
  web, books = source("web", 2000, 0.7), source("books", 1000, 0.3, source_id=1)
  items = loader.global_order([web, books], seed=3)
  drawn = np.array([(w["source"], w["index"]) for w in (items[i] for i in range(10_000))])
  # The iterators of two processes deliver exactly this sequence.
  batched = global_batches(iterators([web, books], 2, global_batch=100), 5).reshape(-1, 2)
  np.testing.assert_array_equal(batched, drawn[:500])
  share = (drawn[:, 0] == 0).mean()
  assert abs(share - 0.7) < 0.01
  # In any 100 consecutive items the mixture is within 1 point too: grain interleaves, it does not sample.
  assert np.abs((drawn[:, 0].reshape(100, 100) == 0).mean(1) - 0.7).max() < 0.01 + 1e-9
  for sid, n in ((0, 2000), (1, 1000)):  # 3.5 and 3 epochs
    order = drawn[drawn[:, 0] == sid, 1]
    epochs = order[: len(order) // n * n].reshape(-1, n)
    assert len(epochs) == 3 and all(sorted(e) == list(range(n)) for e in epochs)
    assert (epochs[0] != epochs[1]).mean() > 0.9 and (epochs[1] != epochs[2]).mean() > 0.9  # reshuffled
  # A source's own order does not depend on the other sources or the weights.
  other = loader.global_order([source("books", 1000, 0.5, source_id=1), source("news", 1000, 0.5, 2)], seed=3)
  other_books = [w["index"] for w in (other[i] for i in range(700)) if w["source"] == 1]
  np.testing.assert_array_equal(drawn[drawn[:, 0] == 1, 1][:300], other_books[:300])


def test_mixture_exact_resume_bitwise():
  sources = [source("web", 1200, 0.7), source("books", 500, 0.3, source_id=1)]
  (it,) = iterators(sources, 1)
  for _ in range(7):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(5)]
  (fresh,) = iterators(sources, 1)
  fresh.set_state(state)
  for a, b in zip(want, [next(fresh) for _ in range(5)]):
    for k in ("tokens", "index", "source"):
      np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.slow
def test_state_restores_under_another_worker_count():
  sources = [source("web", 1200, 0.7), source("books", 500, 0.3, source_id=1)]
  want = global_batches(iterators(sources, 1), 10)
  its = iterators(sources, 1, num_workers=2)
  np.testing.assert_array_equal(global_batches(its, 4), want[:4])
  state = its[0].get_state()
  its[0].close()
  resumed = iterators(sources, 2, num_workers=0)  # and another process count
  for it in resumed:
    it.set_state(state)
  np.testing.assert_array_equal(global_batches(resumed, 6), want[4:])


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

"""Token shards: parallel chunked writing equals plain encoding, atomic publishing, multi-host shards."""

import json
import os
import pickle
import threading
import time

import numpy as np
import pytest

from gpt_jax import data_sources, formats, token_store
from gpt_jax import tokenizer as tok_lib
from gpt_jax.errors import UserError


@pytest.fixture(scope="module")
def gpt2():
  return tok_lib.gpt2()


@pytest.fixture(scope="module")
def docs():
  return list(data_sources.shakespeare_documents()[:40])


def reference(tok, docs):
  return np.array([t for d in docs for t in tok.encode(d) + [tok.eot_id]], np.int64)


def labelled(docs, every=5):
  """(split, text): every 5th document is validation, the rest training."""
  return [("validation" if i % every == 2 else "train", d) for i, d in enumerate(docs)]


def test_dtype():
  assert token_store.token_dtype(50257) == np.uint16 and token_store.token_dtype(65536) == np.uint16
  assert token_store.token_dtype(65537) == np.uint32


@pytest.mark.parametrize("threads", [1, 3])
def test_written_stream_equals_encoding_each_document(gpt2, docs, tmp_path, threads):
  # Small chunks and pieces: dozens of chunks, several pieces per chunk, pieces across threads.
  stems = {"train": tmp_path / "t", "validation": tmp_path / "v"}
  stats = token_store.write_shards(
    labelled(docs), gpt2, stems, threads=threads, chunk_bytes=20_000, piece_bytes=3_000, progress=False
  )
  for split, stem in stems.items():
    want_docs = [d for s, d in labelled(docs) if s == split]
    want = reference(gpt2, want_docs)
    got = np.fromfile(f"{stem}.bin", np.uint16)
    np.testing.assert_array_equal(got, want)
    ends = np.fromfile(f"{stem}.idx", "<i8")
    np.testing.assert_array_equal(ends, np.cumsum([len(gpt2.encode(d)) + 1 for d in want_docs]))
    assert stats[split] == token_store.ShardStats(
      len(want_docs), len(want), sum(len(d.encode()) for d in want_docs)
    )


def test_memory_is_bounded_by_two_chunks(gpt2, docs, tmp_path, monkeypatch):
  """Documents are pulled lazily: when a chunk is written, at most the next chunk has been read."""
  text = "".join(docs)
  equal = [text[i * 1000 : (i + 1) * 1000] for i in range(200)]  # 10 per chunk of 10,000 characters
  pulled, lag = [0], []
  real_append = token_store._ShardWriter.append

  def append(self, tokens, lengths):
    real_append(self, tokens, lengths)
    lag.append(pulled[0] - self.stats.documents)

  def stream():
    for d in equal:
      pulled[0] += 1
      yield "train", d

  monkeypatch.setattr(token_store._ShardWriter, "append", append)
  stats = token_store.write_shards(
    stream(), gpt2, {"train": tmp_path / "t"}, chunk_bytes=10_000, piece_bytes=2_500, progress=False
  )
  assert stats["train"].documents == 200 and len(lag) == 80  # 20 chunks of pieces of 3, 3, 3, 1 documents
  # Writing chunk k's pieces, chunk k + 1 (10 documents) has been read, chunk k + 2 not yet.
  assert lag[:4] == [17, 14, 11, 10] and max(lag) == 17 and lag[-4:] == [7, 4, 1, 0]


def test_build_publishes_atomically(gpt2, docs, tmp_path):
  target = tmp_path / "store" / "cache-1"
  header = token_store.build(
    target, lambda h, n: labelled(docs), gpt2, meta={"source": "test"}, chunk_bytes=50_000, progress=False
  )
  assert header["splits"]["train"]["documents"] == 32 and header["source"] == "test"
  assert header == json.loads((target / "header.json").read_text())
  stream = token_store.TokenStream.from_store(target, "validation")
  np.testing.assert_array_equal(stream[:], reference(gpt2, docs[2::5]))

  def crashing(h, n):
    for i, item in enumerate(labelled(docs)):
      if i == 20:
        raise KeyboardInterrupt
      yield item

  for bad, error in ((crashing, KeyboardInterrupt), (lambda h, n: labelled(docs[:2]), UserError)):
    with pytest.raises(error):
      token_store.build(tmp_path / "store" / "cache-2", bad, gpt2, progress=False)
  # Neither a half store nor a tmp directory is left.
  assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["cache-1"]
  with pytest.raises(UserError, match="cache-3: the validation split has no documents"):
    token_store.build(tmp_path / "store" / "cache-3", lambda h, n: labelled(docs[:2]), gpt2, progress=False)


@pytest.mark.parametrize("num_hosts", [2, 3])
def test_hosts_write_shards_that_read_as_the_single_host_stream(gpt2, docs, tmp_path, num_hosts):
  items = labelled(docs)
  single = token_store.build(tmp_path / "one", lambda h, n: items, gpt2, progress=False)

  def share(h, n):  # contiguous shares, as formats.host_share gives
    return items[h * len(items) // n : (h + 1) * len(items) // n]

  target = tmp_path / "many"
  headers, errors = [None] * num_hosts, []

  def host(h):
    try:
      headers[h] = token_store.build(
        target, share, gpt2, host=h, num_hosts=num_hosts, wait_timeout_s=60, progress=False
      )
    except BaseException as e:  # noqa: BLE001 - reported below
      errors.append(e)

  threads = [threading.Thread(target=host, args=(h,)) for h in reversed(range(num_hosts))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors and all(h == headers[0] for h in headers)
  assert [s["name"] for s in headers[0]["splits"]["train"]["shards"]] == [
    f"train-{h:05d}-of-{num_hosts:05d}" for h in range(num_hosts)
  ]
  for split in ("train", "validation"):
    assert headers[0]["splits"][split]["tokens"] == single["splits"][split]["tokens"]
    one = token_store.TokenStream.from_store(tmp_path / "one", split)
    many = token_store.TokenStream.from_store(target, split)
    np.testing.assert_array_equal(many[:], one[:])
    np.testing.assert_array_equal(many.document_ends(), one.document_ends())
    # Every window read across the shard boundaries equals the single file's.
    for start in range(0, len(one) - 40, 977):
      np.testing.assert_array_equal(many[start : start + 40], one[start : start + 40])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["many", "one"]  # staging renamed into place


def test_token_files_read_as_one_stream(tmp_path):
  a = np.arange(0, 1000, dtype=np.uint16)
  b = np.arange(1000, 1500, dtype=np.uint16)
  (tmp_path / "train.bin").write_bytes(a.tobytes())
  header = np.zeros(256, "<i4")
  header[:3] = formats.LLMC_MAGIC, 1, len(b)
  (tmp_path / "s1.bin").write_bytes(header.tobytes() + b.tobytes())
  files = [formats.open_token_file(tmp_path / n) for n in ("train.bin", "s1.bin")]
  stream = token_store.TokenStream.from_token_files(files)
  want = np.concatenate([a, b])
  assert len(stream) == 1500 and stream[-1] == 1499 and stream[999] == 999
  np.testing.assert_array_equal(stream[990:1010], want[990:1010])
  np.testing.assert_array_equal(stream[:], want)
  assert len(stream[1490:2000]) == 10 and len(stream[5:5]) == 0
  again = pickle.loads(pickle.dumps(stream))  # no memmap travels to a worker
  assert again._maps is None and again[995:1005].tolist() == want[995:1005].tolist()


def test_a_bad_corpus_file_publishes_nothing(gpt2, docs, tmp_path):
  zstandard = pytest.importorskip("zstandard")
  raw = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
  (tmp_path / "in").mkdir()
  (tmp_path / "in" / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
  (tmp_path / "in" / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw)[:-100])
  units = formats.parts(sorted((tmp_path / "in").iterdir()))

  def read(h, n):
    return (("train", t) for u in formats.host_share(units, h, n) for t in formats.read_part(u))

  with pytest.raises(UserError, match="b.jsonl.zst: truncated zstd file") as err:
    token_store.build(
      tmp_path / "out" / "store", read, gpt2, splits=("train",), chunk_bytes=10_000, progress=False
    )
  assert "\n" not in str(err.value)
  # Not even the store's missing parent folder was made: the tmp folder went into tmp_path, and is gone.
  assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_a_hosts_refusal_stops_every_host_at_once(gpt2, docs, tmp_path):
  """Host 1's share holds a bad document: host 1 raises, and host 0, waiting for its shard, raises
  the same line at once instead of waiting out its timeout; nothing is published."""
  items = labelled(docs)

  def share(h, n):
    for item in items[h * len(items) // n : (h + 1) * len(items) // n]:
      if h == 1:
        raise UserError("b.jsonl.zst: truncated zstd file (ends inside a frame)")
      yield item

  target, raised = tmp_path / "store", {}

  def host(h):
    try:
      token_store.build(target, share, gpt2, host=h, num_hosts=2, wait_timeout_s=120, progress=False)
    except UserError as e:
      raised[h] = str(e)

  start = time.monotonic()
  threads = [threading.Thread(target=host, args=(h,)) for h in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert time.monotonic() - start < 60
  assert raised[1] == "b.jsonl.zst: truncated zstd file (ends inside a frame)"
  assert raised[0] == f"host 1 could not build its token shard: {raised[1]}"
  assert not target.exists()

  # The corpus fixed, the same command builds a minute later: host 1's error is then a stale one
  # (older than host 0's start), whether or not host 1 has cleared it yet.
  error = tmp_path / ".store.staging-2" / "host-1.error"
  assert error.exists()
  os.utime(error, (time.time() - 60, time.time() - 60))

  def fixed(h, n):
    return items[h * len(items) // n : (h + 1) * len(items) // n]

  headers = [None, None]
  threads = [
    threading.Thread(
      target=lambda h=h: headers.__setitem__(
        h, token_store.build(target, fixed, gpt2, host=h, num_hosts=2, wait_timeout_s=120, progress=False)
      )
    )
    for h in (0, 1)
  ]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert headers[0] == headers[1] and headers[0]["splits"]["train"]["documents"] == 32
  assert sorted(p.name for p in target.iterdir() if not p.name.endswith((".bin", ".idx"))) == ["header.json"]


@pytest.mark.parametrize("num_hosts", [1, 2])
def test_a_store_that_accept_refuses_is_not_published(gpt2, docs, tmp_path, num_hosts):
  items, seen = labelled(docs), []

  def accept(totals):
    seen.append({s: (t.documents, t.tokens) for s, t in totals.items()})
    raise UserError("too short")

  def share(h, n):
    return items[h * len(items) // n : (h + 1) * len(items) // n]

  raised = []

  def host(h):
    try:
      token_store.build(
        tmp_path / "new" / "store", share, gpt2, host=h, num_hosts=num_hosts, accept=accept, progress=False
      )
    except UserError as e:
      raised.append(str(e))

  threads = [threading.Thread(target=host, args=(h,)) for h in range(num_hosts)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  # accept saw the whole store's totals (once, on host 0), and every host raised.
  want = {
    s: (sum(s == k for k, _ in items), len(reference(gpt2, [d for k, d in items if k == s])))
    for s in ("train", "validation")
  }
  assert seen == [want] and len(raised) == num_hosts
  assert not (tmp_path / "new" / "store").exists()
  if num_hosts == 1:
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no folder made, no tmp folder left


def test_parts_estimate_their_text(tmp_path):
  import gzip

  text = ("some words of a document\n" * 2000).encode()
  (tmp_path / "a.txt.gz").write_bytes(gzip.compress(text))
  (tmp_path / "b.txt").write_bytes(text)
  a, b = formats.parts([tmp_path / "a.txt.gz", tmp_path / "b.txt"])
  assert a.text_bytes == b.text_bytes == len(text)  # the gzip trailer's ISIZE; a plain file's size
  assert a.size < len(text) // 10

"""Token shards: documents tokenised with every core into chunked files, read back as one stream.

Layout of a token store directory (cache format 2):
  header.json                      counts, dtype, eot_id, tokenizer fingerprint,
                                   and each split's shards in stream order
  <split>-<h>-of-<H>.bin           raw little-endian token ids (uint16 when the
                                   vocabulary fits, else uint32), <|endoftext|>
                                   after every document (GPT-2 §2)
  <split>-<h>-of-<H>.idx           int64 end offset of each document in the shard
A split's token stream is its shards concatenated in host order; `TokenStream`
reads a range of it through per-shard memmaps, so shards are never copied
into one file. Raw files (no .npy header) are written as they go, so a stream
of unknown length is never copied once its length is known; nanoGPT's .bin
files have this very layout (no index).

Writing (`write_shards`): documents are read on the calling thread in chunks
of about `chunk_bytes` of text; each chunk is cut into pieces that a thread
pool encodes with tiktoken, which releases the GIL while it encodes (tiktoken
0.14 src/py.rs: py.detach), while the next chunk is read. At most two chunks
are in memory, whatever the corpus size. A tqdm bar shows bytes (with an ETA
when the total is known), documents/s and tokens/s.

Publishing (`build`): one host writes into a tmp directory renamed into place
at the end; H hosts on a shared filesystem each write their contiguous share
of the documents as shard h into a common staging directory (each file
renamed into it when complete, a <shard>.json marker last), and host 0 writes
header.json once every marker is there and renames the staging directory
into place. A failed or refused build publishes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.errors import UserError

FORMAT = 2
CHUNK_BYTES = 16 << 20  # text per chunk: two in flight keep memory ~10x this, whatever the corpus
PIECE_BYTES = 1 << 20  # text per thread-pool task: small enough to balance the threads


def token_dtype(vocab_size: int) -> np.dtype:
  """uint16 when every id (< vocab_size) fits, else uint32."""
  return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def available_cores() -> int:
  """The cores this process may run on (a SLURM task's share, not the whole node)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def shard_name(split: str, host: int, num_hosts: int) -> str:
  return f"{split}-{host:05d}-of-{num_hosts:05d}"


# ----------------------------------------------------------------- encoding


def _encode_piece(encoding, texts: list[str], eot_id: int, dtype) -> tuple[np.ndarray, np.ndarray]:
  """One piece's tokens with <|endoftext|> after each document, and its document lengths."""
  # encode_to_numpy skips the list of Python ints that encode_ordinary builds
  # (under the GIL); no special tokens are allowed, so "<|endoftext|>" in a
  # document is plain text, as with encode_ordinary.
  ids = [encoding.encode_to_numpy(t, disallowed_special=()) for t in texts]
  lengths = np.fromiter((len(a) + 1 for a in ids), np.int64, len(ids))
  out = np.empty(int(lengths.sum()), dtype)
  ends = np.cumsum(lengths)
  for a, end in zip(ids, ends):
    out[end - len(a) - 1 : end - 1] = a
  out[ends - 1] = eot_id
  return out, lengths


def _pieces(chunk: list[str], piece_bytes: int) -> Iterator[list[str]]:
  piece, size = [], 0
  for text in chunk:
    piece.append(text)
    size += len(text)
    if size >= piece_bytes:
      yield piece
      piece, size = [], 0
  if piece:
    yield piece


@dataclasses.dataclass
class ShardStats:
  documents: int = 0
  tokens: int = 0
  text_bytes: int = 0


class _ShardWriter:
  """Appends tokens to <stem>.bin and document ends to <stem>.idx."""

  def __init__(self, stem: Path, dtype):
    self.stem, self.dtype, self.stats = stem, dtype, ShardStats()
    self.bin = open(stem.with_name(stem.name + ".bin"), "wb")
    self.idx = open(stem.with_name(stem.name + ".idx"), "wb")

  def append(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
    tokens.astype(self.dtype, copy=False).tofile(self.bin)
    (self.stats.tokens + np.cumsum(lengths)).astype("<i8").tofile(self.idx)
    self.stats.documents += len(lengths)
    self.stats.tokens += len(tokens)

  def close(self) -> None:
    self.bin.close()
    self.idx.close()


def write_shards(
  docs: Iterable[tuple[str, str]],
  tokenizer,
  stems: dict[str, Path],
  *,
  threads: int | None = None,
  chunk_bytes: int = CHUNK_BYTES,
  piece_bytes: int = PIECE_BYTES,
  total_bytes: int | None = None,
  progress: bool = True,
  desc: str = "tokenising",
) -> dict[str, ShardStats]:
  """Tokenises (split, text) documents into the shard files <stems[split]>.bin / .idx, in one pass.

  threads: encoding threads (default: every core this process may run on).
  total_bytes: the text's size if known (the progress bar's ETA). Returns
  each split's counts.
  """
  threads = threads or available_cores()
  dtype = token_dtype(tokenizer.vocab_size)
  writers = {split: _ShardWriter(stem, dtype) for split, stem in stems.items()}
  bar = tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress)
  start = time.perf_counter()

  def submit(pool, chunk):
    by_split = {}
    for split, text in chunk:
      if split not in writers:
        raise ValueError(f"document for split {split!r}, which has no shard ({', '.join(writers)})")
      by_split.setdefault(split, []).append(text)
    return {
      split: (
        [
          pool.submit(_encode_piece, tokenizer.encoding, p, tokenizer.eot_id, dtype)
          for p in _pieces(texts, piece_bytes)
        ],
        sum(len(t.encode()) for t in texts),
      )
      for split, texts in by_split.items()
    }

  def drain(jobs):
    for split, (futures, text_bytes) in jobs.items():
      for f in futures:
        writers[split].append(*f.result())
      writers[split].stats.text_bytes += text_bytes
      bar.update(text_bytes)
    n_docs = sum(w.stats.documents for w in writers.values())
    n_tok = sum(w.stats.tokens for w in writers.values())
    dt = max(time.perf_counter() - start, 1e-9)
    bar.set_postfix_str(f"{n_docs / dt:,.0f} docs/s, {n_tok / dt / 1e6:.2f}M tokens/s", refresh=False)

  try:
    with ThreadPoolExecutor(threads) as pool:
      pending = None
      for chunk in _chunks(docs, chunk_bytes):
        # Submit this chunk before waiting for the last one: the pool always has work.
        submitted = submit(pool, chunk)
        if pending is not None:
          drain(pending)
        pending = submitted
      if pending is not None:
        drain(pending)
  finally:
    bar.close()
    for w in writers.values():
      w.close()
  return {split: w.stats for split, w in writers.items()}


def _chunks(docs: Iterable[tuple[str, str]], chunk_bytes: int) -> Iterator[list[tuple[str, str]]]:
  chunk, size = [], 0
  for item in docs:
    chunk.append(item)
    size += len(item[1])
    if size >= chunk_bytes:
      yield chunk
      chunk, size = [], 0
  if chunk:
    yield chunk


# --------------------------------------------------------------- publishing


def _header(tokenizer, meta: dict, splits: dict[str, list[tuple[str, ShardStats]]], seconds: float) -> dict:
  return {
    "format": FORMAT,
    **meta,
    "tokenizer_fingerprint": tokenizer.fingerprint,
    "tokenizer_vocab_size": tokenizer.vocab_size,
    "eot_id": tokenizer.eot_id,
    "dtype": token_dtype(tokenizer.vocab_size).name,
    "splits": {
      split: {
        "documents": sum(s.documents for _, s in shards),
        "tokens": sum(s.tokens for _, s in shards),
        "shards": [{"name": name, **dataclasses.asdict(s)} for name, s in shards],
      }
      for split, shards in splits.items()
    },
    "tokenize_seconds": round(seconds, 2),
  }


def build(
  directory: Path,
  docs_for_host: Callable[[int, int], Iterable[tuple[str, str]]],
  tokenizer,
  splits: tuple[str, ...] = ("train", "validation"),
  *,
  host: int = 0,
  num_hosts: int = 1,
  meta: dict | None = None,
  accept: Callable[[dict[str, ShardStats]], None] | None = None,
  wait_timeout_s: float | None = None,
  **write_kw,
) -> dict:
  """Builds the token store `directory` (returns its header), published atomically.

  docs_for_host(h, H) yields host h's (split, text) documents: a contiguous
  share, so that shards in host order give the single-host stream. With
  num_hosts > 1 `directory`'s parent must be shared by the hosts (see the
  module docstring); every host returns once the store is published.
  A split without documents is refused and nothing is published; so is a
  store that `accept` (called with every split's totals) refuses.

  One host builds in a tmp folder inside the deepest folder of `directory`'s
  path that already exists, and creates the missing ones only to publish: a
  refused or failed build leaves no folder behind (not even an empty
  <workdir>/data), and the rename stays on one filesystem.
  """
  directory = Path(directory)
  meta = dict(meta or {})
  start = time.perf_counter()
  if num_hosts == 1:
    tmp = _tmp_near(directory)
    try:
      stems = {s: tmp / shard_name(s, 0, 1) for s in splits}
      stats = write_shards(docs_for_host(0, 1), tokenizer, stems, **write_kw)
      _check_nonempty(meta.get("source", directory.name), stats)
      if accept is not None:
        accept(stats)
      header = _header(tokenizer, meta, {s: [(stems[s].name, stats[s])] for s in splits}, 0.0)
      header["tokenize_seconds"] = round(time.perf_counter() - start, 2)
      (tmp / "header.json").write_text(json.dumps(header, indent=1) + "\n")
      directory.parent.mkdir(parents=True, exist_ok=True)
      tokenizer_lib.publish_dir(tmp, directory)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
    return json.loads((directory / "header.json").read_text())

  staging = directory.parent / f".{directory.name}.staging-{num_hosts}"
  staging.mkdir(parents=True, exist_ok=True)
  errors = _HostErrors(staging, host, num_hosts)
  markers = {s: staging / f"{shard_name(s, host, num_hosts)}.json" for s in splits}
  try:
    if not directory.exists() and not all(m.exists() for m in markers.values()):
      # A marker means the shard is complete (a crashed earlier build of the
      # same inputs keeps its finished shards); otherwise (re)write it.
      tmp = tokenizer_lib.tmp_dir_for(staging / f"host-{host}")
      try:
        stems = {s: tmp / shard_name(s, host, num_hosts) for s in splits}
        stats = write_shards(docs_for_host(host, num_hosts), tokenizer, stems, **write_kw)
        for s in splits:
          for ext in (".bin", ".idx"):
            os.replace(stems[s].with_name(stems[s].name + ext), staging / (stems[s].name + ext))
          _write_atomic(markers[s], json.dumps(dataclasses.asdict(stats[s])))
      finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if host == 0 and not directory.exists():
      shards = {}
      for s in splits:
        shards[s] = []
        for h in range(num_hosts):
          name = shard_name(s, h, num_hosts)
          errors.wait_for(staging / f"{name}.json", f"token shard {name} from host {h}", wait_timeout_s)
          shards[s].append((name, ShardStats(**json.loads((staging / f"{name}.json").read_text()))))
      totals = {
        s: ShardStats(sum(st.documents for _, st in shards[s]), sum(st.tokens for _, st in shards[s]))
        for s in splits
      }
      _check_nonempty(meta.get("source", directory.name), totals)
      if accept is not None:
        accept(totals)
      header = _header(tokenizer, {**meta, "hosts": num_hosts}, shards, time.perf_counter() - start)
      _write_atomic(staging / "header.json", json.dumps(header, indent=1) + "\n")
      for m in [*staging.glob("*.json"), *staging.glob("host-*.start")]:
        if m.name != "header.json":
          m.unlink()
      tokenizer_lib.publish_dir(staging, directory)
  except UserError as e:
    errors.report(str(e))  # The other hosts stop waiting and raise it too.
    raise
  errors.wait_for(directory / "header.json", "the token store", wait_timeout_s)
  return json.loads((directory / "header.json").read_text())


class _HostErrors:
  """One-line errors of a multi-host build, as files `host-<h>.error` in the staging directory.

  A host whose share is refused (a truncated file, a missing column) writes
  its message there; a host waiting for shards or for the published store
  raises it at once instead of waiting out its timeout. Each host deletes
  its own error file when it starts and marks its start (`host-<h>.start`);
  an error written more than STALE_S before this host's start mark (same
  filesystem clock) is a failed earlier attempt's, left by a host that has
  not started again yet, and is ignored.
  """

  STALE_S = 30.0  # Hosts start a source's build within seconds of each other (after the same barrier).

  def __init__(self, staging: Path, host: int, num_hosts: int):
    self.staging, self.host, self.num_hosts = staging, host, num_hosts
    (staging / f"host-{host}.error").unlink(missing_ok=True)
    mark = staging / f"host-{host}.start"
    mark.touch()
    self.since = mark.stat().st_mtime - self.STALE_S

  def report(self, message: str) -> None:
    if self.staging.exists():
      _write_atomic(self.staging / f"host-{self.host}.error", message)

  def check(self) -> None:
    for h in range(self.num_hosts):
      path = self.staging / f"host-{h}.error"
      try:
        if path.stat().st_mtime >= self.since:
          raise UserError(f"host {h} could not build its token shard: {path.read_text()}")
      except FileNotFoundError:
        continue

  def wait_for(self, path: Path, what: str, timeout_s: float | None) -> None:
    timeout_s = tokenizer_lib.WAIT_TIMEOUT_S if timeout_s is None else timeout_s
    deadline = time.monotonic() + timeout_s
    while not path.exists():
      self.check()
      if time.monotonic() > deadline:
        raise UserError(
          f"{path}: waited {timeout_s:.0f} s for {what}; is {self.staging.parent} on a filesystem shared by "
          "all hosts?"
        )
      time.sleep(0.2)


def _check_nonempty(what: str, stats: dict[str, ShardStats]) -> None:
  for split, s in stats.items():
    if s.documents == 0:
      raise UserError(f"{what}: the {split} split has no documents")


def _tmp_near(final: Path) -> Path:
  """A new tmp folder in the deepest existing folder of final's path (see `build`)."""
  anchor = final.parent
  while not anchor.exists() and anchor != anchor.parent:
    anchor = anchor.parent
  tmp = anchor / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  tmp.mkdir()
  return tmp


def _write_atomic(path: Path, text: str) -> None:
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  tmp.write_text(text)
  os.replace(tmp, path)


# ------------------------------------------------------------------ reading


class TokenStream:
  """Several token files read as one sequence: len(), [start:stop] (copies only that range).

  Each file is (path, byte offset, count); memmaps are opened lazily and
  never pickled, so grain worker processes receive only the paths.
  """

  def __init__(self, files: list[tuple[str, int, int]], dtype, index_files: list[str] | None = None):
    self.files, self.dtype = [(str(p), int(o), int(c)) for p, o, c in files], np.dtype(dtype)
    self.index_files = index_files
    self.starts = np.concatenate([[0], np.cumsum([c for _, _, c in self.files], dtype=np.int64)])
    self._maps = None

  @classmethod
  def from_store(cls, directory: Path, split: str) -> TokenStream:
    header = json.loads((Path(directory) / "header.json").read_text())
    if header.get("format") != FORMAT:
      raise UserError(f"{directory}: token store format {header.get('format')} is not {FORMAT}")
    shards = header["splits"][split]["shards"]
    files = [(str(Path(directory) / f"{s['name']}.bin"), 0, s["tokens"]) for s in shards]
    return cls(files, header["dtype"], [str(Path(directory) / f"{s['name']}.idx") for s in shards])

  @classmethod
  def from_token_files(cls, token_files) -> TokenStream:
    """nanoGPT / llm.c files (formats.open_token_file) as one stream."""
    return cls([(tf.path, tf.offset, tf.count) for tf in token_files], "uint16")

  def __len__(self) -> int:
    return int(self.starts[-1])

  def _open(self):
    if self._maps is None:
      self._maps = [
        np.memmap(p, dtype=self.dtype, mode="r", offset=o, shape=(c,)) if c else np.zeros(0, self.dtype)
        for p, o, c in self.files
      ]
    return self._maps

  def __getitem__(self, key):
    if isinstance(key, slice):
      start, stop, step = key.indices(len(self))
      if step != 1:
        raise IndexError("TokenStream slices take step 1")
      return self.read(start, max(start, stop))
    i = int(key) + (len(self) if int(key) < 0 else 0)
    return self.read(i, i + 1)[0]

  def read(self, start: int, stop: int) -> np.ndarray:
    """Tokens [start, stop) as one array (a copy when the range spans shards)."""
    maps = self._open()
    first = int(np.searchsorted(self.starts, start, side="right")) - 1
    parts = []
    f = max(first, 0)
    while start < stop and f < len(maps):
      lo = start - int(self.starts[f])
      take = min(stop - start, len(maps[f]) - lo)
      parts.append(maps[f][lo : lo + take])
      start += take
      f += 1
    if len(parts) == 1:
      return parts[0]
    return np.concatenate(parts) if parts else np.zeros(0, self.dtype)

  def document_ends(self) -> np.ndarray:
    """Every document's end offset in the stream (int64), from the shards' .idx files."""
    if self.index_files is None:
      raise ValueError("this token stream has no document index")
    return np.concatenate(
      [np.fromfile(p, "<i8") + self.starts[i] for i, p in enumerate(self.index_files)] or [np.zeros(0, "<i8")]
    )

  def __getstate__(self):
    return {**self.__dict__, "_maps": None}

  def __repr__(self) -> str:
    return f"TokenStream({len(self.files)} files, {len(self)} tokens, {self.dtype.name})"

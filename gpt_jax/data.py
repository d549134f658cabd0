"""Documents -> tokens (cached once) -> packed windows -> per-host grain iterator.

Pipeline (documents from gpt_jax.data_sources):
1. Each split's documents are tokenised once, <|endoftext|> appended to each
   (GPT-2 §2: documents are concatenated with this separator), and stored as
   one .npy token stream per split in a cache directory
   <data_dir>/tokens/<source>-<hash>/ with a header.json that records the
   tokenizer fingerprint, the source and the counts. The cache is written in a
   tmp directory and renamed into place, so a crash never leaves a half cache
   that a later run would reuse; a cache made with another tokenizer is
   refused, never overwritten.
2. Windows of seq_len + 1 tokens with stride seq_len: window i is
   stream[i*T : i*T + T + 1], so consecutive windows share one boundary token
   and every token after the first is a prediction target exactly once per
   epoch; the tail that does not fill a window is dropped (training only).
3. Training: grain `MapDataset.source(windows).shuffle(seed).repeat()`, which
   draws a fresh permutation per epoch, then `[process_index::process_count]`
   so hosts read disjoint windows of the same global order, then batched. The
   iterator state is a few integers; restoring it continues the same stream.
4. Validation: the held-out stream cut the same way, including the last
   partial window, in order; rows past the end of the stream are padding, and
   every eval batch carries "mask" float32 [rows, seq_len] (1 = a real
   target), so the whole validation split can be scored exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
from absl import flags, logging
from ml_collections import config_flags

from gpt_jax import cli, data_sources, loader, paths
from gpt_jax import config as config_lib
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.data_sources import iter_documents  # noqa: F401  (part of this module's API)
from gpt_jax.errors import UserError

CACHE_FORMAT = 1
SPLITS = ("train", "validation")
_ENCODE_CHARS = 1 << 20  # characters per encode_batch call while tokenising


@dataclasses.dataclass(frozen=True)
class TokenCache:
  """A published token cache: one .npy stream per split plus header.json."""

  directory: Path
  header: dict

  def path(self, split: str) -> Path:
    return self.directory / f"{split}.npy"

  def tokens(self, split: str) -> np.ndarray:
    return np.load(self.path(split), mmap_mode="r")

  def num_tokens(self, split: str) -> int:
    return int(self.header["splits"][split]["tokens"])


def cache_dir(config, workdir: str) -> Path:
  """<data_dir>/tokens/<source>-<hash of the source description>."""
  data_dir = Path(data_sources.resolve_data_dir(config.data, workdir))
  desc = data_sources.describe(config.data, str(data_dir))
  return data_dir / "tokens" / f"{config.data.source}-{hashlib.sha256(desc.encode()).hexdigest()[:12]}"


def _token_dtype(vocab_size: int):
  return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def _tokenize_split(docs, tokenizer, out: Path, dtype) -> tuple[int, int]:
  """Streams docs into out (.npy); returns (documents, tokens)."""
  raw_path = out.with_suffix(".bin")
  n_docs = n_tokens = 0
  with open(raw_path, "wb") as raw:
    pending, chars = [], 0

    def flush():
      nonlocal n_docs, n_tokens
      for ids in tokenizer.encode_batch(pending):
        ids.append(tokenizer.eot_id)
        raw.write(np.asarray(ids, dtype=dtype).tobytes())
        n_tokens += len(ids)
      n_docs += len(pending)
      pending.clear()

    for doc in docs:
      pending.append(doc)
      chars += len(doc)
      if chars >= _ENCODE_CHARS:
        flush()
        chars = 0
        logging.info("tokenised %d documents, %d tokens -> %s", n_docs, n_tokens, out.name)
    flush()
  # The stream's length is known only now: write the .npy header, then copy.
  arr = np.lib.format.open_memmap(out, mode="w+", dtype=dtype, shape=(n_tokens,))
  step = 1 << 24
  with open(raw_path, "rb") as raw:
    for s in range(0, n_tokens, step):
      chunk = np.frombuffer(raw.read(step * arr.itemsize), dtype=dtype)
      arr[s : s + len(chunk)] = chunk
  arr.flush()
  del arr
  raw_path.unlink()
  return n_docs, n_tokens


def _check_header(directory: Path, header: dict, tokenizer) -> None:
  if header.get("format") != CACHE_FORMAT:
    raise UserError(
      f"{directory}: token cache format {header.get('format')} is not {CACHE_FORMAT}; delete it"
    )
  if header.get("tokenizer_fingerprint") != tokenizer.fingerprint:
    raise UserError(
      f"{directory}: token cache was made with another tokenizer (fingerprint "
      f"{str(header.get('tokenizer_fingerprint'))[:12]}..., this run's is {tokenizer.fingerprint[:12]}...); "
      "delete it or set config.data.data_dir elsewhere"
    )


def prepare_cache(config, tokenizer, workdir: str, *, process_index: int = 0) -> TokenCache:
  """The token cache of config.data for tokenizer, built once on first use.

  In a workdir on a shared filesystem process 0 builds it and the others wait.
  With a URL workdir (gs://...) no disk is assumed shared: the first process
  of each host to take the folder's lock builds it (racing hosts on a shared
  data.data_dir each publish a complete copy; one is kept).
  """
  directory = cache_dir(config, workdir)
  header_path = directory / "header.json"
  if not header_path.exists():
    if paths.is_url(workdir):  # No shared disk assumed: each host builds its own.
      with _host_lock(directory):
        if not header_path.exists():
          _build_cache(config, tokenizer, workdir, directory)
    elif process_index != 0:
      tokenizer_lib.wait_for(header_path, "the token cache")
    else:
      _build_cache(config, tokenizer, workdir, directory)
  header = json.loads(header_path.read_text())
  _check_header(directory, header, tokenizer)
  return TokenCache(directory, header)


def check_same_on_every_process(cache: TokenCache) -> None:
  """Every process must read the same token streams, or their window counts,
  and so their collectives, differ. Hosts of a bucket run each tokenise
  their own copy of the data: compare what they made (all processes raise)."""
  import jax
  from jax.experimental import multihost_utils

  if jax.process_count() == 1:
    return
  made = {"splits": cache.header["splits"], "tokenizer": cache.header["tokenizer_fingerprint"]}
  digest = hashlib.sha256(json.dumps(made, sort_keys=True).encode()).digest()[:16]
  every = np.asarray(multihost_utils.process_allgather(np.frombuffer(digest, np.int32)))
  differs = [p for p in range(len(every)) if not np.array_equal(every[p], every[0])]
  if differs:
    tokens = {split: v["tokens"] for split, v in made["splits"].items()}
    raise UserError(
      f"processes {differs} tokenised other data than process 0 (this is process {jax.process_index()}: "
      f"{tokens} tokens in {cache.directory}); every host must see the same data.* settings and files"
    )


@contextlib.contextmanager
def _host_lock(directory: Path):
  """An exclusive lock on `directory` among the processes of this host.

  Where the filesystem has no locks (some network mounts), every process
  goes ahead: each builds in its own tmp folder and publish_dir keeps one."""
  directory.parent.mkdir(parents=True, exist_ok=True)
  with open(directory.parent / f".{directory.name}.lock", "w") as f:
    locked = True
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      logging.info("waiting for another process on this host to build %s", directory)
      fcntl.flock(f, fcntl.LOCK_EX)
    except OSError as e:
      logging.warning("no file lock in %s (%s): building without one", directory.parent, e)
      locked = False
    try:
      yield
    finally:
      if locked:
        fcntl.flock(f, fcntl.LOCK_UN)


def _build_cache(config, tokenizer, workdir: str, directory: Path) -> None:
  data_dir = data_sources.resolve_data_dir(config.data, workdir)
  desc = data_sources.describe(config.data, data_dir)
  dtype = _token_dtype(tokenizer.vocab_size)
  tmp = tokenizer_lib.tmp_dir_for(directory)
  header = {
    "format": CACHE_FORMAT,
    "source": desc,
    "tokenizer_fingerprint": tokenizer.fingerprint,
    "tokenizer_vocab_size": tokenizer.vocab_size,
    "eot_id": tokenizer.eot_id,
    "dtype": np.dtype(dtype).name,
    "splits": {},
  }
  start = time.perf_counter()
  try:
    for split in SPLITS:
      docs = data_sources.iter_documents(config.data, split, data_dir=data_dir)
      n_docs, n_tokens = _tokenize_split(docs, tokenizer, tmp / f"{split}.npy", dtype)
      if n_docs == 0:
        raise UserError(f"{desc}: the {split} split has no documents")
      header["splits"][split] = {"documents": n_docs, "tokens": n_tokens}
    header["tokenize_seconds"] = round(time.perf_counter() - start, 2)
    (tmp / "header.json").write_text(json.dumps(header, indent=1) + "\n")
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  tokenizer_lib.publish_dir(tmp, directory)
  logging.info("token cache %s: %s", directory, header["splits"])


# --------------------------------------------------------------- windows


def num_windows(num_tokens: int, seq_len: int) -> int:
  """Full windows of seq_len + 1 tokens at stride seq_len in a stream."""
  return max(0, (num_tokens - 1) // seq_len)


class WindowSource:
  """grain random-access source: window i of a token stream, {"tokens", "index"}.

  The memmap is opened lazily and never pickled, so grain worker processes
  receive only the path.
  """

  def __init__(self, path: str, seq_len: int, count: int):
    self.path, self.seq_len, self.count = path, seq_len, count
    self._tokens = None

  def __len__(self) -> int:
    return self.count

  def __getitem__(self, i: int) -> dict:
    if self._tokens is None:
      self._tokens = np.load(self.path, mmap_mode="r")
    i = int(i)
    s = i * self.seq_len
    return {"tokens": self._tokens[s : s + self.seq_len + 1].astype(np.int32), "index": np.int64(i)}

  def __getstate__(self):
    return {**self.__dict__, "_tokens": None}

  def __repr__(self) -> str:
    return f"WindowSource({self.path}, seq_len={self.seq_len}, windows={self.count})"


def make_train_iterator(config, tokenizer, workdir: str, *, process_index: int, process_count: int):
  """This process's infinite grain iterator of training batches.

  Yields {"tokens": int32 [B, seq_len + 1], "index": int64 [B]} with
  B = train.batch_size // process_count; "index" is each row's window id.
  Checkpoint it with grain.checkpoint.CheckpointSave / CheckpointRestore (or
  get_state / set_state); the state can be restored only under the same
  data.num_workers.
  """
  seq_len = config_lib.seq_len(config)
  loader.rows_per_process(config.train.batch_size, process_count, "train.batch_size")
  cache = prepare_cache(config, tokenizer, workdir, process_index=process_index)
  n_tokens = cache.num_tokens("train")
  count = num_windows(n_tokens, seq_len)
  if count == 0:
    raise UserError(
      f"{cache.header['source']}: the training split has {n_tokens} tokens, fewer than one window of "
      f"seq_len + 1 = {seq_len + 1}"
    )
  source = WindowSource(str(cache.path("train")), seq_len, count)
  return loader.batches(
    source,
    batch_size=config.train.batch_size,
    seed=config.data.shuffle_seed,
    process_index=process_index,
    process_count=process_count,
    data_cfg=config.data,
  )


def make_eval_batches(
  config,
  tokenizer,
  workdir: str,
  *,
  process_index: int,
  process_count: int,
  batch_size: int,
  num_batches: int,
) -> list[dict]:
  """This process's share of the validation batches, the same list on every call.

  Global batch b holds validation windows [b * batch_size, (b + 1) * batch_size)
  in stream order (the last one may be partial: every validation token after
  the first is a target exactly once over all batches); this process gets
  rows [p * R, (p + 1) * R) of it, R = batch_size // process_count. Padding
  (past the stream's end) has mask 0, tokens <|endoftext|> and index -1.
  Each dict: "tokens" int32 [R, seq_len + 1], "index" int64 [R],
  "mask" float32 [R, seq_len]. num_batches 0 = all.
  """
  seq_len = config_lib.seq_len(config)
  rows = loader.rows_per_process(batch_size, process_count, "eval.batch_size")
  cache = prepare_cache(config, tokenizer, workdir, process_index=process_index)
  tokens = cache.tokens("validation")
  n = len(tokens)
  if n < 2:
    raise UserError(f"{cache.header['source']}: the validation split has {n} token(s), nothing to predict")
  count = math.ceil((n - 1) / seq_len)
  total = math.ceil(count / batch_size)
  if num_batches > 0:
    total = min(total, num_batches)
  batches = []
  for b in range(total):
    tok = np.full((rows, seq_len + 1), tokenizer.eot_id, np.int32)
    index = np.full((rows,), -1, np.int64)
    mask = np.zeros((rows, seq_len), np.float32)
    for r in range(rows):
      w = b * batch_size + process_index * rows + r
      if w >= count:
        break
      window = tokens[w * seq_len : w * seq_len + seq_len + 1]
      tok[r, : len(window)] = window
      index[r] = w
      mask[r, : len(window) - 1] = 1.0
    batches.append({"tokens": tok, "index": index, "mask": mask})
  return batches


def unigram_loss(config, tokenizer, workdir: str, *, process_index: int = 0) -> float:
  """Cross-entropy (nats/token) of the validation targets under a unigram model of the training tokens.

  p(v) = (count_train(v) + 1) / (N_train + V) (add-one smoothing over the
  tokenizer's V ids); the targets are the validation stream minus its first
  token, as scored by make_eval_batches with num_batches=0. A model that has
  learnt nothing beyond token frequencies sits at this loss.
  """
  cache = prepare_cache(config, tokenizer, workdir, process_index=process_index)
  vocab = tokenizer.vocab_size
  train_counts = np.zeros(vocab, np.int64)
  train = cache.tokens("train")
  step = 1 << 24
  for s in range(0, len(train), step):
    train_counts += np.bincount(train[s : s + step], minlength=vocab)
  log_p = np.log(train_counts + 1.0) - np.log(float(train_counts.sum() + vocab))
  targets = cache.tokens("validation")[1:]
  val_counts = np.bincount(targets, minlength=vocab)
  return float(-(val_counts * log_p).sum() / max(len(targets), 1))


# ------------------------------------------------------------------- CLI

_CONFIG = None


def main(argv):
  del argv
  config = config_lib.validate(_CONFIG.value)
  workdir = flags.FLAGS.workdir
  start = time.perf_counter()
  tok = tokenizer_lib.for_run(config, workdir, process_index=0)
  print(f"tokenizer: {tok.kind}, {tok.vocab_size} ids ({time.perf_counter() - start:.1f} s)")
  start = time.perf_counter()
  cache = prepare_cache(config, tok, workdir)
  print(f"cache: {cache.directory} ({time.perf_counter() - start:.1f} s)")
  print(f"source: {cache.header['source']}")
  seq_len = config_lib.seq_len(config)
  for split in SPLITS:
    s = cache.header["splits"][split]
    print(
      f"{split}: {s['documents']} documents, {s['tokens']} tokens, "
      f"{num_windows(s['tokens'], seq_len)} windows of {seq_len} + 1"
    )
  print(f"unigram validation loss: {unigram_loss(config, tok, workdir):.4f} nats/token")


if __name__ == "__main__":
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/base.py", "Training configuration file.")
  flags.DEFINE_string("workdir", None, "Run directory (tokenizer and, by default, the data cache).")
  flags.mark_flag_as_required("workdir")
  cli.run(main)

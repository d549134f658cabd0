"""Documents -> token cache (built once, with every core) -> packed windows -> the global batch order.

Pipeline (documents and mixtures from gpt_jax.data_sources):
1. Each source's documents are tokenised once, <|endoftext|> appended to each
   (GPT-2 §2: documents are concatenated with this separator), into a token
   store (gpt_jax/token_store.py, format 2): raw shards of both splits written
   in one pass by a thread pool, memory bounded by the chunk size, under
   <data_dir>/tokens/<source>-<hash>/ with a header.json that records the
   tokenizer fingerprint, the source and the counts. It is published by one
   rename, so a crash never leaves a half cache that a later run would reuse;
   a cache made with another tokenizer is refused, never overwritten. With
   several processes on a shared disk each tokenises its share of the
   documents into its own shard. A cache of the old format (one .npy per
   split) sits under another name and is simply not used: the new one is
   built beside it.
   Pre-tokenised GPT-2 files (nanoGPT / llm.c .bin) are the token cache as they are.
2. Windows of seq_len + 1 tokens with stride seq_len: window i is
   stream[i*T : i*T + T + 1], so consecutive windows share one boundary token
   and every token after the first is a prediction target exactly once per
   epoch; the tail that does not fill a window is dropped (training only).
3. Training: loader.ElasticIterator over every source's windows, mixed by
   weight; the global batch at step s is the same windows for any process
   count, and the iterator's state is a global position (one JSON).
4. Validation: each source's held-out stream cut the same way, including the
   last partial window, in order; rows past the end of the stream are padding,
   and every eval batch carries "mask" float32 [rows, seq_len] (1 = a real
   target), so the whole validation split can be scored exactly.
5. Document masking (data.document_mask): `segments` gives each window's
   segment ids and positions from its tokens, on device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from ml_collections import config_flags

from gpt_jax import cli, data_bench, data_sources, loader, paths, token_store
from gpt_jax import config as config_lib
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.data_sources import iter_documents  # noqa: F401  (part of this module's API)
from gpt_jax.errors import UserError

CACHE_FORMAT = token_store.FORMAT
SPLITS = ("train", "validation")


@dataclasses.dataclass(frozen=True)
class TokenCache:
  """A source's token streams: a published token store, or token files used as they are (directory None)."""

  directory: Path | None
  header: dict
  streams: dict  # split -> token_store.TokenStream

  def tokens(self, split: str) -> token_store.TokenStream:
    return self.streams[split]

  def num_tokens(self, split: str) -> int:
    return int(self.header["splits"][split]["tokens"])

  @property
  def source(self) -> str:
    return self.header["source"]


def cache_dir(data_cfg, workdir: str) -> Path:
  """<data_dir>/tokens/<source>-<hash of the cache format and the source description>."""
  data_dir = Path(data_sources.resolve_data_dir(data_cfg, workdir))
  key = f"format {CACHE_FORMAT}; {data_sources.describe(data_cfg)}"
  return data_dir / "tokens" / f"{data_cfg.source}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


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


@functools.cache
def _gpt2_fingerprint() -> str:
  return tokenizer_lib.gpt2().fingerprint


def _token_file_cache(data_cfg, tokenizer, files: dict) -> TokenCache:
  if tokenizer.fingerprint != _gpt2_fingerprint():
    raise UserError(
      f"data.paths={data_cfg.paths!r}: token files hold GPT-2 BPE ids, but this run's tokenizer is "
      f"{tokenizer.kind!r} with {tokenizer.vocab_size} ids; set data.tokenizer='gpt2' (the original files)"
    )
  streams = {split: token_store.TokenStream.from_token_files(fs) for split, fs in files.items()}
  header = {
    "format": CACHE_FORMAT,
    "source": data_sources.describe(data_cfg),
    "tokenizer_fingerprint": tokenizer.fingerprint,
    "eot_id": tokenizer.eot_id,
    "dtype": "uint16",
    "splits": {
      split: {"documents": sum(f.documents for f in fs), "tokens": len(streams[split]), "files": len(fs)}
      for split, fs in files.items()
    },
  }
  return TokenCache(None, header, streams)


def prepare_cache(
  data_cfg,
  tokenizer,
  workdir: str,
  *,
  process_index: int = 0,
  process_count: int = 1,
  min_train_tokens: int = 0,
):
  """The TokenCache of one source (a data.* section) for tokenizer, built once on first use.

  A new cache whose training split has fewer than min_train_tokens tokens
  (one window) is refused before it is published.

  In a workdir on a shared filesystem the processes split the documents and
  each tokenises its share into a shard (files cut by data.max_documents,
  counted from the first file, are built by process 0 alone). With a URL workdir (gs://...) no disk is
  assumed shared: the first process of each host to take the folder's lock
  builds the whole cache (racing hosts on a shared data.data_dir each
  publish a complete copy; one is kept).
  """
  files = data_sources.token_files(data_cfg)
  if files is not None:
    return _token_file_cache(data_cfg, tokenizer, files)
  directory = cache_dir(data_cfg, workdir)
  header_path = directory / "header.json"
  if not header_path.exists():
    if paths.is_url(workdir):  # No shared disk assumed: each host builds its own.
      with _host_lock(directory):
        if not header_path.exists():
          _build_cache(data_cfg, tokenizer, directory, min_train_tokens)
    elif process_count > 1 and not (data_cfg.source == "files" and data_cfg.max_documents):
      _build_cache(
        data_cfg, tokenizer, directory, min_train_tokens, host=process_index, num_hosts=process_count
      )
    elif process_index != 0:
      tokenizer_lib.wait_for(header_path, "the token cache")
    else:
      _build_cache(data_cfg, tokenizer, directory, min_train_tokens)
  header = json.loads(header_path.read_text())
  _check_header(directory, header, tokenizer)
  streams = {split: token_store.TokenStream.from_store(directory, split) for split in SPLITS}
  return TokenCache(directory, header, streams)


def _build_cache(
  data_cfg,
  tokenizer,
  directory: Path,
  min_train_tokens: int = 0,
  *,
  host: int = 0,
  num_hosts: int = 1,
  **write_kw,
) -> dict:
  desc = data_sources.describe(data_cfg)

  def accept(stats):
    if stats["train"].tokens < min_train_tokens:
      raise UserError(_too_short(desc, stats["train"].tokens, min_train_tokens))

  header = token_store.build(
    directory,
    lambda h, n: data_sources.labelled_documents(data_cfg, h, n),
    tokenizer,
    SPLITS,
    host=host,
    num_hosts=num_hosts,
    meta={"source": desc},
    accept=accept,
    total_bytes=data_sources.estimated_text_bytes(data_cfg, host, num_hosts),
    desc=f"tokenising {data_cfg.source}",
    **write_kw,
  )
  logging.info("token cache %s: %s", directory, {s: v["tokens"] for s, v in header["splits"].items()})
  return header


def check_same_on_every_process(caches) -> None:
  """Every process must read the same token streams, or their window counts,
  and so their collectives, differ. Hosts of a bucket run each tokenise
  their own copy of the data: compare what they made (all processes raise)."""
  from jax.experimental import multihost_utils

  if jax.process_count() == 1:
    return
  made = [{"splits": c.header["splits"], "tokenizer": c.header["tokenizer_fingerprint"]} for c in caches]
  digest = hashlib.sha256(json.dumps(made, sort_keys=True).encode()).digest()[:16]
  every = np.asarray(multihost_utils.process_allgather(np.frombuffer(digest, np.int32)))
  differs = [p for p in range(len(every)) if not np.array_equal(every[p], every[0])]
  if differs:
    tokens = [{split: v["tokens"] for split, v in m["splits"].items()} for m in made]
    raise UserError(
      f"processes {differs} tokenised other data than process 0 (this is process {jax.process_index()}: "
      f"{tokens} tokens); every host must see the same data.* settings and files"
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


# --------------------------------------------------------------- windows


def num_windows(num_tokens: int, seq_len: int) -> int:
  """Full windows of seq_len + 1 tokens at stride seq_len in a stream."""
  return max(0, (num_tokens - 1) // seq_len)


class StreamWindows:
  """grain random-access source: window i = stream[i*T : i*T + T + 1] of a token stream.

  Items: {"tokens" int32 [T+1], "index" int64 (the window), "source" int32
  (the source's position in the mixture)}. The stream (a TokenStream) opens
  its memmaps lazily and never pickles them, so grain worker processes
  receive only paths.
  """

  def __init__(self, stream, seq_len: int, source_id: int = 0):
    self.stream, self.seq_len, self.source_id = stream, seq_len, source_id
    self.count = num_windows(len(stream), seq_len)

  def __len__(self) -> int:
    return self.count

  def __getitem__(self, i: int) -> dict:
    i = int(i)
    s = i * self.seq_len
    return {
      "tokens": np.asarray(self.stream[s : s + self.seq_len + 1], np.int32),
      "index": np.int64(i),
      "source": np.int32(self.source_id),
    }

  def __repr__(self) -> str:
    return f"StreamWindows({self.stream}, seq_len={self.seq_len}, windows={self.count})"


def sources(config) -> list[data_sources.Source]:
  """The training sources of config.data (a mixture's entries, or data.* itself)."""
  return data_sources.sources(config.data)


def _too_short(source: str, tokens: int, window: int) -> str:
  return f"{source}: the training split has {tokens} tokens, fewer than one window of seq_len + 1 = {window}"


def _caches(config, tokenizer, workdir: str, process_index: int, process_count: int):
  window = config_lib.seq_len(config) + 1
  return [
    (
      s,
      prepare_cache(
        s.data,
        tokenizer,
        workdir,
        process_index=process_index,
        process_count=process_count,
        min_train_tokens=window,
      ),
    )
    for s in data_sources.sources(config.data)
  ]


def make_train_iterator(config, tokenizer, workdir: str, *, process_index: int, process_count: int):
  """This process's infinite iterator of training batches (a loader.ElasticIterator).

  Yields {"tokens": int32 [B, seq_len + 1], "index": int64 [B] (each row's
  window in its source), "source": int32 [B] (its source's position among
  data_sources.sources)} with B = train.batch_size // process_count.
  Checkpoint it with get_state / set_state (JSON, the same on every
  process); the state restores under any process count and data.num_workers.
  """
  seq_len = config_lib.seq_len(config)
  loader.rows_per_process(config.train.batch_size, process_count, "train.batch_size")
  sources = []
  for k, (s, cache) in enumerate(_caches(config, tokenizer, workdir, process_index, process_count)):
    windows = StreamWindows(cache.tokens("train"), seq_len, k)
    if len(windows) == 0:
      raise UserError(_too_short(cache.source, len(cache.tokens("train")), seq_len + 1))
    sources.append(loader.Source(s.name, windows, s.weight))
  return loader.ElasticIterator(
    sources,
    seed=config.data.shuffle_seed,
    global_batch=config.train.batch_size,
    process_index=process_index,
    process_count=process_count,
    num_workers=config.data.num_workers,
    prefetch=config.data.prefetch,
    key={"seq_len": seq_len},
  )


def eval_batches(tokens, seq_len: int, eot_id: int, *, process_index, process_count, batch_size, num_batches):
  """This process's share of the validation batches of one token stream (see make_eval_batches)."""
  rows = loader.rows_per_process(batch_size, process_count, "eval.batch_size")
  n = len(tokens)
  count = math.ceil((n - 1) / seq_len)
  total = math.ceil(count / batch_size)
  if num_batches > 0:
    total = min(total, num_batches)
  batches = []
  for b in range(total):
    tok = np.full((rows, seq_len + 1), eot_id, np.int32)
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


def make_eval_batches(
  config,
  tokenizer,
  workdir: str,
  *,
  process_index: int,
  process_count: int,
  batch_size: int,
  num_batches: int,
) -> dict[str, list[dict]]:
  """{source name: this process's share of its validation batches}, the same on every call.

  Global batch b holds validation windows [b * batch_size, (b + 1) * batch_size)
  in stream order (the last one may be partial: every validation token after
  the first is a target exactly once over all batches); this process gets
  rows [p * R, (p + 1) * R) of it, R = batch_size // process_count. Padding
  (past the stream's end) has mask 0, tokens <|endoftext|> and index -1.
  Each dict: "tokens" int32 [R, seq_len + 1], "index" int64 [R],
  "mask" float32 [R, seq_len]. num_batches 0 = all.
  """
  seq_len = config_lib.seq_len(config)
  out = {}
  for s, cache in _caches(config, tokenizer, workdir, process_index, process_count):
    tokens = cache.tokens("validation")
    if len(tokens) < 2:
      raise UserError(f"{cache.source}: the validation split has {len(tokens)} token(s), nothing to predict")
    out[s.name] = eval_batches(
      tokens,
      seq_len,
      tokenizer.eot_id,
      process_index=process_index,
      process_count=process_count,
      batch_size=batch_size,
      num_batches=num_batches,
    )
  return out


def unigram_loss(data_cfg, tokenizer, workdir: str, *, process_index: int = 0) -> float:
  """Cross-entropy (nats/token) of a source's validation targets under a unigram model of its training set.

  p(v) = (count_train(v) + 1) / (N_train + V) (add-one smoothing over the
  tokenizer's V ids); the targets are the validation stream minus its first
  token, as scored by make_eval_batches with num_batches=0. A model that has
  learnt nothing beyond token frequencies sits at this loss.
  """
  cache = prepare_cache(data_cfg, tokenizer, workdir, process_index=process_index)
  vocab = tokenizer.vocab_size

  def counts(stream, start=0):
    total, step = np.zeros(vocab, np.int64), 1 << 24
    for s in range(start, len(stream), step):
      total += np.bincount(stream[s : s + step], minlength=vocab)
    return total

  train_counts = counts(cache.tokens("train"))
  log_p = np.log(train_counts + 1.0) - np.log(float(train_counts.sum() + vocab))
  val_counts = counts(cache.tokens("validation"), start=1)
  return float(-(val_counts * log_p).sum() / max(val_counts.sum(), 1))


# ------------------------------------------------------ document masking


def segments(tokens_BT, eot_id: int):
  """(segment ids, positions) int32 [B, T] of inputs whose documents are separated by <|endoftext|>.

  An <|endoftext|> starts a segment: it is the first input of the next
  document (where llm.c places it; this cache and nanoGPT put it after each
  document, which is the same stream). So the last token of a document still
  predicts <|endoftext|> from its own document, the token after it is
  predicted from <|endoftext|> alone (an unconditional start), and no target
  is predicted across a boundary. Positions restart at 0 at each
  <|endoftext|>; the window's first, cut document counts from the window
  start. encode_ordinary never emits the <|endoftext|> id inside a document,
  so the tokens alone say where documents end.
  """
  is_eot_BT = tokens_BT == eot_id
  t_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[-1], dtype=jnp.int32), tokens_BT.shape)
  segment_BT = jnp.cumsum(is_eot_BT, axis=-1, dtype=jnp.int32)
  last_eot_BT = jax.lax.cummax(jnp.where(is_eot_BT, t_BT, 0), axis=tokens_BT.ndim - 1)
  return segment_BT, t_BT - last_eot_BT


# ------------------------------------------------------------------- CLI

_CONFIG = None


def _describe(config, workdir: str) -> None:
  start = time.perf_counter()
  tok = tokenizer_lib.for_run(config, workdir, process_index=0)
  print(f"tokenizer: {tok.kind}, {tok.vocab_size} ids ({time.perf_counter() - start:.1f} s)")
  seq_len = config_lib.seq_len(config)
  for s in data_sources.sources(config.data):
    start = time.perf_counter()
    cache = prepare_cache(s.data, tok, workdir)
    name = f"{s.name} (weight {s.weight:g}) " if config.data.mixture else ""
    print(f"{name}cache: {cache.directory or 'token files'} ({time.perf_counter() - start:.1f} s)")
    print(f"source: {cache.source}")
    for split in SPLITS:
      n = cache.header["splits"][split]
      print(
        f"{split}: {n['documents']} documents, {n['tokens']} tokens, "
        f"{num_windows(n['tokens'], seq_len)} windows of {seq_len} + 1"
      )
    print(f"unigram validation loss: {unigram_loss(s.data, tok, workdir):.4f} nats/token")


def _bench(config, workdir: str, f) -> dict:
  """Builds every source's cache in a fresh data_dir, then times the real training iterator."""
  out = {"sources": {}, "load_average_before": data_bench.load_average()}
  with config.unlocked():
    config.data.data_dir = str(Path(workdir) / "bench_data")
  tok = tokenizer_lib.for_run(config, workdir, process_index=0)
  cores = f.bench_threads or token_store.available_cores()
  print(f"load average: {out['load_average_before']}; {cores} encoding threads")
  for s in data_sources.sources(config.data):
    if data_sources.token_files(s.data) is not None:
      print(f"{s.name}: token files, nothing to build")
      continue
    texts = data_bench.sample(text for _, text in data_sources.labelled_documents(s.data))
    build = functools.partial(_build_cache, s.data, tok, cache_dir(s.data, workdir), threads=cores)
    r = data_bench.time_build(build, tok, texts, cores)
    r["peak_rss_GiB"] = data_bench.peak_rss_bytes() / 2**30  # the builds so far, before any window is read
    out["sources"][s.name] = r
    print("\n".join(data_bench.build_lines(s.name, r)))
  it = make_train_iterator(config, tok, workdir, process_index=0, process_count=1)
  try:
    out["iterator"] = data_bench.time_iterator(it, f.bench_batches)
  finally:
    it.close()
  print("\n".join(data_bench.iterator_lines(out["iterator"], f.train_tokens_per_s)))
  out["iterator"]["vs_training"] = out["iterator"]["tokens_per_s"] / f.train_tokens_per_s
  out["peak_rss_GiB"] = data_bench.peak_rss_bytes() / 2**30
  out["rss_after_iterator_GiB"] = data_bench.rss_now()
  out["load_average_after"] = data_bench.load_average()
  now = out["rss_after_iterator_GiB"]
  split = f" (now {now['anon']:.2f} GiB allocated + {now['file']:.2f} GiB of mapped files)" if now else ""
  print(f"peak RSS: {out['peak_rss_GiB']:.2f} GiB{split}; load average: {out['load_average_after']}")
  return out


def main(argv):
  f = flags.FLAGS
  config = config_lib.validate(_CONFIG.value)
  if f.json_out and not Path(f.json_out).absolute().parent.is_dir():
    raise UserError(f"--json_out={f.json_out}: folder {Path(f.json_out).absolute().parent} does not exist")
  if not f.bench:
    if not f.workdir:
      raise UserError("--workdir: give the run directory (tokenizer and, by default, the data cache)")
    _describe(config, f.workdir)
    return
  with contextlib.ExitStack() as stack:
    workdir = f.workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="gpt_jax_data_bench_"))
    try:
      out = _bench(config, workdir, f)
    finally:
      shutil.rmtree(Path(workdir) / "bench_data", ignore_errors=True)
  out["command"] = " ".join(["python -m gpt_jax.data", *argv[1:]])
  if f.json_out:
    Path(f.json_out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/base.py", "Training configuration file.")
  flags.DEFINE_string("workdir", None, "Run directory (tokenizer and, by default, the data cache).")
  flags.DEFINE_bool(
    "bench", False, "Time building every source's cache (in a fresh folder) and the iterator."
  )
  flags.DEFINE_integer("bench_threads", 0, "--bench: encoding threads (0 = the cores this process may use).")
  flags.DEFINE_integer("bench_batches", 300, "--bench: training batches to time.")
  flags.DEFINE_float(
    "train_tokens_per_s",
    10_279.0,
    "--bench: training speed to compare the iterator with (the default job's, README).",
  )
  flags.DEFINE_string("json_out", "", "--bench: also write every figure to this JSON file.")
  cli.run(main)

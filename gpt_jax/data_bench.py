"""Measurements for `python -m gpt_jax.data --bench`: cache building against tiktoken's single-thread
speed in the same run, the training iterator's batches/s, peak RSS.

Why the build is compared in two ways (both printed):
- tokens/s of the build against cores x tiktoken's single-thread tokens/s,
  measured just before and just after the build on a sample of the same
  documents (a shared machine's load drifts): the speed-up the cores give;
- tokens per CPU-second of the build against one thread's: the share of the
  build's CPU time that is tokenising. It does not depend on how many cores
  the scheduler gave the run, so it is what a busy machine can still show.
tiktoken encodes with the GIL released (0.14, src/py.rs: py.detach), so the
build's threads run in parallel; reading and decoding (JSON, zstd, parquet)
stay on the calling thread.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterable

SAMPLE_BYTES = 16 << 20  # text for the single-thread measurement: seconds of work, not minutes


def peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def rss_now() -> dict[str, float]:
  """GiB resident now: "anon" (allocated by the process) and "file" (mapped files' pages, e.g. the
  memory-mapped token store's page cache: shared, clean, dropped first under memory pressure). Linux."""
  out = {}
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(("RssAnon:", "RssFile:")):
          out[line[3:7].lower()] = int(line.split()[1]) / 2**20  # kB
  except OSError:
    pass
  return out


def cpu_seconds() -> float:
  t = os.times()
  return t.user + t.system


def load_average() -> str:
  return " ".join(f"{x:.2f}" for x in os.getloadavg())


def sample(texts: Iterable[str], size: int = SAMPLE_BYTES) -> list[str]:
  """The first `size` characters of a document stream, whole documents but the last."""
  out, total = [], 0
  for text in texts:
    out.append(text[: size - total])
    total += len(out[-1])
    if total >= size:
      break
  return out


def single_thread(tokenizer, texts: list[str]) -> tuple[float, float]:
  """(tokens per wall second, tokens per CPU second of this thread) of encode_ordinary, per document."""
  start, cpu = time.perf_counter(), time.thread_time()
  n = sum(len(tokenizer.encode(t)) for t in texts)
  return n / (time.perf_counter() - start), n / max(time.thread_time() - cpu, 1e-9)


def time_build(build, tokenizer, texts: list[str], cores: int) -> dict:
  """Runs build() -> token store header (one split or two) between two single-thread measurements."""
  before = single_thread(tokenizer, texts)
  cpu0, start = cpu_seconds(), time.perf_counter()
  header = build()
  seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu0
  after = single_thread(tokenizer, texts)
  shards = [sh for split in header["splits"].values() for sh in split["shards"]]
  documents, tokens = sum(s["documents"] for s in shards), sum(s["tokens"] for s in shards)
  text_bytes = sum(s["text_bytes"] for s in shards)
  single, single_cpu = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
  return {
    "documents": documents,
    "tokens": tokens,
    "text_MB": text_bytes / 1e6,
    "seconds": seconds,
    "documents_per_s": documents / seconds,
    "MB_per_s": text_bytes / 1e6 / seconds,
    "tokens_per_s": tokens / seconds,
    "cpu_s": cpu,
    "cores_busy": cpu / seconds,
    "single_thread_tokens_per_s": single,
    "single_thread_spread": abs(before[0] - after[0]) / single,
    "single_thread_tokens_per_cpu_s": single_cpu,
    "cores": cores,
    "vs_cores_x_single": tokens / seconds / (cores * single),
    "tokens_per_cpu_s": tokens / max(cpu, 1e-9),
    "cpu_efficiency": tokens / max(cpu, 1e-9) / single_cpu,
  }


def time_iterator(it, steps: int, warmup: int = 10) -> dict:
  """Batches/s of a training iterator after `warmup` batches (the read-ahead fills, workers start)."""
  for _ in range(warmup):
    batch = next(it)
  start = time.perf_counter()
  for _ in range(steps):
    batch = next(it)
  seconds = time.perf_counter() - start
  rows, width = batch["tokens"].shape
  return {
    "batches_per_s": steps / seconds,
    "tokens_per_s": steps * rows * (width - 1) / seconds,
    "shape": [rows, width],
  }


def build_lines(name: str, r: dict) -> list[str]:
  return [
    f"{name}: {r['documents']:,} documents, {r['text_MB']:,.1f} MB of text, {r['tokens']:,} tokens",
    f"  cache build: {r['seconds']:.1f} s, {r['documents_per_s']:,.0f} documents/s, "
    f"{r['MB_per_s']:.2f} MB/s, {r['tokens_per_s'] / 1e6:.3f}M tokens/s, "
    f"{r['cores_busy']:.2f} cores busy on average",
    f"  tiktoken single thread (same run, mean of before/after, spread "
    f"{100 * r['single_thread_spread']:.0f}%): {r['single_thread_tokens_per_s'] / 1e6:.3f}M tokens/s, "
    f"{r['single_thread_tokens_per_cpu_s'] / 1e6:.3f}M tokens per CPU-second",
    f"  build / ({r['cores']} cores x single thread): {r['vs_cores_x_single']:.2f}; tokens per CPU-second: "
    f"{r['tokens_per_cpu_s'] / 1e6:.3f}M, build / single thread: {r['cpu_efficiency']:.2f}",
    f"  peak RSS so far: {r['peak_rss_GiB']:.2f} GiB",
  ]


def iterator_lines(r: dict, train_tokens_per_s: float) -> list[str]:
  return [
    f"iterator: {r['batches_per_s']:.1f} batches/s of {r['shape'][0]} x {r['shape'][1]}, "
    f"{r['tokens_per_s'] / 1e6:.2f}M tokens/s = {r['tokens_per_s'] / train_tokens_per_s:,.0f}x "
    f"{train_tokens_per_s:,.0f} tokens/s of training"
  ]

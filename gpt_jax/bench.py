"""Benchmarks: how close a run is to the hardware's limit, and to the tools people use instead.

  python -m gpt_jax.bench train --config=configs/gpt2_small.py --config.model.num_layers=6 \
      --config.model.dtype=float32 --config.train.batch_size=4 --config.train.seq_len=256 --compare=hf_torch
  python -m gpt_jax.bench sample --config=configs/gpt2_small.py --config.model.num_layers=6 --compare=hf_torch
  python -m gpt_jax.bench sample --workdir=BIG --draft=SMALL --compare=hf_torch   # gpt_jax.bench_decode
  python -m gpt_jax.bench sample --workdir=RUN --weights=float32,bfloat16,int8

`train` compiles the real train step (pretrain.train_program: train.build,
the shardings, donation and accumulation of train.run) on all devices, warms
up, then times steps one by one with block_until_ready: tokens/s, step time
(median and spread), MFU by the PaLM formula against the device's peak
(accelerators: config.log.peak_flops or the known bf16 peak) or, on CPU, a
float32 matmul peak measured in the same run, and peak memory.
`--compare=hf_torch` times transformers' GPT2LMHeadModel (forward, backward,
clipping, AdamW) at the same shape, dtype, batch and thread count in the
same process, in alternating rounds so both see the same machine load, and
prints the ratio. `sample` times KV-cache decoding against transformers'
`generate` (benchmark_generate), also as a fraction of the
memory read bandwidth measured in the same run (decoding streams every
weight once per step), with peak memory. Everything printed is also
written as JSON with --json_out.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import sys
import tempfile
import time

import jax
import numpy as np
from absl import flags, logging
from ml_collections import config_flags

from gpt_jax import bench_decode, cli, hf, metrics, pretrain, sample, sharding, train
from gpt_jax import config as config_lib
from gpt_jax import model as model_lib
from gpt_jax.errors import UserError


def _stats(seconds: list[float]) -> dict:
  s = np.asarray(seconds)
  return {
    "median_s": float(np.median(s)),
    "min_s": float(s.min()),
    "p90_s": float(np.percentile(s, 90)),
    # Spread: interquartile range relative to the median.
    "iqr_pct": float(100 * (np.percentile(s, 75) - np.percentile(s, 25)) / np.median(s)),
    "steps": len(seconds),
  }


def _peak_memory(torch_part: str = "") -> tuple[float, str]:
  """Peak memory and what it counts; `torch_part` names what torch holds in this
  process, which a process-wide figure includes (a device's figure does not)."""

  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return float(stats["peak_bytes_in_use"]), "device peak_bytes_in_use (device 0)"
  # CPU: the process's peak resident set (params, optimiser state, temporaries, Python).
  source = "process peak RSS"
  if torch_part:
    source += f", including torch with {torch_part}"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0, source


# ------------------------------------------------------------ arguments


def _check_int(flag: str, value, minimum: int, note: str = ""):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise UserError(f"--{flag}={value!r}: must be an integer >= {minimum}{note}")


def _check_compare(compare: str):
  if compare not in ("", "hf_torch"):
    raise UserError(f"--compare={compare!r}: only 'hf_torch' is supported")


def check_train_args(*, steps: int, warmup: int, rounds: int, compare: str, threads: int):
  """Rejects bad `train` arguments before anything is built or compiled."""
  _check_compare(compare)
  _check_int("warmup", warmup, 0)
  _check_int("rounds", rounds, 1)
  _check_int("steps", steps, 1, " (timed steps in all, split over --rounds)")
  if steps < rounds:
    raise UserError(
      f"--steps={steps} is fewer than --rounds={rounds}: the timed steps are split over the rounds, "
      "at least one each"
    )
  _check_int("threads", threads, 0, " (0 = all CPU cores)")


def check_sample_args(
  config, *, compare: str, threads: int, batch_sizes, prompt_len: int, max_new_tokens: int, rounds: int
):
  """Rejects bad `sample` arguments before anything is built or compiled."""
  _check_compare(compare)
  _check_int("threads", threads, 0, " (0 = all CPU cores)")
  _check_int("rounds", rounds, 1)
  _check_int("prompt_len", prompt_len, 1)
  _check_int("max_new_tokens", max_new_tokens, 1)
  sizes = list(batch_sizes)
  if not sizes:
    raise UserError("--batch_sizes: give at least one batch size")
  for b in sizes:
    _check_int("batch_sizes", b, 1, " (each batch size)")
  if len(set(sizes)) != len(sizes):
    raise UserError(f"--batch_sizes={','.join(map(str, sizes))}: a batch size is repeated")
  block = config.model.block_size
  if prompt_len + max_new_tokens > block:
    raise UserError(
      f"--prompt_len={prompt_len} + --max_new_tokens={max_new_tokens} must be <= "
      f"model.block_size={block} (the whole sequence must fit)"
    )


def parse_batch_sizes(values) -> list[int]:
  try:
    return [int(v) for v in values]
  except ValueError:
    raise UserError(f"--batch_sizes={','.join(values)}: must be positive integers, comma-separated") from None


def check_json_out(path: str):
  """The file --json_out names must be writable: checked before the benchmark runs."""
  if os.path.isdir(path):
    raise UserError(f"--json_out={path}: is a directory, not a file")
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(parent):
    raise UserError(f"--json_out={path}: folder {parent} does not exist")
  if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
    raise UserError(f"--json_out={path}: not writable")


# ------------------------------------------------------------------ ours


class _JaxTrainer:
  """The compiled train step on real (random) parameters and a fixed random batch."""

  def __init__(self, config):

    mesh = sharding.make_mesh(config.mesh)
    with sharding.activate(mesh, sharding.rules(config)):
      program, batch, task = pretrain.train_program(config, mesh)
      abstract = program.abstract
      start = time.perf_counter()
      self.step = program.step.lower(abstract, batch).compile()
      self.compile_seconds = time.perf_counter() - start
      self.state = train.init_state(task, program.tx, program.shardings, config.train.seed)
    rng = np.random.default_rng(0)
    shape = batch["tokens"].shape
    tokens = rng.integers(0, config.model.vocab_size, shape, dtype=np.int32)
    self.batch = {"tokens": jax.device_put(tokens, batch["tokens"].sharding)}
    self.num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
    self.first_loss = self.last_loss = None

  def run(self, n: int) -> list[float]:
    times, out = [], None
    for _ in range(n):
      t = time.perf_counter()
      self.state, out = self.step(self.state, self.batch)
      jax.block_until_ready((self.state, out))
      times.append(time.perf_counter() - t)
    if out is not None:  # n = 0 (no warm-up) runs nothing.
      self.last_loss = float(out["loss"])
      if self.first_loss is None:
        self.first_loss = self.last_loss
    return times


# ------------------------------------------------------------ reference


def reference_differences(model_cfg, platform: str) -> list[str]:
  """How transformers' GPT2LMHeadModel, run by --compare=hf_torch, differs from this model and device."""
  out = []
  if model_cfg.norm_position == "post":
    out.append("this model is post-LN (GPT-1), transformers' GPT-2 pre-LN")
  if any(w is not None for w in model_lib.layer_windows(model_cfg)):
    out.append("this model has locally banded layers, transformers' GPT-2 attends densely")
  rows = model_lib.padded_vocab_size(model_cfg)
  if rows != model_cfg.vocab_size:
    out.append(f"this model's embedding has {rows} rows (vocab padded), transformers' {model_cfg.vocab_size}")
  return out + _device_difference(platform)


def _device_difference(platform: str) -> list[str]:
  return (
    []
    if platform == "cpu"
    else [f"transformers runs on this host's CPU (CPU torch), this model on {platform}"]
  )


class _TorchTrainer:
  """transformers GPT2LMHeadModel doing the same work: forward, backward, clip, AdamW."""

  def __init__(self, config, threads: int):
    import torch
    import transformers

    m, o = config.model, config.optim
    torch.manual_seed(config.train.seed)
    torch.set_num_threads(threads)
    hf_cfg = transformers.GPT2Config(
      vocab_size=m.vocab_size,
      n_positions=m.block_size,
      n_embd=m.d_model,
      n_layer=m.num_layers,
      n_head=m.num_heads,
      n_inner=m.mlp_ratio * m.d_model,
      activation_function="gelu_new" if m.activation == "gelu_tanh" else "gelu",
      resid_pdrop=m.resid_dropout,
      embd_pdrop=m.embd_dropout,
      attn_pdrop=m.attn_dropout,
      layer_norm_epsilon=m.layer_norm_epsilon,
    )
    self.torch = torch
    self.model = transformers.GPT2LMHeadModel(hf_cfg).train()
    self.opt = torch.optim.AdamW(
      self.model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay
    )
    self.clip = o.grad_clip
    # bfloat16 compute with float32 parameters, as our dtype / param_dtype split.
    self.autocast = m.dtype == "bfloat16"
    seq = config_lib.seq_len(config)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, m.vocab_size, (config.train.batch_size, seq), dtype=np.int64)
    self.tokens = torch.from_numpy(tokens)

  def _step(self):
    torch = self.torch
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
      loss = self.model(input_ids=self.tokens, labels=self.tokens).loss
    loss.backward()
    if self.clip > 0:
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    return float(loss.detach())

  def run(self, n: int) -> list[float]:
    times = []
    for _ in range(n):
      t = time.perf_counter()
      self._step()
      times.append(time.perf_counter() - t)
    return times


# ----------------------------------------------------------------- train


def bench_train(
  config,
  *,
  steps: int = 10,
  warmup: int = 2,
  rounds: int = 3,
  compare: str = "",
  threads: int = 0,
  profile_dir: str = "",
  log=print,
) -> dict:
  """Times the train step; with compare="hf_torch" also transformers', alternating rounds.

  `steps` timed steps in all, split over `rounds` as evenly as they go (the
  first `steps % rounds` rounds take one more), after `warmup` untimed ones."""
  check_train_args(steps=steps, warmup=warmup, rounds=rounds, compare=compare, threads=threads)

  threads = threads or os.cpu_count()
  seq = config_lib.seq_len(config)
  tokens_per_step = config.train.batch_size * seq
  devices = jax.devices()
  on_cpu = devices[0].platform == "cpu"
  log(f"compiling the train step on {len(devices)} x {devices[0].device_kind} ...")
  ours = _JaxTrainer(config)
  flops_tok = metrics.flops_per_token(config.model, seq, ours.num_params)
  result = {
    "benchmark": "train",
    "date": time.strftime("%Y-%m-%d"),
    "devices": f"{len(devices)} x {devices[0].device_kind}",
    "cpu_count": os.cpu_count(),
    "model": f"{config.model.num_layers} x {config.model.d_model}, {config.model.num_heads} heads, "
    f"vocab {config.model.vocab_size}",
    "params": ours.num_params,
    "dtype": config.model.dtype,
    "remat": config.model.remat,
    "scan_layers": bool(config.model.scan_layers),
    "attention_impl": config.model.attention_impl,
    "batch": f"{config.train.batch_size} x {seq}",
    "tokens_per_step": tokens_per_step,
    "flops_per_token": flops_tok,
    "compile_s": round(ours.compile_seconds, 2),
    # Other processes on the machine slow both sides alike; this says how busy it was.
    "load_average_start": round(os.getloadavg()[0], 2),
  }
  ref = None
  if compare == "hf_torch":
    ref = _TorchTrainer(config, threads)
    result["torch_threads"] = threads
    result["hf_torch_differs"] = reference_differences(config.model, devices[0].platform)

  ours.run(warmup)
  if ref is not None:
    ref.run(warmup)
  # Alternate rounds so both see the same (noisy, shared) machine.
  ours_t, ref_t, peak_samples = [], [], []
  for r in range(rounds):
    per_round = steps // rounds + (r < steps % rounds)
    if on_cpu:
      peak_samples.append(metrics.measure_matmul_peak())
    if profile_dir and r == 0:
      jax.profiler.start_trace(profile_dir)
    ours_t += ours.run(per_round)
    if profile_dir and r == 0:
      jax.profiler.stop_trace()
      result["profile_dir"] = profile_dir
    if ref is not None:
      ref_t += ref.run(per_round)
    line = f"  round {r + 1}/{rounds}: ours {np.median(ours_t[-per_round:]):.3f} s/step"
    if ref is not None:
      line += f", transformers {np.median(ref_t[-per_round:]):.3f} s/step"
    log(line)
  s = _stats(ours_t)
  result.update({f"step_{k}": v for k, v in s.items()})
  result["tokens_per_s"] = tokens_per_step / s["median_s"]
  # Same batch every step: the loss must fall (a check that the step trains).
  result["loss_first_call"], result["loss_last_call"] = ours.first_loss, ours.last_loss
  if on_cpu:
    peak = max(peak_samples)
    result["peak_flops"] = peak
    result["peak_source"] = (
      f"measured float32 1024^3 matmul, best of {len(peak_samples)} ({peak / 1e9:.1f} GFLOP/s)"
    )
  else:
    peak, source = metrics.peak_flops(config.log.peak_flops)
    result["peak_flops"] = peak
    result["peak_source"] = source
  result["mfu"] = flops_tok * result["tokens_per_s"] / peak
  result["peak_memory_bytes"], result["peak_memory_source"] = _peak_memory(
    "transformers' model and AdamW state: --compare runs in this process" if ref is not None else ""
  )
  result["load_average_end"] = round(os.getloadavg()[0], 2)
  if ref is not None:
    rs = _stats(ref_t)
    result.update({f"hf_torch_step_{k}": v for k, v in rs.items()})
    result["hf_torch_tokens_per_s"] = tokens_per_step / rs["median_s"]
    result["hf_torch_mfu"] = flops_tok * result["hf_torch_tokens_per_s"] / peak
    result["speedup_vs_hf_torch"] = result["tokens_per_s"] / result["hf_torch_tokens_per_s"]
  return result


def format_train(r: dict) -> str:
  lines = [
    f"train step: {r['model']} ({r['params'] / 1e6:.1f}M params), {r['dtype']}, remat {r['remat']}, "
    f"scan {r['scan_layers']}, attention {r['attention_impl']}, batch {r['batch']}",
    f"devices: {r['devices']} ({r['cpu_count']} CPU cores, load average {r['load_average_start']} -> "
    f"{r['load_average_end']}); compile {r['compile_s']:.1f} s",
    f"ours: {r['tokens_per_s']:.1f} tokens/s, step {r['step_median_s'] * 1e3:.1f} ms median "
    f"(min {r['step_min_s'] * 1e3:.1f}, p90 {r['step_p90_s'] * 1e3:.1f}, IQR {r['step_iqr_pct']:.1f}%, "
    f"{r['step_steps']} steps)",
    f"MFU {100 * r['mfu']:.1f}% of {r['peak_flops'] / 1e9:.1f} GFLOP/s ({r['peak_source']}); "
    f"{r['flops_per_token'] / 1e9:.3f} GFLOP/token (PaLM)",
    f"peak memory {r['peak_memory_bytes'] / 2**30:.2f} GiB ({r['peak_memory_source']})",
  ]
  if "hf_torch_tokens_per_s" in r:
    lines += [
      f"transformers (torch, {r['torch_threads']} threads): {r['hf_torch_tokens_per_s']:.1f} tokens/s, "
      f"step {r['hf_torch_step_median_s'] * 1e3:.1f} ms median (IQR {r['hf_torch_step_iqr_pct']:.1f}%), "
      f"MFU {100 * r['hf_torch_mfu']:.1f}%",
      f"speed-up vs transformers: {r['speedup_vs_hf_torch']:.2f}x",
    ]
    lines += [f"note: {d}" for d in r.get("hf_torch_differs", [])]
  return "\n".join(lines)


# ---------------------------------------------------------------- sample


def benchmark_generate(
  *,
  num_layers: int = 6,
  d_model: int = 768,
  num_heads: int = 12,
  vocab_size: int = 50257,
  block_size: int = 1024,
  batch_sizes=(1, 8),
  prompt_len: int = 16,
  max_new_tokens: int = 256,
  repeats: int = 3,
  reference: bool = True,
  threads: int = 2,
  seed: int = 0,
) -> dict:
  """Decoding tokens/s of `generate` and, side by side, of transformers' `generate`.

  Both run the same random GPT-2-shaped weights (a GPT2LMHeadModel saved and
  imported with gpt_jax.hf.from_hf) from the same prompts and generate
  exactly max_new_tokens per row (no EOT), greedy and with top-k sampling
  (temperature 0.8, k 40). After a warm-up (our first call, compilation
  included, is reported apart) the two take turns for `repeats` timed calls
  each, so both see the same machine load; figures are the median call, the
  prefill included. Decoding reads every weight once per step, so each
  figure is also given as a fraction of the memory read bandwidth measured
  in the same run (`_bandwidth_pct`): how close it is to that limit.
  """
  import torch
  import transformers

  torch.manual_seed(seed)
  torch.set_num_threads(threads)
  hf_cfg = transformers.GPT2Config(
    vocab_size=vocab_size, n_positions=block_size, n_embd=d_model, n_layer=num_layers, n_head=num_heads
  )
  hf_model = transformers.GPT2LMHeadModel(hf_cfg).eval()
  with tempfile.TemporaryDirectory() as tmp:
    hf_model.save_pretrained(tmp, safe_serialization=True)
    cfg, params = hf.from_hf(tmp)
  hf_model.generation_config.update(eos_token_id=None, pad_token_id=0)
  rng = np.random.default_rng(seed)
  # Bytes a decoding step reads: every weight but the position tables (one row each).
  lookup = sum(params[name].nbytes for name in model_lib.position_tables(cfg))
  step_bytes = sum(x.nbytes for x in jax.tree.leaves(params)) - lookup
  bandwidth = metrics.measure_read_bandwidth()
  figures = {
    "model": f"{num_layers}x{d_model}, vocab {vocab_size}",
    "prompt_len": prompt_len,
    "max_new_tokens": max_new_tokens,
    "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
    "repeats": repeats,
    "weight_bytes_per_step": int(step_bytes),
    "read_bandwidth_gb_per_s": round(bandwidth / 1e9, 1),
  }
  if reference:  # Only transformers' side runs on torch threads.
    figures["torch_threads"] = threads

  def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out

  def record(prefix, seconds, B):
    median = float(np.median(seconds))
    figures[f"{prefix}_tokens_per_s"] = round(B * max_new_tokens / median, 1)
    figures[f"{prefix}_ms_per_step"] = round(1e3 * median / max_new_tokens, 3)
    figures[f"{prefix}_spread_pct"] = round(100 * (max(seconds) - min(seconds)) / median, 1)
    figures[f"{prefix}_bandwidth_pct"] = round(100 * step_bytes * max_new_tokens / median / bandwidth, 2)
    return median

  modes = {"greedy": dict(temperature=0.0), "topk": dict(temperature=0.8, top_k=40)}
  for B in batch_sizes:
    prompts = rng.integers(0, vocab_size, (B, prompt_len)).tolist()
    ids = torch.tensor(prompts)
    for name, kw in modes.items():
      ours = functools.partial(sample.generate, cfg, params, prompts, max_new_tokens=max_new_tokens, **kw)
      figures[f"b{B}_{name}_first_call_s"] = round(timed(ours)[0], 2)
      theirs = None
      if reference:
        hf_kw = dict(do_sample=False) if name == "greedy" else dict(do_sample=True, **kw)
        generate_hf = functools.partial(
          hf_model.generate,
          ids,
          attention_mask=torch.ones_like(ids),
          max_new_tokens=max_new_tokens,
          min_new_tokens=max_new_tokens,
          **hf_kw,
        )

        def theirs(generate_hf=generate_hf):
          with torch.inference_mode():
            return generate_hf()

        theirs()
      ours_s, theirs_s = [], []
      for _ in range(repeats):
        seconds, our_tokens = timed(ours)
        ours_s.append(seconds)
        if theirs is not None:
          seconds, hf_tokens = timed(theirs)
          theirs_s.append(seconds)
      median = record(f"b{B}_{name}", ours_s, B)
      logging.info("batch %d %s: %.1f tokens/s", B, name, B * max_new_tokens / median)
      if theirs is None:
        continue
      hf_median = record(f"b{B}_{name}_transformers", theirs_s, B)
      figures[f"b{B}_{name}_speedup"] = round(hf_median / median, 2)
      logging.info("batch %d %s: transformers %.1f tokens/s", B, name, B * max_new_tokens / hf_median)
      if name == "greedy":
        figures[f"b{B}_greedy_same_tokens"] = our_tokens == hf_tokens[:, prompt_len:].tolist()
  return figures


def bench_sample(config, *, compare: str = "", threads: int = 0, batch_sizes=(1, 8), prompt_len=16,
                 max_new_tokens=128, rounds=3, log=print) -> dict:  # fmt: skip
  check_sample_args(
    config,
    compare=compare,
    threads=threads,
    batch_sizes=batch_sizes,
    prompt_len=prompt_len,
    max_new_tokens=max_new_tokens,
    rounds=rounds,
  )
  m = config.model
  log(f"sampling: {m.num_layers} x {m.d_model}, batches {list(batch_sizes)}, {max_new_tokens} new tokens")
  load = round(os.getloadavg()[0], 2)
  figures = benchmark_generate(
    num_layers=m.num_layers,
    d_model=m.d_model,
    num_heads=m.num_heads,
    vocab_size=m.vocab_size,
    block_size=m.block_size,
    batch_sizes=tuple(batch_sizes),
    prompt_len=prompt_len,
    max_new_tokens=max_new_tokens,
    repeats=rounds,
    reference=compare == "hf_torch",
    threads=threads or os.cpu_count(),
  )
  result = {"benchmark": "sample", "date": time.strftime("%Y-%m-%d"), "load_average_start": load, **figures}
  if compare:
    result["hf_torch_differs"] = _device_difference(jax.devices()[0].platform)
  # The weights come from a transformers model built in this process, compared or not.
  held = "the transformers model that supplies the weights"
  held += " and generates for --compare" if compare else ""
  result["peak_memory_bytes"], result["peak_memory_source"] = _peak_memory(held)
  result["load_average_end"] = round(os.getloadavg()[0], 2)
  return result


def format_sample(r: dict) -> str:
  return "\n".join(f"{k}: {v}" for k, v in r.items())


# ------------------------------------------------------------------- CLI

_CONFIG = None


def main(argv):
  F = flags.FLAGS
  if len(argv) != 2 or argv[1] not in ("train", "sample"):
    raise UserError("usage: python -m gpt_jax.bench train|sample --config=FILE [--compare=hf_torch]")
  if F.draft or F.weights:  # Trained models: the config comes from --workdir.
    return bench_decode.main(argv[1], F)
  if _CONFIG.value is None:
    raise UserError("give --config=FILE (or, for bench sample, --workdir with --draft or --weights)")
  config = config_lib.validate(_CONFIG.value)
  # Every argument is checked before anything runs (bench_train / bench_sample
  # check theirs first thing): a bad one costs no compilation.
  if F.json_out:
    check_json_out(F.json_out)
  batch_sizes = parse_batch_sizes(F.batch_sizes)
  logging.set_verbosity(logging.WARNING)
  log = lambda s: print(s, file=sys.stderr, flush=True)
  if argv[1] == "train":
    result = bench_train(
      config,
      steps=F.steps,
      warmup=F.warmup,
      rounds=F.rounds,
      compare=F.compare,
      threads=F.threads,
      profile_dir=F.profile,
      log=log,
    )
    text = format_train(result)
  else:
    result = bench_sample(
      config,
      compare=F.compare,
      threads=F.threads,
      batch_sizes=batch_sizes,
      prompt_len=F.prompt_len,
      max_new_tokens=F.max_new_tokens,
      rounds=F.rounds,
      log=log,
    )
    text = format_sample(result)
  result["command"] = " ".join(["python -m gpt_jax.bench", *sys.argv[1:]])
  print(text, flush=True)
  if F.json_out:
    with open(F.json_out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  _CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (model shape, dtype, batch, seq_len, mesh); not with --draft / --weights."
  )
  flags.DEFINE_string(
    "workdir", None, "sample --draft / --weights: the trained target (workdir or HF folder)."
  )
  flags.DEFINE_string("draft", None, "sample: the draft model (workdir or HF folder): speculative decoding.")
  flags.DEFINE_list("draft_tokens", ["2", "3", "4"], "sample --draft: draft tokens per round (k) to time.")
  flags.DEFINE_list("weights", [], "sample: weight formats to time against float32 (bfloat16, int8).")
  flags.DEFINE_string("compare", "", "'hf_torch': time transformers side by side and print the ratio.")
  flags.DEFINE_integer("steps", 12, "Timed steps in all, split over --rounds (at least one each).")
  flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation (0 = none).")
  flags.DEFINE_integer("rounds", 3, "Alternating rounds of ours / the reference (sample: timed calls each).")
  flags.DEFINE_integer("threads", 0, "torch threads (0 = all CPU cores, as XLA uses).")
  flags.DEFINE_string("profile", "", "Write a jax.profiler trace of the first timed round here.")
  flags.DEFINE_string("json_out", "", "Also write the figures as JSON here.")
  flags.DEFINE_list("batch_sizes", ["1", "8"], "sample: batch sizes.")
  flags.DEFINE_integer("prompt_len", 16, "sample: prompt tokens.")
  flags.DEFINE_integer("max_new_tokens", 128, "sample: generated tokens per row.")
  cli.run(main)

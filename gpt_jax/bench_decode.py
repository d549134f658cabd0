"""Decoding benchmarks on trained models: a draft/target pair, and weight formats.

    python -m gpt_jax.bench sample --workdir=BIG --draft=SMALL --draft_tokens=2,3,4 --compare=hf_torch
    python -m gpt_jax.bench sample --workdir=RUN --weights=float32,bfloat16,int8

`bench_draft`: batch-1 greedy decoding of the target, plain and speculative
(gpt_jax.speculative, one run per k), and with --compare=hf_torch
transformers' plain `generate` and assisted generation
(`generate(assistant_model=draft)`, its default schedule of draft tokens) on
the same pair (workdirs are exported to Hugging Face folders with
gpt_jax.hf.to_hf) and the same prompts. Every contender decodes each prompt
in turn, in alternating rounds after a warm-up, so all see the same machine
load; figures are medians. Prints tokens/s, ratios, the acceptance rate and
tokens per target pass, whether each output equals plain greedy decoding's,
and the share of the bandwidth floor: plain float32 decoding reads every
target weight once per token, so target bytes x tokens / read bandwidth
(measured in the same run) is the fastest it can be.

`bench_weights`: batch-1 greedy decoding with each weight format
(gpt_jax.quantize) side by side, each against the bandwidth its own bytes
need; then the largest logit error against float32 over the prompts and the
float32 continuation, and the greedy agreement with float32.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import jax
import numpy as np

from gpt_jax import hf, loading, metrics, quantize, sample, speculative
from gpt_jax import model as model_lib
from gpt_jax.errors import UserError

# Shakespeare-like openings: the pair is trained on the default (Shakespeare) corpus.
PROMPTS = (
  "ROMEO:\n",
  "First Citizen:\nBefore we proceed any further, hear me speak.\n",
  "KING HENRY:\n",
  "Enter",
)


def _timed(fn):
  t = time.perf_counter()
  out = fn()
  return time.perf_counter() - t, out


def _rounds(runs: dict, rounds: int, log) -> tuple[dict, dict]:
  """(seconds per contender per round, last outputs): a warm-up call each, then alternating rounds."""
  outputs = {name: fn() for name, fn in runs.items()}
  times = {name: [] for name in runs}
  for r in range(rounds):
    for name, fn in runs.items():
      seconds, outputs[name] = _timed(fn)
      times[name].append(seconds)
    log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()))
  return times, outputs


def _hf_folder(path, cfg, params, tmp: str, name: str) -> str:
  """`path` if it is a Hugging Face folder, else an export of (cfg, params) under `tmp`."""
  if loading.is_hf_dir(path):
    return str(path)
  return str(hf.to_hf(cfg, jax.device_get(params), os.path.join(tmp, name)))


def _hf_generate(hf_model, ids, n, assistant=None):
  import torch

  kw = dict(do_sample=False, max_new_tokens=n, min_new_tokens=n)
  if assistant is not None:
    kw["assistant_model"] = assistant
  x = torch.tensor([ids])
  with torch.inference_mode():
    out = hf_model.generate(x, attention_mask=torch.ones_like(x), **kw)
  return out[0, len(ids) :].tolist()


def bench_draft(
  *, workdir: str, draft: str, draft_tokens, max_new_tokens: int, rounds: int, compare: str, threads: int, log
) -> dict:
  cfg, params, tok = loading.load_for_inference(workdir=workdir)
  dcfg, dparams, dtok = loading.load_for_inference(workdir=draft)
  speculative.check_pair(cfg, dcfg, tok, dtok)
  for k in draft_tokens:
    speculative.check_draft_tokens(k, "--draft_tokens")
  params, dparams = jax.device_get((params, dparams))
  prompts = [tok.encode(p) for p in PROMPTS]
  n = max_new_tokens
  bandwidth = metrics.measure_read_bandwidth()
  target_bytes = quantize.weight_bytes(params)
  result = {
    "benchmark": "sample --draft",
    "date": time.strftime("%Y-%m-%d"),
    "load_average_start": round(os.getloadavg()[0], 2),
    "target": f"{cfg.num_layers} x {cfg.d_model}, vocab {cfg.vocab_size}",
    "draft": f"{dcfg.num_layers} x {dcfg.d_model}",
    "target_weight_bytes": target_bytes,
    "draft_weight_bytes": quantize.weight_bytes(dparams),
    "read_bandwidth_gb_per_s": round(bandwidth / 1e9, 1),
    "batch_size": 1,
    "prompts": len(prompts),
    "max_new_tokens": n,
  }
  runs = {
    "plain": lambda: [
      sample.generate(cfg, params, [p], max_new_tokens=n, temperature=0.0)[0] for p in prompts
    ]
  }
  stats = {}
  for k in draft_tokens:
    d = speculative.Draft(dcfg, dparams, k)

    def spec(d=d):
      out = []
      for p in prompts:
        s = {}
        out.append(sample.generate(cfg, params, [p], max_new_tokens=n, temperature=0.0, draft=d, stats=s)[0])
        stats.setdefault(d.tokens, []).append(s)
      return out

    runs[f"spec_k{k}"] = spec
  with tempfile.TemporaryDirectory() as tmp:
    if compare == "hf_torch":
      import torch
      import transformers

      torch.set_num_threads(threads)
      hf_target = transformers.GPT2LMHeadModel.from_pretrained(_hf_folder(workdir, cfg, params, tmp, "t"))
      hf_draft = transformers.GPT2LMHeadModel.from_pretrained(_hf_folder(draft, dcfg, dparams, tmp, "d"))
      for m in (hf_target.eval(), hf_draft.eval()):
        m.generation_config.update(eos_token_id=None, pad_token_id=0)
      runs["hf_plain"] = lambda: [_hf_generate(hf_target, p, n) for p in prompts]
      runs["hf_assisted"] = lambda: [_hf_generate(hf_target, p, n, hf_draft) for p in prompts]
      result["torch_threads"] = threads
    times, outputs = _rounds(runs, rounds, log)
  total = n * len(prompts)
  base = float(np.median(times["plain"]))
  for name, t in times.items():
    median = float(np.median(t))
    result[f"{name}_tokens_per_s"] = round(total / median, 1)
    result[f"{name}_vs_plain"] = round(base / median, 3)
    result[f"{name}_pct_of_bandwidth_floor"] = round(100 * target_bytes * total / median / bandwidth, 1)
    result[f"{name}_same_as_plain"] = outputs[name] == outputs["plain"]
  for k, ss in stats.items():  # Greedy: every call of a k gives the same counts.
    result[f"spec_k{k}_acceptance"] = round(float(np.mean([s["acceptance_rate"] for s in ss])), 3)
    result[f"spec_k{k}_tokens_per_pass"] = round(float(np.mean([s["tokens_per_pass"] for s in ss])), 3)
  if "hf_plain" in times:
    hf_plain, hf_assisted = float(np.median(times["hf_plain"])), float(np.median(times["hf_assisted"]))
    for name in times:
      if name.startswith(("plain", "spec")):
        ours = float(np.median(times[name]))
        result[f"{name}_vs_hf_plain"] = round(hf_plain / ours, 2)
        result[f"{name}_vs_hf_assisted"] = round(hf_assisted / ours, 2)
  result["load_average_end"] = round(os.getloadavg()[0], 2)
  return result


def bench_weights(*, workdir: str, formats, max_new_tokens: int, rounds: int, log) -> dict:
  for f in formats:
    quantize.check_weights(f)
  cfg, params, tok = loading.load_for_inference(workdir=workdir)
  params = jax.device_get(params)
  prompts = [tok.encode(p) for p in PROMPTS]
  n = max_new_tokens
  converted = {f: quantize.quantize_params(params, f) for f in ("float32", *formats)}
  bandwidth = metrics.measure_read_bandwidth()
  result = {
    "benchmark": "sample --weights",
    "date": time.strftime("%Y-%m-%d"),
    "load_average_start": round(os.getloadavg()[0], 2),
    "model": f"{cfg.num_layers} x {cfg.d_model}, vocab {cfg.vocab_size}",
    "read_bandwidth_gb_per_s": round(bandwidth / 1e9, 1),
    "batch_size": 1,
    "max_new_tokens": n,
  }
  runs = {
    f: lambda p=p: sample.generate(cfg, p, prompts[:1], max_new_tokens=n, temperature=0.0)
    for f, p in converted.items()
  }
  times, _ = _rounds(runs, rounds, log)
  base = float(np.median(times["float32"]))
  for f, t in times.items():
    median = float(np.median(t))
    step_bytes = quantize.weight_bytes(converted[f])
    result[f"{f}_weight_bytes_per_token"] = step_bytes
    result[f"{f}_tokens_per_s"] = round(n / median, 1)
    result[f"{f}_vs_float32"] = round(base / median, 3)
    result[f"{f}_bandwidth_pct"] = round(100 * step_bytes * n / median / bandwidth, 1)
  # Accuracy over every prompt: logits of prompt + float32 continuation, and greedy agreement.
  ref = sample.generate(cfg, converted["float32"], prompts, max_new_tokens=n, temperature=0.0)
  seqs = [p + r for p, r in zip(prompts, ref)]
  width = max(map(len, seqs))
  tokens_BT = np.array([s + [0] * (width - len(s)) for s in seqs], np.int32)
  mask_BT = np.array([[1] * len(s) + [0] * (width - len(s)) for s in seqs], bool)
  forward = jax.jit(lambda p, t: model_lib.GPT(cfg).apply({"params": p}, t))
  ref_logits = np.asarray(forward(converted["float32"], tokens_BT))[mask_BT]
  for f in formats:
    if f == "float32":
      continue
    err = np.abs(np.asarray(forward(converted[f], tokens_BT))[mask_BT] - ref_logits)
    result[f"{f}_max_logit_err"] = round(float(err.max()), 4)
    result[f"{f}_max_logit_err_over_std"] = round(float(err.max() / ref_logits.std()), 4)
    out = sample.generate(cfg, converted[f], prompts, max_new_tokens=n, temperature=0.0)
    same = sum(next((i for i, (a, b) in enumerate(zip(r, o)) if a != b), len(r)) for r, o in zip(ref, out))
    result[f"{f}_greedy_same_prefix"] = f"{same}/{sum(map(len, ref))}"
  result["load_average_end"] = round(os.getloadavg()[0], 2)
  return result


def main(command: str, F) -> None:
  """`bench sample --workdir=... --draft=... | --weights=...` (flags defined by gpt_jax.bench)."""
  if command != "sample":
    raise UserError("--draft and --weights are options of bench sample")
  if not F.workdir:
    raise UserError(
      "--draft / --weights need --workdir (the target: a gpt_jax workdir or Hugging Face folder)"
    )
  if F.compare not in ("", "hf_torch"):
    raise UserError(f"--compare={F.compare!r}: must be 'hf_torch' or empty")
  for flag in ("rounds", "max_new_tokens"):
    if F[flag].value < 1:
      raise UserError(f"--{flag}={F[flag].value} must be >= 1")
  if F.json_out and not os.path.isdir(os.path.dirname(os.path.abspath(F.json_out))):
    raise UserError(f"--json_out={F.json_out}: its folder does not exist")
  log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
  if F.draft:
    try:
      ks = [int(k) for k in F.draft_tokens]
    except ValueError:
      raise UserError(f"--draft_tokens={','.join(F.draft_tokens)}: integers >= 1, comma-separated") from None
    result = bench_draft(
      workdir=F.workdir,
      draft=F.draft,
      draft_tokens=ks,
      max_new_tokens=F.max_new_tokens,
      rounds=F.rounds,
      compare=F.compare,
      threads=F.threads or os.cpu_count(),
      log=log,
    )
  else:
    result = bench_weights(
      workdir=F.workdir, formats=F.weights, max_new_tokens=F.max_new_tokens, rounds=F.rounds, log=log
    )
  result["command"] = " ".join(["python -m gpt_jax.bench", *sys.argv[1:]])
  print("\n".join(f"{k}: {v}" for k, v in result.items()), flush=True)
  if F.json_out:
    with open(F.json_out, "w") as f:
      json.dump(result, f, indent=1)

"""Scaling-law ladder: train a grid of model sizes x token budgets, fit L(N, D), report, predict.

  python -m gpt_jax.ladder --config=configs/ladder_shakespeare.py --workdir=runs/ladder
  python -m gpt_jax.ladder --config=configs/ladder_shakespeare.py --workdir=runs/ladder --notrain \
      --predict=configs/gpt2_small.py --tokens=3e9
  launch/local.sh 2 --config=configs/ladder_shakespeare.py --workdir=runs/ladder --ladder   # via gpt_jax.main

`config.ladder` names the grid (configs/ladder_shakespeare.py documents every
field). Each rung trains `train.run` in `<workdir>/runs/<name>/`, an ordinary
workdir that `python -m gpt_jax.main` resumes with the command stored in its
`ladder_rung.json`. All rungs share one tokenizer, pinned once in
`<workdir>/shared/tokenizer/` and copied into each rung, and one token cache
(`data.data_dir` = `<workdir>/shared/data`), so the corpus is tokenised once.
A rung whose `ladder_rung.json` says finished is never retrained; an
interrupted one resumes from its checkpoint. The fit and report
(gpt_jax/scaling.py) read the final `eval_loss` of each run's metrics.jsonl.

N (`ladder.n`): "matmul" (default) = all parameters but the position table,
the N of metrics.flops_per_token (PaLM's 6N): with a tied head the token
table does the LM-head matmul, so it is compute, and C = k·N·D holds with k
close to 6. "non_embedding" = Kaplan et al.'s count (both tables left out).
D = tokens trained (steps x batch x seq_len). C = FLOPs per token x D with
the PaLM formula 6N + 12·L·H·Q·T (metrics.flops_per_token).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import re
import shlex
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import flags, logging
from etils import epath
from ml_collections import config_flags

from gpt_jax import cli, distributed, metrics, paths, pretrain, scaling
from gpt_jax import config as config_lib
from gpt_jax import model as model_lib
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.errors import ConfigError, UserError

RUNG_FILE = "ladder_rung.json"
REPORT_FILE = "ladder_report.json"
PLOT_FILE = "ladder_report.png"
N_KINDS = ("matmul", "non_embedding")
MIN_FIT_RUNS = 6  # Five parameters in L(N, D), plus one.
# Rung settings that must match between invocations for a run to be reused
# (what changes the loss); logging, checkpointing, workers and caches may differ.
_SETTINGS = ("model", "data", "train", "optim", "eval.num_batches", "eval.batch_size")
_FREE = ("data.num_workers", "data.prefetch", "train.compilation_cache_dir", "train.max_bad_steps")
_N_TEXT = {
  "matmul": "parameters minus the position table (the N of PaLM's 6N: the tied token table does the LM-head "
  "matmul), as Chinchilla counts total parameters",
  "non_embedding": "parameters minus the token and position tables (Kaplan et al. 2020)",
}


@dataclasses.dataclass(frozen=True)
class Rung:
  name: str  # "2x64_D500k": shape and budget; also the folder under <workdir>/runs/.
  shape: str  # "2x64" (layers x d_model) as given in ladder.shapes.
  num_layers: int
  d_model: int
  num_heads: int
  steps: int
  tokens: int  # Trained: steps x batch x seq_len.
  budget: str  # "D500k" (token budget) or "C3e13" (IsoFLOP budget).
  held_out: bool = False


# ------------------------------------------------------------- the grid


def _fail(field: str, value, allowed: str):
  raise ConfigError(f"config.ladder.{field}={value!r} is invalid: {allowed}")


def _numbers(field: str, value) -> list[float]:
  items = [value] if isinstance(value, int | float | str) else list(value)
  out = []
  for item in items:
    for part in str(item).replace("(", "").replace(")", "").split(","):
      if not part.strip():
        continue
      try:
        x = float(part)
      except ValueError:
        _fail(field, value, "give positive numbers, e.g. (125000, 500000) or 1e6")
      if not x > 0 or not math.isfinite(x):
        _fail(field, value, "every entry must be a finite number > 0")
      out.append(x)
  return out


def parse_shape(text: str, head_dim: int, field: str = "shapes") -> tuple[int, int, int]:
  """'2x64' -> (2, 64, 64 // head_dim); '2x64x2' -> (2, 64, 2)."""
  m = re.fullmatch(r"\s*(\d+)x(\d+)(?:x(\d+))?\s*", text)
  if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
    _fail(field, text, "shapes are LAYERSxD_MODEL or LAYERSxD_MODELxHEADS, e.g. 2x64 or 2x64x4")
  layers, d = int(m.group(1)), int(m.group(2))
  if m.group(3) is None and d % head_dim:
    _fail(field, text, f"d_model {d} is not a multiple of ladder.head_dim={head_dim}; give LxDxHEADS")
  heads = int(m.group(3)) if m.group(3) else d // head_dim
  if heads < 1 or d % heads:
    _fail(field, text, f"{heads} heads must divide d_model {d}")
  return layers, d, heads


def _label(x: float) -> str:
  for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
    if x >= div:
      return f"{x / div:.4g}{suffix}"
  return f"{x:.4g}"


def validate(config) -> list[Rung]:
  """Checks config.ladder; returns the rungs (held-out one last). Raises ConfigError."""
  if "ladder" not in config:
    raise ConfigError("the config has no ladder section (see configs/ladder_shakespeare.py)")
  lc = config.ladder
  head_dim = lc.head_dim
  if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
    _fail("head_dim", head_dim, "must be a positive integer")
  shapes = [s for s in str(lc.shapes).replace("(", "").replace(")", "").split(",") if s.strip()]
  if not shapes:
    _fail("shapes", lc.shapes, "give comma-separated shapes, e.g. '1x32,2x64,4x128'")
  shapes = [s.strip(" '\"") for s in shapes]
  if len(set(shapes)) != len(shapes):
    _fail("shapes", lc.shapes, "a shape is listed twice")
  if lc.n not in N_KINDS:
    _fail("n", lc.n, "allowed values are " + ", ".join(repr(k) for k in N_KINDS))
  for field in ("bootstrap", "min_steps"):
    v = lc[field]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      _fail(field, v, "must be a positive integer")
  if not 0 < lc.ci_level < 1:
    _fail("ci_level", lc.ci_level, "must be in (0, 1)")
  if not lc.huber_delta > 0:
    _fail("huber_delta", lc.huber_delta, "must be > 0")
  if not 0 <= lc.warmup_fraction < 1:
    _fail("warmup_fraction", lc.warmup_fraction, "must be in [0, 1)")
  flops = _numbers("flops", lc.flops)
  tokens = [] if flops else _numbers("tokens", lc.tokens)
  if not flops and not tokens:
    _fail("tokens", lc.tokens, "give token budgets (or IsoFLOP budgets in ladder.flops)")
  step_tokens = config.train.batch_size * config_lib.seq_len(config)

  def steps_for(field, value, budget_tokens, strict=True):
    steps = round(budget_tokens / step_tokens)
    if steps < 1 and strict:
      _fail(field, value, f"{budget_tokens:g} tokens is less than one step of {step_tokens} tokens")
    return steps

  rungs = []
  for shape in shapes:
    layers, d, heads = parse_shape(shape, head_dim)
    for budget in tokens:
      steps = steps_for("tokens", lc.tokens, budget)
      label = "D" + _label(budget)
      rungs.append(Rung(f"{shape}_{label}", shape, layers, d, heads, steps, steps * step_tokens, label))
    for budget in flops:
      fpt = flops_per_token(config, layers, d, heads)
      steps = steps_for("flops", lc.flops, budget / fpt, strict=False)
      if steps < lc.min_steps:
        logging.info("ladder: %s at C=%g is %d steps (< ladder.min_steps); left out", shape, budget, steps)
        continue
      label = f"C{budget:.3g}".replace("+", "")
      rungs.append(Rung(f"{shape}_{label}", shape, layers, d, heads, steps, steps * step_tokens, label))
  if lc.holdout_shape:
    layers, d, heads = parse_shape(lc.holdout_shape, head_dim, "holdout_shape")
    budget = _numbers("holdout_tokens", lc.holdout_tokens)
    if len(budget) != 1:
      _fail("holdout_tokens", lc.holdout_tokens, "give one token budget for the held-out rung")
    steps = steps_for("holdout_tokens", lc.holdout_tokens, budget[0])
    label = "D" + _label(budget[0])
    name = f"{lc.holdout_shape.strip()}_{label}"
    rungs = [r for r in rungs if r.name != name]  # A grid rung named as the hold-out moves out of the fit.
    rungs.append(
      Rung(name, lc.holdout_shape.strip(), layers, d, heads, steps, steps * step_tokens, label, True)
    )
  fitted = [r for r in rungs if not r.held_out]
  if len(fitted) < MIN_FIT_RUNS:
    _fail(
      "shapes", lc.shapes, f"the grid gives {len(fitted)} rungs to fit; L(N, D) needs at least {MIN_FIT_RUNS}"
    )
  return rungs


# -------------------------------------------------------- counts and FLOPs


def model_config(config, layers: int, d: int, heads: int):
  m = ml_collections.ConfigDict(config.model.to_dict())
  m.update(num_layers=layers, d_model=d, num_heads=heads)
  return m


def param_counts(model_cfg) -> dict:
  """{"params", "non_embedding_params", "matmul_params"} from shapes (no memory)."""
  shapes = nn.unbox(model_lib.abstract_params(model_cfg))
  total = model_lib.param_count(shapes)
  lookup = sum(int(np.prod(shapes[k].shape)) for k in model_lib.position_tables(model_cfg))
  wte = int(np.prod(shapes["wte"].shape))
  return {"params": total, "non_embedding_params": total - wte - lookup, "matmul_params": total - lookup}


def flops_per_token(config, layers: int, d: int, heads: int) -> float:
  m = model_config(config, layers, d, heads)
  return metrics.flops_per_token(m, config_lib.seq_len(config), param_counts(m)["params"])


def n_of(counts: dict, kind: str) -> int:
  return counts["matmul_params" if kind == "matmul" else "non_embedding_params"]


# ---------------------------------------------------------------- rungs


def shared_dirs(config, workdir: str) -> dict:
  """The shared tokenizer root, token-cache folder and compilation cache of a ladder."""
  root = f"{workdir}/shared"
  data_dir = config.data.data_dir
  if not data_dir:  # The token cache is memory-mapped: a URL ladder keeps it on each host's disk.
    data_dir = paths.local_dir(workdir, "shared", "data") if paths.is_url(workdir) else f"{root}/data"
  cache = config.train.compilation_cache_dir or f"{root}/jax_cache"
  return {"root": root, "data_dir": data_dir, "compilation_cache_dir": cache}


def rung_overrides(config, rung: Rung, workdir: str) -> dict:
  """Dotted field -> value that turn the ladder's config into this rung's (the resume command's flags)."""
  shared = shared_dirs(config, workdir)
  out = {
    "model.num_layers": rung.num_layers,
    "model.d_model": rung.d_model,
    "model.num_heads": rung.num_heads,
    "train.num_steps": rung.steps,
    "data.data_dir": shared["data_dir"],
    "train.compilation_cache_dir": shared["compilation_cache_dir"],
  }
  if config.ladder.warmup_fraction > 0:  # The warmup scales with each run's length (cosine to its own end).
    out["optim.warmup_steps"] = max(1, round(config.ladder.warmup_fraction * rung.steps))
  return out


def rung_config(config, overrides: dict):
  """The rung's training config: the ladder's without its ladder section, plus overrides."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    del c["ladder"]
    for dotted, value in overrides.items():
      *path, leaf = dotted.split(".")
      node = c
      for p in path:
        node = node[p]
      node[leaf] = value
  return c


def settings(config) -> dict:
  """Flattened fields that decide a run's losses (see _SETTINGS)."""
  out = {}

  def walk(prefix, node):
    if isinstance(node, dict):
      for k, v in node.items():
        walk(f"{prefix}.{k}" if prefix else k, v)
    elif prefix not in _FREE:
      out[prefix] = list(node) if isinstance(node, tuple | list) else node

  full = config.to_dict()
  for key in _SETTINGS:
    node = full
    for part in key.split("."):
      node = node[part]
    walk(key, node)
  return out


def user_overrides(argv: list[str]) -> list[str]:
  """The command line's --config.FIELD=VALUE overrides outside config.ladder, as FIELD=VALUE flags
  (the "--config.FIELD VALUE" form joined), for the rungs' resume commands."""
  out, i = [], 0
  while i < len(argv):
    a = argv[i]
    if a.startswith("--config.") and "=" not in a and i + 1 < len(argv):
      a, i = f"{a}={argv[i + 1]}", i + 1
    if a.startswith("--config.") and not a.startswith("--config.ladder."):
      out.append(a)
    i += 1
  return out


def resume_command(config_file: str, user_overrides: list[str], overrides: dict, rung_dir: str) -> str:
  args = ["python", "-m", "gpt_jax.main", f"--config={config_file}", *user_overrides]
  args += [f"--config.{k}={v}" for k, v in overrides.items()]
  return shlex.join([*args, f"--workdir={rung_dir}"])


def _read_json(path) -> dict | None:
  p = epath.Path(path)
  if not p.exists():
    return None
  try:
    return json.loads(p.read_text())
  except json.JSONDecodeError as e:
    raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); delete it to retrain that rung") from None


def _finite(obj):
  """Non-finite floats (an exponent's interval over degenerate resamples, an overflowing C0) as
  null: strict JSON has no NaN or Infinity."""
  if isinstance(obj, dict):
    return {k: _finite(v) for k, v in obj.items()}
  if isinstance(obj, list | tuple):
    return [_finite(v) for v in obj]
  if isinstance(obj, float | np.floating) and not math.isfinite(obj):
    return None
  return obj


def _write_json(path, obj) -> None:
  """Whole-file replace (a local file is renamed into place; a bucket object is written at once)."""
  p = epath.Path(path)
  text = json.dumps(_finite(obj), indent=1, allow_nan=False) + "\n"
  if paths.is_url(str(path)):
    p.write_text(text)
    return
  tmp = p.parent / f".{p.name}.tmp"
  tmp.write_text(text)
  tmp.replace(p)


def check_settings(rung: Rung, record: dict, want: dict) -> None:
  """A rung folder holding a run of other settings is refused, naming the first difference."""
  have = record.get("settings", {})
  for key in sorted(set(have) | set(want)):
    if have.get(key) != want.get(key):
      raise UserError(
        f"ladder rung {rung.name} was trained with {key}={have.get(key)!r}, this config has "
        f"{want.get(key)!r}; use a new --workdir (or the same settings)"
      )


def final_metrics(rung_dir: str, steps: int) -> dict:
  """The final eval_loss (at `steps`) and last train loss from the run's metrics.jsonl."""
  path = epath.Path(rung_dir) / metrics.METRICS_FILE
  evals, losses = {}, {}
  if path.exists():
    for line in path.read_text().splitlines():
      if not line.strip():
        continue
      rec = json.loads(line)
      if "eval_loss" in rec:
        evals[rec["step"]] = rec["eval_loss"]
      if "loss" in rec:
        losses[rec["step"]] = rec["loss"]
  if steps not in evals:
    raise UserError(f"{path}: no eval_loss at the final step {steps}; delete {rung_dir} to retrain that rung")
  last = max(losses) if losses else None
  return {"eval_loss": evals[steps], "train_loss": losses.get(last)}


def _pin_tokenizer(config, workdir: str):
  """The ladder's one tokenizer, in <workdir>/shared/tokenizer/ (trained / loaded once)."""
  shared = shared_dirs(config, workdir)
  c = config.copy_and_resolve_references()
  c.data.data_dir = shared["data_dir"]
  tokenizer_lib.for_run(c, shared["root"])
  return f"{shared['root']}/tokenizer"


def _copy_tokenizer(source: str, rung_dir: str) -> None:
  """Puts the ladder's tokenizer into the rung's workdir, where train.run pins its tokenizer."""
  final = epath.Path(rung_dir) / "tokenizer"
  if jax.process_index() != 0 or (final / tokenizer_lib.META_FILE).exists():
    return
  tok, request = tokenizer_lib.load_dir(source), tokenizer_lib.load_request(source)
  if paths.is_url(rung_dir):
    tok.save(str(final), request=request)  # Its metadata file goes last.
    return
  tmp = tokenizer_lib.tmp_dir_for(Path(str(final)))
  tok.save(str(tmp), request=request)
  tokenizer_lib.publish_dir(tmp, Path(str(final)))


# ------------------------------------------------------------------ run


def run(
  config,
  workdir: str,
  *,
  train: bool = True,
  config_file: str = "CONFIG",
  user_overrides: tuple[str, ...] = (),
  train_fn=None,
  log=print,
) -> tuple[dict, list]:
  """Trains the ladder's unfinished rungs (train=False: none), fits, writes the report.

  Returns (report, bootstrap fits) on process 0, (None, []) on the others.
  `train_fn(config, workdir)` defaults to pretrain.run.
  """
  train_fn = train_fn or pretrain.run
  workdir = paths.run_dir(workdir)
  rungs = validate(config)
  main = jax.process_index() == 0
  log = log if main else (lambda s: None)
  epath.Path(workdir, "runs").mkdir(parents=True, exist_ok=True)
  tokenizer_dir = _pin_tokenizer(config, workdir) if train else None
  for i, rung in enumerate(rungs, 1):
    rdir = f"{workdir}/runs/{rung.name}"
    overrides = rung_overrides(config, rung, workdir)
    rc = rung_config(config, overrides)
    try:
      rc = config_lib.validate(rc)
    except ConfigError as e:
      raise ConfigError(f"ladder rung {rung.name}: {e}") from None
    want = settings(rc)
    record = _read_json(f"{rdir}/{RUNG_FILE}")
    if record is not None:
      check_settings(rung, record, want)
    if record is not None and record.get("finished"):
      log(f"ladder [{i}/{len(rungs)}] {rung.name}: finished earlier, not retrained")
      continue
    if not train:
      log(f"ladder [{i}/{len(rungs)}] {rung.name}: not finished (--notrain): left out")
      continue
    log(f"ladder [{i}/{len(rungs)}] {rung.name}: {rung.steps} steps, {rung.tokens:,} tokens")
    record = record or {
      "name": rung.name,
      "rung": dataclasses.asdict(rung),
      "settings": want,
      "resume": resume_command(config_file, list(user_overrides), overrides, rdir),
      "finished": False,
      "train_seconds": 0.0,
    }
    if main:
      epath.Path(rdir).mkdir(parents=True, exist_ok=True)
      _write_json(f"{rdir}/{RUNG_FILE}", record)
    _copy_tokenizer(tokenizer_dir, rdir)
    start = time.perf_counter()
    train_fn(rc, rdir)
    record = {
      **record,
      "finished": True,
      "train_seconds": record["train_seconds"] + time.perf_counter() - start,
    }
    if main:
      _write_json(f"{rdir}/{RUNG_FILE}", record)
  if not main:  # Process 0 alone reads the runs' files (it writes them) and reports.
    return None, []
  report, boots = build_report(config, workdir, rungs)
  _write_json(f"{workdir}/{REPORT_FILE}", report)
  buf = io.BytesIO()
  scaling.plot(report, buf)
  epath.Path(workdir, PLOT_FILE).write_bytes(buf.getvalue())
  log(f"{scaling.summary(report)}\nreport: {workdir}/{REPORT_FILE}, {workdir}/{PLOT_FILE}")
  return report, boots


def build_report(config, workdir: str, rungs: list[Rung]) -> tuple[dict, list]:
  """(report, bootstrap fits): rows from the finished rungs' metrics.jsonl, the fit, the held-out check."""
  lc = config.ladder
  seq = config_lib.seq_len(config)
  rows = []
  for rung in rungs:
    rdir = f"{workdir}/runs/{rung.name}"
    record = _read_json(f"{rdir}/{RUNG_FILE}")
    if not record or not record.get("finished"):
      continue
    m = model_config(config, rung.num_layers, rung.d_model, rung.num_heads)
    counts = param_counts(m)
    fpt = metrics.flops_per_token(m, seq, counts["params"])
    rows.append(
      {
        "name": rung.name,
        "shape": rung.shape,
        "budget": rung.budget,
        "num_layers": rung.num_layers,
        "d_model": rung.d_model,
        "num_heads": rung.num_heads,
        **counts,
        "n": n_of(counts, lc.n),
        "steps": rung.steps,
        "tokens": rung.tokens,
        "flops_per_token": fpt,
        "compute": fpt * rung.tokens,
        **final_metrics(rdir, rung.steps),
        "held_out": rung.held_out,
        "train_seconds": record.get("train_seconds"),
        "workdir": rdir,
      }
    )
  fitted = [r for r in rows if not r["held_out"]]
  if len(fitted) < MIN_FIT_RUNS:
    raise UserError(
      f"{workdir}: {len(fitted)} finished rungs to fit, L(N, D) needs at least {MIN_FIT_RUNS}; "
      "train the ladder first"
    )
  analysis, holdout, boots = scaling.analyse_runs(
    rows, samples=lc.bootstrap, level=lc.ci_level, seed=lc.seed, delta=lc.huber_delta
  )
  k = analysis["frontier"]["k"]
  report = {
    "mode": "flops" if _numbers("flops", lc.flops) else "tokens",
    "n_definition": {"name": lc.n, "text": _N_TEXT[lc.n]},
    "compute_definition": "C = FLOPs per token x D; FLOPs per token = 6N' + 12*L*H*Q*T (PaLM App. B, "
    f"metrics.flops_per_token; N' = parameters minus the position table) at T = seq_len = {seq}",
    "frontier_definition": f"minimum of L(N, D) subject to C = k*N*D, k = {k:.4g} (mean FLOPs per token / N "
    "over the fitted rungs)",
    "tokenizer": {
      "kind": config.data.tokenizer,
      "vocab_size": config.model.vocab_size,
      "source": config.data.source,
    },
    "runs": rows,
    "analysis": analysis,
    "holdout": holdout,
  }
  return report, boots


def prediction_line(report: dict, boots, target_config, tokens: float, name: str) -> tuple[str, list[str]]:
  """(one line with the predicted loss of `target_config` trained on `tokens`, notes)."""
  a = report["analysis"]
  fit = scaling.from_report(report)
  counts = param_counts(target_config.model)
  n = n_of(counts, report["n_definition"]["name"])
  fpt = metrics.flops_per_token(target_config.model, config_lib.seq_len(target_config), counts["params"])
  compute = fpt * tokens
  level = a["bootstrap"]["level"]
  pred, ci = scaling.predict(fit, boots, n, tokens, level)
  n_opt, d_opt, l_opt = scaling.frontier_point(fit, a["frontier"]["k"], compute)
  line = (
    f"prediction {name}: N={n:.4g} ({report['n_definition']['name']}), D={tokens:.4g} tokens, "
    f"C={compute:.4g} FLOPs: loss {pred:.4f} nats/token ({level:.0%} CI {ci[0]:.4f}-{ci[1]:.4f}); "
    "compute-optimal at this C: "
    f"N*={float(n_opt):.3g}, D*={float(d_opt):.3g}, loss {float(l_opt):.4f}"
  )
  notes = []
  tok = report["tokenizer"]
  theirs = {"kind": target_config.data.tokenizer, "vocab_size": target_config.model.vocab_size}
  if (tok["kind"], tok["vocab_size"]) != (theirs["kind"], theirs["vocab_size"]) or (
    tok["source"] != target_config.data.source
  ):
    notes.append(
      f"the ladder's losses are per token of its tokenizer ({tok['kind']}, {tok['vocab_size']} ids) on "
      f"data.source={tok['source']}; {name} has {theirs['kind']} ({theirs['vocab_size']} ids) on "
      f"{target_config.data.source}: the prediction is for the ladder's tokenizer and data"
    )
  rows = [r for r in report["runs"] if not r["held_out"]]
  n_max, d_max = max(r["n"] for r in rows), max(r["tokens"] for r in rows)
  if n > 10 * n_max or tokens > 10 * d_max:
    notes.append(
      f"extrapolation: N is {n / n_max:.3g}x and D {tokens / d_max:.3g}x the largest fitted (N {n_max:.3g}, "
      f"D {d_max:.3g}); the interval covers the fit's noise, not a change of regime"
    )
  return line, notes


# ------------------------------------------------------------------- CLI


def main(argv) -> None:
  F = flags.FLAGS
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  if F.config is None:
    raise UserError("give --config=FILE with a ladder section (e.g. configs/ladder_shakespeare.py)")
  if F.predict is None and F.tokens:
    raise UserError("--tokens needs --predict=CONFIG_FILE")
  # Before anything lists devices (parameter counts trace the model).
  distributed.initialize(F.coordinator_address, F.num_processes, F.process_id)
  config = F.config
  validate(config)
  target = config_lib.validate(F.predict) if F.predict is not None else None
  logging.set_verbosity(logging.INFO)
  report, boots = run(
    config,
    F.workdir,
    train=F.train,
    config_file=config_flags.get_config_filename(flags.FLAGS["config"]),
    user_overrides=user_overrides(sys.argv[1:]),
  )
  if target is not None and report is not None:
    tokens = F.tokens or target.train.num_steps * target.train.batch_size * config_lib.seq_len(target)
    predict_file = config_flags.get_config_filename(flags.FLAGS["predict"])
    line, notes = prediction_line(report, boots, target, tokens, predict_file)
    print(line, flush=True)
    for note in notes:
      print(f"note: {note}", file=sys.stderr, flush=True)


if __name__ == "__main__":
  # Defined only when run as a program, so importing this module defines no flags.
  config_flags.DEFINE_config_file(
    "config", None, "Ladder config, e.g. configs/ladder_shakespeare.py.", lock_config=True
  )
  flags.DEFINE_string("workdir", None, "Ladder directory: runs/<rung>/, shared/, ladder_report.{json,png}.")
  flags.mark_flags_as_required(["workdir"])
  flags.DEFINE_bool(
    "train", True, "Train unfinished rungs; --notrain fits and reports the finished ones only."
  )
  config_flags.DEFINE_config_file(
    "predict", None, "Config of a bigger rung to predict, e.g. configs/gpt2_xl.py."
  )
  flags.DEFINE_float(
    "tokens", 0.0, "Tokens that --predict's model trains on (0 = its train.num_steps x batch x seq)."
  )
  flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0's coordinator (multi-process).")
  flags.DEFINE_integer("num_processes", None, "Processes in the job.")
  flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
  cli.run(main)

"""Plan a run before renting hardware: parameters, FLOPs, per-device memory, a roofline.

  python -m gpt_jax.plan --config=configs/gpt2_xl.py [--json]
  python -m gpt_jax.plan --config=configs/gpt2_xl.py --target=tpu:v5e:2x4 \
      --config.mesh.fsdp=8 --config.mesh.data=1 --config.train.batch_size=32
  python -m gpt_jax.plan --config=configs/gpt3_175b.py --target=tpu:v5p-1024 --suggest
  python -m gpt_jax.plan --config=configs/gpt3_175b.py --target=tpu:v5p-1024x2 --suggest
  python -m gpt_jax.plan --ladder --family=gpt3 --target=tpu:v5p-128

Without --target: parameter counts from shapes (jax.eval_shape) and FLOPs per
token by the PaLM formula, in about a second. With a target (targets.py:
compile-only TPU devices from libtpu, CUDA devices from the jax CUDA plugin,
fake CPU devices), the real train step (train.build, which train.run calls)
is compiled ahead of time from ShapeDtypeStructs (aot.py), so no parameter
is ever allocated; the TPU compiler's HBM check is real: a program that does
not fit fails to compile, reported as "does not fit" with the bytes it asked
for. On TPU / GPU targets the plan carries a roofline (roofline.py): lower
bounds on the step time from compiled FLOPs, HBM bytes and collectives.
--suggest searches mesh x remat x per-device batch (suggest.py).
"""

from __future__ import annotations

import json
import os
import re
import sys

from absl import flags
from ml_collections import config_flags

from gpt_jax import aot, cli, hardware, suggest, targets
from gpt_jax import config as config_lib
from gpt_jax.aot import compile_plan, param_counts, plan_target  # noqa: F401 - the planner's API.
from gpt_jax.errors import ConfigError, UserError
from gpt_jax.targets import Target, gpu_target_config, parse_target, target_devices  # noqa: F401

GiB = hardware.GiB
FAMILIES = {
  "gpt2": ("gpt1", "gpt2_small", "gpt3_small", "gpt2_medium", "gpt2_large", "gpt2_xl"),
  "gpt3": (
    "gpt3_small", "gpt3_medium", "gpt3_large", "gpt3_xl", "gpt3_2p7b", "gpt3_6p7b", "gpt3_13b", "gpt3_175b"
  ),
}  # fmt: skip


# ---------------------------------------------------------------- ladder


def ladder(
  target: Target, overrides: list[str], configs_dir: str, *, family: str = "gpt2", log=print
) -> list[dict]:
  """One plan per rung of `family` (FAMILIES) on `target`, the --config.* overrides applied to each."""
  if family not in FAMILIES:
    raise UserError(f"--family={family}: must be one of {sorted(FAMILIES)}")
  rows = []
  for rung in FAMILIES[family]:
    config = cli.load_config(os.path.join(configs_dir, f"{rung}.py"), overrides)
    config = config_lib.validate(config)
    log(f"  {rung} ...")
    try:
      row = {"rung": rung, **plan_target(config, target, cross_check=False, with_roofline=False)}
    except ConfigError as e:
      row = {"rung": rung, "error": str(e)}
    rows.append(row)
  return rows


# ---------------------------------------------------------------- output


def _gib(n) -> str:
  """Bytes in the largest binary unit that keeps a digit before the point."""
  sign, n = ("-" if n < 0 else ""), abs(n)
  for unit, size in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
    if n >= size:
      return f"{sign}{n / size:.2f} {unit}"
  return f"{sign}{int(n)} B"


def _needed(p: dict) -> str:
  """Bytes needed per device; '>=' when only the TPU compiler's temporaries are known."""
  if "needed_bytes" not in p:
    return "?"
  bound = ">=" if not p["fits"] and "argument_bytes" not in p and "temp_bytes" in p else ""
  return bound + _gib(p["needed_bytes"])


def _left(p: dict) -> str:
  """What is left of the device's memory, or what is missing ('-'), per device."""
  if "left_bytes" not in p:
    return "?"
  left = p["left_bytes"]
  return ("left " if left >= 0 else "missing ") + _gib(abs(left))


def _mesh_text(mesh: dict) -> str:
  text = " x ".join(f"{a}={n}" for a, n in mesh.items() if a in ("data", "fsdp", "tensor"))
  if mesh.get("slices", 1) > 1:
    text += f" (over {mesh['slices']} slices: dcn_data={mesh['dcn_data']} x dcn_fsdp={mesh['dcn_fsdp']})"
  return text


def format_roofline(r: dict) -> list[str]:
  s, a = r["seconds"], r["assumptions"]
  lines = [
    f"roofline per chip and step: {r['flops_per_chip']:.4g} FLOPs executed, "
    f"{_gib(r['hbm_bytes_per_chip'])} through HBM, {_gib(r['ici_bytes_per_chip'])} sent over ICI"
    + (f", {_gib(r['dcn_bytes_per_chip'])} over DCN" if r.get("dcn_bytes_per_chip") else ""),
    f"  lower bounds: compute {s['compute']:.3g} s, HBM {s['hbm']:.3g} s, ICI {s['ici']:.3g} s"
    + (f", DCN {s['dcn']:.3g} s" if s.get("dcn") else "")
    + f" -> step >= {r['step_seconds']:.3g} s ({r['bound']}-bound), MFU <= {100 * r['mfu_bound']:.1f}%",
    f"  assumed per chip: {a['peak_flops'] / 1e12:.0f} TFLOP/s bf16, "
    f"HBM {a['hbm_bandwidth'] / 1e9:.0f} GB/s, "
    f"ICI {a['ici_bandwidth'] / 1e9:.0f} GB/s (all links, both directions; collectives as rings)"
    + (f", DCN {a['dcn_bandwidth'] / 1e9:.2f} GB/s" if a.get("dcn_bandwidth") else ""),
  ]
  for kind, c in sorted(r.get("collectives", {}).items()):
    lines.append(f"  {kind}: {c['count']} per step, {_gib(c['bytes'])} buffers, {_gib(c['wire_bytes'])} sent")
  return lines


def format_plan(p: dict) -> str:
  shape = (
    f"{p['num_layers']} layers, d_model {p['d_model']}, {p['num_heads']} heads, MLP {p['mlp_width']}, "
    f"vocab {p['vocab_size']} ({p['embedding_rows']} rows), context {p['block_size']}"
  )
  total, non_emb = p["params"], p["non_embedding_params"]
  lines = [
    f"model: {shape}",
    f"params: {total:,} ({total / 1e6:.1f}M)",
    f"non-embedding params: {non_emb:,} ({non_emb / 1e6:.1f}M)",
    f"FLOPs per token (PaLM 6N + 12LHQT, seq {p['seq_len']}): {p['flops_per_token']:.4g}",
  ]
  if "xla_flops_per_token" in p:
    ratio = p["xla_flops_per_token"] / p["flops_per_token"]
    lines.append(
      f"FLOPs per token (XLA cost analysis, unrolled, no remat): {p['xla_flops_per_token']:.4g} "
      f"({ratio:.3f}x the formula)"
    )
  if p.get("job_note"):
    lines.append(f"note: {p['job_note']}")
  if "target" not in p:
    return "\n".join(lines)
  lines += [
    f"target: {p['target']} - {p['devices']} x {p['device_kind']}, mesh {_mesh_text(p['mesh'])}",
    f"step: batch {p['batch_size']} x {p['seq_len']} tokens, {p['grad_accum_steps']} accumulation step(s), "
    f"{p['sequences_per_device']} sequence(s) per device per microbatch, remat {p['remat']}, {p['dtype']}, "
    f"attention {p['attention_impl']}, loss_chunk {p['loss_chunk']}, scan_layers {p['scan_layers']}",
    f"per device: params {_gib(p['params_bytes'])}, optimiser state {_gib(p['opt_state_bytes'])}"
    + (f" in HBM + {_gib(p['opt_state_host_bytes'])} host" if p.get("opt_state_host_bytes") else ""),
  ]
  if "argument_bytes" in p:
    lines.append(
      f"compiled: arguments {_gib(p['argument_bytes'])}, temporaries {_gib(p['temp_bytes'])}, "
      f"outputs not aliased {_gib(p['output_bytes'] - p['alias_bytes'])}, code {_gib(p['code_bytes'])}"
      + (f", compiler peak {_gib(p['compiler_peak_bytes'])}" if "compiler_peak_bytes" in p else "")
      + (f"; host memory {_gib(p['host_bytes'])}" if p.get("host_bytes") else "")
    )
  elif "temp_bytes" in p:
    lines.append(f"TPU compiler: temporaries alone {_gib(p['temp_bytes'])}")
  verdict = "FITS" if p["fits"] else "DOES NOT FIT"
  lines.append(
    f"needs {_needed(p)} per device of {_gib(p['memory_per_device_bytes'])} ({_left(p)}): {verdict} "
    f"(compile {p['compile_seconds']:.1f} s)"
  )
  if "needed_without_offload_bytes" in p:
    lines.append(
      f"  with the optimiser state in HBM (optim.offload_state=False): "
      f"{_gib(p['needed_without_offload_bytes'])}"
    )
  elif p["fits"] and p.get("opt_state_bytes"):
    lines.append(
      f"  with optim.offload_state=True: about {_gib(p['needed_bytes'] - p['opt_state_bytes'])} "
      f"(the moments, {_gib(p['opt_state_bytes'])}, in host memory)"
    )
  if p.get("note"):
    lines.append(f"note: {p['note']}")
  if "roofline" in p:
    lines += format_roofline(p["roofline"])
  emb = p.get("embedding")
  if emb:
    now = emb["now"]
    lines.append(f"embedding wte {now['shape']}: {now['spec']}, {_gib(now['bytes_per_device'])} per device")
    for note in now["replicated_dims"]:
      lines.append(f"  replicated: {note}")
    if "padded_128" in emb:
      pad = emb["padded_128"]
      lines.append(
        f"  with model.vocab_pad_multiple=128: wte {pad['shape']}: {pad['spec']}, "
        f"{_gib(pad['bytes_per_device'])} per device"
        + ("" if pad["replicated_dims"] else ", nothing replicated")
      )
  return "\n".join(lines)


def format_ladder(rows: list[dict]) -> str:
  head = (
    f"{'rung':<12} {'params':>8} {'GFLOP/tok':>9} {'mesh d x f x t':<14} {'remat':<13} {'seq/dev':>7} "
    f"{'params':>10} {'opt':>10} {'temp':>10} {'needed':>11} {'capacity':>10} {'left/missing':>19}  "
    "fits  compile"
  )
  lines = [head, "-" * len(head)]
  for r in rows:
    if "error" in r:
      lines.append(f"{r['rung']:<12} error: {r['error']}")
      continue
    temp = _gib(r["temp_bytes"]) if "temp_bytes" in r else "?"
    m = r["mesh"]
    mesh = f"{m['data']} x {m['fsdp']} x {m['tensor']}"
    lines.append(
      f"{r['rung']:<12} {r['params'] / 1e6:>7.0f}M {r['flops_per_token'] / 1e9:>9.2f} {mesh:<14} "
      f"{r['remat']:<13} {r['sequences_per_device']:>7} "
      f"{_gib(r['params_bytes']):>10} {_gib(r['opt_state_bytes']):>10} {temp:>10} {_needed(r):>11} "
      f"{_gib(r['memory_per_device_bytes']):>10} {_left(r):>19}  "
      f"{'yes ' if r['fits'] else 'NO  '}  {r['compile_seconds']:.0f} s"
    )
  if rows and "note" in rows[0]:
    lines.append(f"note: {rows[0]['note']}")
  return "\n".join(lines)


def suggested_flags(best: dict) -> list[str]:
  """The --config.* overrides that reproduce a suggested plan (what --check then accepts)."""
  m = best["mesh"]
  out = [f"--config.mesh.{a}={m[a]}" for a in ("data", "fsdp", "tensor")]
  if m.get("slices", 1) > 1:
    out += [f"--config.mesh.dcn_data={m['dcn_data']}", f"--config.mesh.dcn_fsdp={m['dcn_fsdp']}"]
  return out + [
    f"--config.model.remat={best['remat']}",
    f"--config.train.grad_accum_steps={best['grad_accum_steps']}",
  ]


# ------------------------------------------------------------------- CLI


# --ladder's --config.* overrides when no --config=FILE is given: absl knows
# those flags only beside a config file, so they are taken out before parsing.
_LADDER_OVERRIDES: list[str] = []


def split_ladder_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """(argv for absl, --config.* overrides) for `--ladder` without --config; else (argv, [])."""
  has_config = any(a in ("--config", "-config") or a.startswith(("--config=", "-config=")) for a in argv)
  if "--ladder" not in argv or has_config:
    return argv, []
  rest, overrides, i = [], [], 0
  while i < len(argv):
    a = argv[i]
    if a.startswith("--config.") and "=" not in a and i + 1 < len(argv):
      overrides.append(f"{a}={argv[i + 1]}")  # The "--config.FIELD VALUE" form.
      i += 2
      continue
    (overrides if a.startswith("--config.") else rest).append(a)
    i += 1
  return rest, overrides


def cpu_device_flags(argv: list[str], xla_flags: str) -> str:
  """XLA_FLAGS with N fake CPU devices for --target=cpu:N (read when jax first
  lists devices, which the CLI has not done yet), unless already given."""
  targets = [a.split("=", 1)[1] for a in argv if a.startswith("--target=")]
  targets += [b for a, b in zip(argv, argv[1:]) if a == "--target"]
  match = re.fullmatch(r"cpu:([1-9]\d*)", targets[-1]) if targets else None
  if not match or "xla_force_host_platform_device_count" in xla_flags:
    return xla_flags
  return f"{xla_flags} --xla_force_host_platform_device_count={match.group(1)}".strip()


def main(argv) -> None:
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  F = flags.FLAGS
  as_json = F.json
  log = (lambda s: print(s, file=sys.stderr, flush=True)) if as_json else (lambda s: print(s, flush=True))
  if F.ladder:
    if not F.target:
      raise UserError("--ladder needs --target")
    overrides = _LADDER_OVERRIDES or [a for a in sys.argv[1:] if a.startswith("--config.")]
    configs_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    target = parse_target(F.target, F.num_slices)
    targets.cache_dir(F.cache_dir, target)
    rows = ladder(target, overrides, configs_dir, family=F.family, log=log)
    print(json.dumps(rows) if as_json else format_ladder(rows), flush=True)
    return
  if F.config is None:
    raise UserError("give --config=FILE (or --ladder --target=...)")
  config = config_lib.validate(F.config)
  if not F.target:
    if F.suggest or F.check:
      raise UserError("--suggest and --check need --target")
    p = aot.model_plan(config)
    print(json.dumps(p) if as_json else format_plan(p))
    return
  target = parse_target(F.target, F.num_slices)
  cache = targets.cache_dir(F.cache_dir, target)
  if F.suggest:
    result = suggest.suggest(
      config,
      target,
      saturation_tokens=F.saturation_tokens,
      search_mesh=F.search_mesh,
      cache_dir=cache,
      log=log,
    )
    best = result["best"]
    if best is not None:
      result["flags"] = suggested_flags(best)
    if as_json:
      print(json.dumps(result))
    elif best is None:
      print(f"nothing fits {target.spec}, not even 1 sequence per device with full remat: add devices")
    else:
      print(format_plan({**aot.model_plan(config), **best}))
      print(
        f"suggested ({best['sequences_per_device']} sequences per device per microbatch, "
        f"{len(result['trials'])} compiles in {result['seconds']:.0f} s):\n  " + " ".join(result["flags"])
      )
    if F.check and best is None:
      sys.exit(3)
    return
  p = plan_target(config, target, cross_check=F.cross_check, with_roofline=F.roofline)
  print(json.dumps(p) if as_json else format_plan(p), flush=True)
  if F.check and not p["fits"]:
    print(f"error: does not fit {target.spec}: needs {_needed(p)} per device", file=sys.stderr)
    sys.exit(3)


if __name__ == "__main__":
  # Defined only when run as a program, so importing the module defines no flags.
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/gpt2_xl.py.")
  flags.DEFINE_bool("json", False, "Print one JSON object instead of text.")
  flags.DEFINE_string(
    "target", "", "tpu:v5e:2x4, tpu:v5litepod-16, tpu:v5p-1024x2, cuda:h100[:N], cpu[:N]; empty: shapes."
  )
  flags.DEFINE_integer("num_slices", 1, "TPU slices of --target joined by the data-centre network.")
  flags.DEFINE_bool("suggest", False, "Search mesh x remat x per-device batch; print the best that fits.")
  flags.DEFINE_integer(
    "saturation_tokens", 4096, "--suggest: tokens per device per microbatch that keep the chip busy."
  )
  flags.DEFINE_bool("search_mesh", True, "--suggest also searches fsdp x tensor (else the config's mesh).")
  flags.DEFINE_bool("ladder", False, "Plan every rung of --family on --target with the --config.* overrides.")
  flags.DEFINE_string("family", "gpt2", f"--ladder's rungs: {', '.join(FAMILIES)} (configs/<rung>.py).")
  flags.DEFINE_bool("check", False, "Exit with status 3 if it does not fit (launch/* --preflight).")
  flags.DEFINE_bool("cross_check", True, "Also count FLOPs with XLA's cost analysis of unrolled models.")
  flags.DEFINE_bool("roofline", True, "TPU / GPU targets: the step's roofline (two small extra compiles).")
  flags.DEFINE_string(
    "cache_dir",
    "",
    "--suggest's record of each compile, and JAX's compilation cache for CPU / CUDA "
    "('' = ~/.cache/gpt_jax/plan_cache, 'none' = off).",
  )
  sys.argv, _LADDER_OVERRIDES = split_ladder_overrides(sys.argv)
  os.environ["XLA_FLAGS"] = cpu_device_flags(sys.argv, os.environ.get("XLA_FLAGS", ""))
  cli.run(main)

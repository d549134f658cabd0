"""A train step's roofline: collective bytes read from compiled HLO, and the time bounds they give.

`collectives(hlo_text)` counts, per chip and step, the collectives a compiled
(SPMD-partitioned) program runs, each multiplied by the trip counts of the
while loops around it (the layer scan, gradient accumulation). `estimate`
turns FLOPs, HBM bytes and collective bytes into the step's lower-bound
time, max(compute, HBM, ICI, DCN), and the MFU that bound allows.

Assumptions, stated where the figures are printed:
- Each collective's bytes on the wire per chip follow a ring over its group
  of n chips: all-gather (n-1)/n of the result, reduce-scatter (n-1)/n of
  the input, all-reduce twice that, all-to-all (n-1)/n, a collective-permute
  its buffer. They move at the chip's whole ICI bandwidth (hardware.py: all
  links, both directions), which real collectives on a torus approach only
  on its long axes: the ICI time is a lower bound.
- Across slices (multi-slice TPU jobs) the compiler emits the megascale
  runtime's send / recv pairs; their bytes move at the chip's share of the
  host's data-centre network (hardware.Chip.dcn_bandwidth).
- Loop trip counts come from each while loop's condition (counter < N); a
  loop the compiler peeled keeps one iteration outside, counted twice.
"""

from __future__ import annotations

import collections
import re

from gpt_jax import hardware

_DTYPE_BYTES = {
  "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
  "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8,
}  # fmt: skip
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_OP = re.compile(r"= (.*?) (" + "|".join(_KINDS) + r")(-start)?\(")
_MEGASCALE = re.compile(r"= \((.*?), u32\[\], token\[\]\) send\(.*_xla_megascale_transfer_type=\"(\w+)\"")
_HEADER = re.compile(r"^(?:ENTRY )?%([\w.\-]+) \(")
_CALLEES = re.compile(r"(?:calls|to_apply|body|condition|called_computations)=\{?%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


def _array_bytes(text: str) -> list[int]:
  out = []
  for dtype, dims in _ARRAY.findall(text):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    out.append(n * _DTYPE_BYTES[dtype])
  return out


def _group_size(line: str) -> int:
  """Chips per replica group: {{0,2,4,6},{1,3,5,7}} -> 4; the iota form [2,4]<=[8] -> 4; the mesh
  form mesh['axis_0'=4,'axis_1'=2,'axis_2'=1] {'axis_0','axis_1'} -> 8 (the listed axes)."""
  mesh = re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", line)
  if mesh:
    sizes = {name: int(n) for name, n in re.findall(r"'([^']+)'=(\d+)", mesh.group(1))}
    n = 1
    for name in re.findall(r"'([^']+)'", mesh.group(2)):
      n *= sizes.get(name, 1)
    return n
  iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line)
  if iota:
    return int(iota.group(2))
  groups = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
  return len(groups.group(1).split(",")) if groups else 1


def _computations(hlo: str) -> dict[str, list[str]]:
  comps, current = {}, None
  for line in hlo.splitlines():
    m = _HEADER.match(line)
    if m and line.rstrip().endswith("{"):
      current = m.group(1)
      comps[current] = []
    elif current is not None:
      comps[current].append(line)
  return comps


def _multipliers(comps: dict[str, list[str]]) -> dict[str, int]:
  """How many times each computation runs per step: the trip counts of the loops above it."""
  trips, callers = {}, collections.defaultdict(set)
  for name, lines in comps.items():
    for line in lines:
      loop = re.search(r" while\(.*condition=%([\w.\-]+), body=%([\w.\-]+)", line)
      if loop:
        cond = "\n".join(comps.get(loop.group(1), []))
        bounds = re.findall(r"constant\((\d+)\)", cond)
        trips[loop.group(2)] = int(bounds[0]) if len(bounds) == 1 and "direction=LT" in cond else 1
      for callee in _CALLEES.findall(line):
        callers[callee].add(name)
      for branches in _BRANCHES.findall(line):
        for callee in re.findall(r"%([\w.\-]+)", branches):
          callers[callee].add(name)
  memo: dict[str, int] = {}

  def runs(name: str, path: tuple = ()) -> int:
    if name in memo:
      return memo[name]
    if name in path:
      return 1
    ups = [runs(c, path + (name,)) for c in callers.get(name, ())]
    memo[name] = trips.get(name, 1) * (max(ups) if ups else 1)
    return memo[name]

  return {name: runs(name) for name in comps}


def collectives(hlo: str, num_slices: int = 1) -> dict[str, dict]:
  """{kind: {"count": ops per step, "bytes": buffer bytes, "wire_bytes": bytes each chip sends}}
  per chip per step, from compiled HLO text; kinds are _KINDS and "dcn" (across slices)."""
  comps = _computations(hlo)
  runs = _multipliers(comps)
  out = collections.defaultdict(lambda: {"count": 0, "bytes": 0.0, "wire_bytes": 0.0})

  def add(kind, k, size, wire):
    out[kind]["count"] += k
    out[kind]["bytes"] += k * size
    out[kind]["wire_bytes"] += k * wire

  for name, lines in comps.items():
    k = runs[name]
    for line in lines:
      dcn = _MEGASCALE.search(line)
      if dcn:  # The megascale runtime's transfers across slices (one send per reduction).
        size = sum(_array_bytes(dcn.group(1)))
        factor = 2 * (num_slices - 1) / num_slices if dcn.group(2) == "ALL_REDUCE" else 1.0
        add("dcn", k, size, size * factor)
        continue
      m = _OP.search(line)
      if not m:
        continue
      sizes = _array_bytes(m.group(1))
      # An async start returns (operands, results, scratch): its buffer once; else every result.
      size = max(sizes, default=0) if m.group(3) else sum(sizes)
      kind, n = m.group(2), _group_size(line)
      if kind == "all-reduce" and "reduce-scatter" in name:
        kind = "reduce-scatter"  # TPU lowers a reduce-scatter to an all-reduce in its own computation.
        wire = size * (n - 1) / n
      elif kind == "reduce-scatter":
        wire = size * (n - 1)  # The result is 1/n of the input.
      elif kind == "all-reduce":
        wire = size * 2 * (n - 1) / n
      elif kind == "collective-permute":
        wire = size
      else:
        wire = size * (n - 1) / n
      add(kind, k, size, wire)
  return dict(out)


def estimate(
  chip: hardware.Chip,
  *,
  flops: float,
  hbm_bytes: float,
  model_flops: float,
  ici_bytes: float = 0.0,
  dcn_bytes: float = 0.0,
) -> dict:
  """Lower bounds on one step's time per chip, and the MFU bound they allow.

  flops: executed per chip (recomputation included); model_flops: the
  model's per chip (PaLM's 6N + 12LHQT per token, no recomputation), what
  MFU counts; hbm_bytes: bytes the step moves through HBM per chip;
  ici_bytes / dcn_bytes: bytes each chip sends over ICI / DCN.
  """
  seconds = {
    "compute": flops / chip.peak_flops,
    "hbm": hbm_bytes / chip.hbm_bandwidth,
    "ici": ici_bytes / chip.interconnect_bandwidth,
    "dcn": dcn_bytes / chip.dcn_bandwidth if chip.dcn_bandwidth else 0.0,
  }
  bound = max(seconds, key=seconds.get)
  step = seconds[bound]
  return {
    "seconds": seconds,
    "bound": bound,
    "step_seconds": step,
    "mfu_bound": model_flops / (step * chip.peak_flops) if step else 0.0,
    "assumptions": {
      "peak_flops": chip.peak_flops,
      "hbm_bandwidth": chip.hbm_bandwidth,
      "ici_bandwidth": chip.interconnect_bandwidth,
      "dcn_bandwidth": chip.dcn_bandwidth,
    },
  }

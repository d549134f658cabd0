"""Accelerator facts, in one table: memory, peak FLOP/s, memory and interconnect bandwidth.

Used by the MFU arithmetic (metrics.py), the ahead-of-time planner (plan.py:
per-chip memory, compile-only targets, rooflines) and the benchmarks. Peak
FLOP/s are dense bfloat16 per chip. Sources: the Cloud TPU system
architecture pages (v4, v5e, v5p, v6e), NVIDIA's H100 / H200 / A100 SXM data
sheets. Interconnect figures count both directions (v4: 2,400 Gbit/s each way).
DCN: the data-centre network between TPU slices (multi-slice jobs), per chip:
the host's NICs shared by its chips (v5e: 2 x 100 Gbit/s per 8 chips, v6e:
4 x 200 per 8; v5p: 50 Gbit/s per chip, as the docs give it; v4: no figure
published per chip, 50 Gbit/s assumed like v5p); GPUs: one 400 Gbit/s
InfiniBand NIC per H100 / H200, 200 per A100.
"""

from __future__ import annotations

import dataclasses

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str  # "v5e", "h100": the name targets use (tpu:v5e:2x4, cuda:h100:8).
  platform: str  # "tpu" or "cuda".
  memory_bytes: int  # HBM per chip.
  peak_flops: float  # Dense bfloat16 FLOP/s per chip.
  hbm_bandwidth: float  # Bytes/s per chip.
  # Chip-to-chip bytes/s per chip, both directions together: ICI (TPU) or NVLink (GPU).
  interconnect_bandwidth: float
  device_kinds: tuple[str, ...]  # Lower-case substrings of jax's Device.device_kind.
  # TPU: accelerator-type names count TensorCores (v4-32 is 16 chips) when cores_per_chip is 2;
  # slices are 2-D or 3-D tori; v4's two TensorCores per chip are one "megacore" device.
  cores_per_chip: int = 1
  dims: int = 0
  chip_config: str = "default"
  dcn_bandwidth: float = 0.0  # Bytes/s per chip to other slices / nodes (see the module doc).
  # CUDA: what XLA's GPU compiler reads from a device (CUDA deviceQuery), for compile-only targets.
  gpu: dict | None = None


TPUS = {
  "v4": Chip(
    "v4", "tpu", 32 * GiB, 275e12, 1200e9, 600e9, ("tpu v4",),
    cores_per_chip=2, dims=3, chip_config="megacore", dcn_bandwidth=6.25e9,
  ),
  "v5e": Chip(
    "v5e", "tpu", 16 * GiB, 197e12, 819e9, 400e9, ("tpu v5 lite", "tpu v5e"), dims=2, dcn_bandwidth=3.125e9
  ),
  "v5p": Chip(
    "v5p", "tpu", 95 * GiB, 459e12, 2765e9, 1200e9, ("tpu v5p", "tpu v5"), cores_per_chip=2, dims=3,
    dcn_bandwidth=6.25e9,
  ),
  "v6e": Chip(
    "v6e", "tpu", 32 * GiB, 918e12, 1638e9, 800e9, ("tpu v6 lite", "tpu v6e"), dims=2, dcn_bandwidth=12.5e9
  ),
}  # fmt: skip
TPU_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e"}

# Memory as nvidia-smi reports it; H200 shares H100's SXM compute. NVLink 4 / 3: 900 / 600 GB/s.
GPUS = {
  "h100": Chip(
    "h100", "cuda", 85_045_477_376, 989e12, 3.35e12, 900e9, ("h100",), dcn_bandwidth=50e9,
    gpu=dict(name="NVIDIA H100 80GB HBM3", cc=(9, 0), sms=132, clock_ghz=1.98, l2=50 * 1024**2,
             smem_per_sm=233_472, smem_optin=232_448, fpus=128),
  ),
  "h200": Chip(
    "h200", "cuda", 150_754_820_096, 989e12, 4.8e12, 900e9, ("h200",), dcn_bandwidth=50e9,
    gpu=dict(name="NVIDIA H200", cc=(9, 0), sms=132, clock_ghz=1.98, l2=50 * 1024**2,
             smem_per_sm=233_472, smem_optin=232_448, fpus=128),
  ),
  "a100": Chip(
    "a100", "cuda", 85_899_345_920, 312e12, 2.039e12, 600e9, ("a100",), dcn_bandwidth=25e9,
    gpu=dict(name="NVIDIA A100-SXM4-80GB", cc=(8, 0), sms=108, clock_ghz=1.41, l2=40 * 1024**2,
             smem_per_sm=167_936, smem_optin=166_912, fpus=64),
  ),
}  # fmt: skip


def for_device_kind(device_kind: str) -> Chip | None:
  """The chip behind a jax device_kind ("TPU v5 lite", "NVIDIA H100 80GB HBM3"), or None."""
  kind = device_kind.lower()
  # The longest matching name first: "tpu v5" would also match a v5 lite.
  matches = [
    (len(k), chip) for chip in (*TPUS.values(), *GPUS.values()) for k in chip.device_kinds if k in kind
  ]
  return max(matches, key=lambda m: m[0])[1] if matches else None

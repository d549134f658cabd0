"""The accelerator table: jax device kinds map to the right chip, and its consumers read it."""

import pytest

from gpt_jax import hardware, plan

GiB = 2**30


@pytest.mark.parametrize(
  "device_kind, chip",
  [
    ("TPU v5 lite", "v5e"),  # jax's name for v5e: "tpu v5" is in it too, the longer match wins.
    ("TPU v5e", "v5e"),
    ("TPU v5", "v5p"),
    ("TPU v5p", "v5p"),
    ("TPU v4", "v4"),
    ("TPU v6 lite", "v6e"),
    ("NVIDIA H100 80GB HBM3", "h100"),
    ("NVIDIA H200", "h200"),
    ("NVIDIA A100-SXM4-80GB", "a100"),
    ("nvidia a100-sxm4-40gb", "a100"),
  ],
)
def test_device_kinds_map_to_their_chip(device_kind, chip):
  got = hardware.for_device_kind(device_kind)
  assert got is not None and got.name == chip
  assert got is {**hardware.TPUS, **hardware.GPUS}[chip]


@pytest.mark.parametrize("device_kind", ["cpu", "", "TPU v3", "NVIDIA GeForce RTX 4090", "Tesla V100-SXM2"])
def test_unknown_device_kinds_are_none(device_kind):
  assert hardware.for_device_kind(device_kind) is None


def test_table_entries_are_consistent():
  for table, platform in ((hardware.TPUS, "tpu"), (hardware.GPUS, "cuda")):
    for key, chip in table.items():
      assert chip.name == key and chip.platform == platform
      assert chip.memory_bytes > 8 * GiB and chip.peak_flops > 1e14 and chip.hbm_bandwidth > 5e11
      assert chip.device_kinds and all(k == k.lower() for k in chip.device_kinds)
      if platform == "tpu":
        assert chip.dims in (2, 3) and chip.cores_per_chip in (1, 2) and chip.gpu is None
      else:
        assert chip.dims == 0 and set(chip.gpu) >= {"name", "cc", "sms", "clock_ghz", "l2"}
        assert hardware.for_device_kind(chip.gpu["name"]) is chip  # Its own device name maps back.
  assert all(alias in hardware.TPUS for alias in hardware.TPU_ALIASES.values())
  # Figures from the data sheets (dense bf16 per chip; HBM per chip).
  assert (hardware.TPUS["v5e"].memory_bytes, hardware.TPUS["v5e"].peak_flops) == (16 * GiB, 197e12)
  assert (hardware.TPUS["v4"].memory_bytes, hardware.TPUS["v4"].peak_flops) == (32 * GiB, 275e12)
  assert hardware.GPUS["h100"].peak_flops == hardware.GPUS["h200"].peak_flops == 989e12


@pytest.mark.parametrize("gen", sorted(hardware.TPUS))
def test_planner_tpu_targets_read_the_table(gen):
  chip = hardware.TPUS[gen]
  shape = "2x2x1" if chip.dims == 3 else "2x2"
  t = plan.parse_target(f"tpu:{gen}:{shape}")
  assert (t.platform, t.kind, t.num_devices) == ("tpu", gen, 4)
  assert (t.memory_bytes, t.peak_flops) == (chip.memory_bytes, chip.peak_flops)


@pytest.mark.parametrize("kind", sorted(hardware.GPUS))
def test_planner_gpu_targets_read_the_table(kind):
  chip = hardware.GPUS[kind]
  t = plan.parse_target(f"cuda:{kind}:2")
  assert (t.platform, t.kind, t.num_devices) == ("cuda", kind, 2)
  assert (t.memory_bytes, t.peak_flops) == (chip.memory_bytes, chip.peak_flops)
  assert f'device_description_str: "{chip.gpu["name"]}"' in plan.gpu_target_config(kind)

"""The planner: targets, per-device memory from the compiled train step, FLOPs cross-check, suggestions.

The CPU path always runs (conftest's 8 fake devices). TPU and CUDA targets run
in a subprocess when their compiler is installed (libtpu / the jax CUDA
plugin) and are skipped with the reason otherwise.
"""

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from configs import debug
from gpt_jax import cli, errors, model, optim, plan, pretrain, train
from gpt_jax import config as config_lib
from gpt_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------- targets


@pytest.mark.parametrize(
  "name, topology",
  [
    ("v5e:2x4", "v5e:2x4"),
    ("v5litepod-16", "v5e:4x4"),
    ("v5litepod-8", "v5e:2x4"),
    ("v6e-64", "v6e:8x8"),
    ("v4-32", "v4:2x2x4"),  # v4 names count TensorCores: 32 cores = 16 chips.
    ("v5p-8", "v5p:2x2x1"),
    ("v4:2x2", "v4:2x2x1"),  # A 2-D shape of a 3-D generation: one layer deep.
  ],
)
def test_tpu_names_map_to_topologies(name, topology):
  assert plan.tpu_topology(name) == topology


def test_parse_target():
  t = plan.parse_target("tpu:v5litepod-16")
  assert (t.platform, t.kind, t.num_devices, t.memory_bytes) == ("tpu", "v5e", 16, 16 * 2**30)
  t = plan.parse_target("cuda:h100")
  assert (t.platform, t.num_devices, t.peak_flops) == ("cuda", 8, 989e12)
  assert plan.parse_target("cuda:a100:16").num_devices == 16
  assert plan.parse_target("cpu:4").num_devices == 4
  bad_targets = ["tpu:v9-8", "tpu:v5e:2x", "cuda:k80", "gpu:h100", "tpu:v5litepod-12", "tpu:v5e:0x4"]
  bad_targets += [
    "tpu:v5e:2x2x2",
    "tpu:v4:2x2x2x2",
    "cpu:abc",
    "cpu:0",
    "cpu:-1",
    "cuda:h100:abc",
    "cuda:h100:0",
  ]
  for bad in bad_targets:
    with pytest.raises(UserError):
      plan.parse_target(bad)


def test_gpu_target_description_carries_the_chip_facts():
  text = plan.gpu_target_config("h100")
  assert "core_count: 132" in text and "cuda_compute_capability { major: 9 minor: 0 }" in text
  assert 'device_description_str: "NVIDIA H100 80GB HBM3"' in text
  assert "device_memory_size: 85045477376" in text


def test_tpu_out_of_memory_messages_are_parsed():
  msg = (
    "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. "
    "Used 56.02G of 15.75G hbm. Exceeded hbm capacity by 40.27G."
  )
  assert plan._parse_oom(msg) == ("total", pytest.approx(56.02 * 2**30), pytest.approx(15.75 * 2**30))
  msg = (
    "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
    "(24.29G) exceeds available HBM (15.75G)."
  )
  assert plan._parse_oom(msg) == ("temporaries", pytest.approx(24.29 * 2**30), pytest.approx(15.75 * 2**30))
  assert plan._parse_oom("INTERNAL: something else") is None


# ---------------------------------------------------------- cpu compile


def _fsdp_debug():
  config = config_lib.validate(debug.get_config())
  config.mesh.update(data=1, fsdp=8)
  return config


def test_cpu_plan_counts_sharded_bytes_like_the_compiler():
  config = _fsdp_debug()
  p = plan.compile_plan(config, plan.parse_target("cpu:8"))
  # By hand from the logical names: FSDP splits every "embed" dimension 8 ways
  # (32 / 8), everything else is replicated; Adam keeps two float32 moments.
  shapes = nn.unbox(model.abstract_params(config.model))
  specs = model.logical_specs(config.model)
  expected = 0
  for x, spec in zip(
    jax.tree.leaves(shapes), jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, PartitionSpec))
  ):
    expected += int(np.prod(x.shape)) * 4 // (8 if "embed" in tuple(spec) else 1)
  assert p["params_bytes"] == expected
  assert 2 * expected <= p["opt_state_bytes"] <= 2 * expected + 64  # + step counters
  # The compiler's argument buffers are exactly params + optimiser state + the
  # batch shard + a few scalars (step, rng, counters).
  batch_bytes = 8 * 33 * 4 // 8
  extra = p["argument_bytes"] - p["params_bytes"] - p["opt_state_bytes"] - batch_bytes
  assert 0 <= extra <= 64, p
  assert p["fits"] and p["sequences_per_device"] == 1 and p["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert p["needed_bytes"] >= p["argument_bytes"] + p["temp_bytes"] - p["alias_bytes"]
  assert "not representative" in p["note"]


def test_cudnn_attention_is_planned_for_gpu_targets_only():
  config = _fsdp_debug()
  config.model.update(attention_impl="cudnn", dtype="bfloat16")
  config_lib.validate(config)
  with pytest.raises(errors.ConfigError, match=r"runs on NVIDIA GPUs only, not --target=cpu:8"):
    plan.compile_plan(config, plan.parse_target("cpu:8"))
  # Shapes and the FLOPs formula need no cuDNN.
  assert plan.plan(config)["params"] == plan.plan(_fsdp_debug())["params"]


def test_finetune_configs_say_what_is_planned():
  p = plan.plan(cli.load_config(str(ROOT / "configs" / "finetune_rte.py")))
  assert p["job_note"].startswith("job=finetune: planned as the language-model train step")
  assert "note: job=finetune" in plan.format_plan(p)
  assert "job_note" not in plan.plan(cli.load_config(str(ROOT / "configs" / "gpt2_small.py")))


def test_embedding_layout_reports_replicated_vocab_and_padding():
  config = _fsdp_debug()
  config.model.vocab_size = 321  # Not divisible by tensor=2.
  config.mesh.update(fsdp=4, tensor=2)
  mesh = jax.make_mesh((1, 4, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
  emb = plan.embedding_layout(config, mesh)
  assert emb["now"]["shape"] == [321, 32] and emb["now"]["spec"] == str(PartitionSpec(None, "fsdp"))
  assert any("wte" in note and "321" in note for note in emb["now"]["replicated_dims"])
  pad = emb["padded_128"]
  assert pad["shape"] == [384, 32] and pad["spec"] == str(PartitionSpec("tensor", "fsdp"))
  assert pad["bytes_per_device"] < emb["now"]["bytes_per_device"]


def test_scan_is_counted_once_and_the_cross_check_matches_the_formula():
  config = config_lib.validate(debug.get_config())
  config.model.update(num_layers=3, d_model=128, num_heads=4, vocab_size=256, block_size=64)
  seq = config_lib.seq_len(config)

  def lowered_flops(cfg):
    tx = optim.make_optimizer(cfg)
    step = train.make_train_step(pretrain.lm_loss_fn(cfg.model), tx, optim.lr_schedule(cfg.optim, 10))
    params = jax.eval_shape(lambda: model.init_params(cfg.model, jax.random.key(0)))
    state = jax.eval_shape(lambda p: train.new_state(p, tx, 0), params)
    batch = {"tokens": jax.ShapeDtypeStruct((1, seq + 1), jnp.int32)}
    return jax.jit(step).lower(state, batch).cost_analysis()["flops"] / seq

  unrolled = lowered_flops(config)
  scanned_cfg = copy.deepcopy(config)
  scanned_cfg.model.scan_layers = True
  # The trap the planner avoids: a scanned stack's cost counts one layer.
  assert lowered_flops(scanned_cfg) < 0.6 * unrolled
  # 1- and 2-layer lowerings extrapolate exactly to the 3-layer model...
  assert plan.xla_flops_per_token(config)["xla_flops_per_token"] == pytest.approx(unrolled, rel=1e-6)
  # ...which agrees with the PaLM formula up to the non-matmul work (softmax, LayerNorm, Adam).
  formula = plan.plan(config)["flops_per_token"]
  assert 1.0 <= unrolled / formula < 1.15


def test_suggest_ranks_batch_until_saturation_then_less_recompute():
  def trial(remat, seqs, fits=True):
    return {"remat": remat, "sequences_per_device": seqs, "fits": fits}

  trials = [
    trial("none", 1),
    trial("none", 2, fits=False),
    trial("dots_saveable", 4),
    trial("dots_saveable", 8, fits=False),
    trial("full", 16),
  ]
  # 4 x 1024 tokens saturate: dots_saveable at 4 beats full remat at 16.
  assert plan.best_setting(trials, 1024, 4096) is trials[2]
  # Below saturation the larger batch wins despite the recompute.
  assert plan.best_setting(trials, 1024, 16384) is trials[4]
  assert plan.best_setting([trial("full", 1, fits=False)], 1024, 4096) is None


def test_suggest_doubles_the_batch_per_policy_until_it_does_not_fit(monkeypatch):
  # A memory model instead of compiles: fixed bytes + bytes per sequence,
  # less activation memory the more a policy recomputes.
  per_seq = {"none": 5.0, "dots_saveable": 2.0, "full": 0.5}
  calls = []

  def fake_compile(config, target, devices):
    seqs = config.train.batch_size // config.train.grad_accum_steps // 8
    calls.append((config.model.remat, seqs, config.train.grad_accum_steps))
    needed = 4.0 + per_seq[config.model.remat] * seqs
    return {
      "remat": config.model.remat,
      "sequences_per_device": seqs,
      "fits": needed <= 16.0,
      "needed_bytes": needed,
      "compile_seconds": 0.0,
    }

  monkeypatch.setattr(plan, "compile_plan", fake_compile)
  config = _fsdp_debug()
  config.train.batch_size = 256  # 32 sequences per device at most.
  result = plan.suggest(config, plan.parse_target("cpu:8"), saturation_tokens=8 * 32, log=lambda s: None)
  assert calls == [
    ("none", 1, 32), ("none", 2, 16), ("none", 4, 8),  # 24 > 16: stop
    ("dots_saveable", 1, 32), ("dots_saveable", 2, 16), ("dots_saveable", 4, 8), ("dots_saveable", 8, 4),
    ("full", 1, 32), ("full", 2, 16), ("full", 4, 8), ("full", 8, 4), ("full", 16, 2), ("full", 32, 1),
  ]  # fmt: skip
  # Saturation at 8 sequences of 32 tokens: only full remat gets there (dots_saveable
  # stops at 4); then the larger batch of the two that fit.
  assert (result["best"]["remat"], result["best"]["sequences_per_device"]) == ("full", 16)

  # 24 sequences a device: after the powers of two that divide it, the whole batch (no accumulation).
  calls.clear()
  config.train.batch_size = 8 * 24
  plan.suggest(config, plan.parse_target("cpu:8"), log=lambda s: None)
  full = [c for c in calls if c[0] == "full"]
  assert full == [("full", 1, 24), ("full", 2, 12), ("full", 4, 6), ("full", 8, 3), ("full", 24, 1)]
  # A global batch the data-parallel devices cannot split is named as such (nothing compiles).
  calls.clear()
  config.train.batch_size = 4
  with pytest.raises(UserError, match=r"train.batch_size=4 must be a multiple of data x fsdp = 8"):
    plan.suggest(config, plan.parse_target("cpu:8"), log=lambda s: None)
  assert calls == []


def test_ladder_applies_the_overrides_to_every_rung(monkeypatch):
  seen = []

  def fake_plan_target(config, target, cross_check):
    seen.append((config.model.num_layers, config.mesh.fsdp, config.mesh.data))
    return {**plan.plan(config), "mesh": dict(config.mesh), "remat": config.model.remat,
            "sequences_per_device": 1, "params_bytes": 1, "opt_state_bytes": 2, "temp_bytes": 3,
            "needed_bytes": 6, "fits": True, "compile_seconds": 0.0}  # fmt: skip

  monkeypatch.setattr(plan, "plan_target", fake_plan_target)
  monkeypatch.setattr(plan, "RUNGS", ("debug", "gpt2_small"))
  rows = plan.ladder(plan.parse_target("cpu:8"), ["--config.mesh.fsdp=8", "--config.mesh.data=1"],
                     str(ROOT / "configs"), log=lambda s: None)  # fmt: skip
  assert seen == [(2, 8, 1), (12, 8, 1)]
  table = plan.format_ladder(rows).splitlines()
  assert table[2].startswith("debug") and table[3].startswith("gpt2_small") and "124M" in table[3]


def test_cli_makes_the_fake_cpu_devices_its_target_names():
  assert plan.cpu_device_flags(["plan", "--target=cpu:8"], "") == "--xla_force_host_platform_device_count=8"
  assert plan.cpu_device_flags(["plan", "--target", "cpu:4"], "--xla_dump_to=/tmp/x") == (
    "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=4"
  )
  given = "--xla_force_host_platform_device_count=2"
  assert plan.cpu_device_flags(["plan", "--target=cpu:8"], given) == given  # The user's own wins.
  assert plan.cpu_device_flags(["plan", "--target=tpu:v5e:2x2"], "") == ""


def test_ladder_takes_overrides_without_a_config_file():
  argv = ["plan", "--ladder", "--target=cpu:8", "--config.mesh.fsdp=8", "--json"]
  assert plan.split_ladder_overrides(argv) == (
    ["plan", "--ladder", "--target=cpu:8", "--json"],
    ["--config.mesh.fsdp=8"],
  )
  # Beside a config file absl parses them itself; without --ladder they are left alone.
  with_file = ["plan", "--ladder", "--config=configs/debug.py", "--config.mesh.fsdp=8"]
  assert plan.split_ladder_overrides(with_file) == (with_file, [])
  assert plan.split_ladder_overrides(argv[:1] + argv[2:]) == (argv[:1] + argv[2:], [])
  # Through the CLI: the override reaches the rungs, so a field no config has is one error line.
  r = _run_plan("--ladder", "--target=cpu:2", "--config.mesh.fsdp=2", "--config.model.no_such=1")
  assert r.returncode == 2, r.stderr[-2000:]
  assert r.stderr.strip().splitlines()[-1] == (
    "error: --config.model.no_such: no such config field (see configs/base.py)"
  )
  # "--config.FIELD VALUE" as absl takes it (values of the wrong type: tests/test_cli.py).
  assert plan.split_ladder_overrides(["plan", "--ladder", "--config.train.batch_size", "8"]) == (
    ["plan", "--ladder"],
    ["--config.train.batch_size=8"],
  )


# ------------------------------------------------- tpu / cuda (optional)


def _subprocess_env():
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
  env.pop("XLA_FLAGS", None)
  env.pop("JAX_PLATFORMS", None)
  return env


def _run_plan(*args, timeout=600):
  return subprocess.run(
    [sys.executable, "-m", "gpt_jax.plan", *args],
    cwd=ROOT,
    env=_subprocess_env(),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


HAS_LIBTPU = bool(os.environ.get("TPU_LIBRARY_PATH")) or importlib.util.find_spec("libtpu") is not None
HAS_CUDA_PLUGIN = importlib.util.find_spec("jax_cuda12_plugin") is not None


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:  # Its parent package ("nvidia") is missing.
    return False


HAS_CUDNN = HAS_CUDA_PLUGIN and _installed("nvidia.cudnn")


@pytest.mark.slow
@pytest.mark.skipif(
  not HAS_LIBTPU, reason="libtpu not installed (pip install libtpu, or set TPU_LIBRARY_PATH)"
)
def test_tpu_compile_only_plan_and_its_hard_memory_check():
  r = _run_plan("--config=configs/debug.py", "--target=tpu:v5e:2x2", "--json", "--nocross_check")
  assert r.returncode == 0, r.stderr[-3000:]
  p = json.loads(r.stdout)
  assert p["device_kind"].startswith("TPU v5") and p["devices"] == 4 and p["fits"]
  assert p["memory_per_device_bytes"] == 16 * 2**30
  assert p["needed_bytes"] >= p.get("compiler_peak_bytes", 0) > 0
  # v4 chips are one (megacore) device each: v4-8 is 4 devices.
  r = _run_plan("--config=configs/debug.py", "--target=tpu:v4-8", "--json", "--nocross_check")
  assert r.returncode == 0, r.stderr[-3000:]
  p = json.loads(r.stdout)
  assert p["device_kind"].startswith("TPU v4") and p["devices"] == 4 and p["fits"]
  # 2M sequences: the logits alone need ~21 GiB per chip; the TPU compiler refuses.
  big = "--config.train.batch_size=2097152"
  r = _run_plan("--config=configs/debug.py", "--target=tpu:v5e:2x2", big, "--nocross_check", "--check")
  assert r.returncode == 3, r.stderr[-3000:]
  assert "DOES NOT FIT" in r.stdout and "ran out of HBM" in r.stdout


@pytest.mark.slow
@pytest.mark.skipif(
  not HAS_CUDA_PLUGIN, reason="jax CUDA plugin not installed (pip install jax-cuda12-plugin)"
)
def test_cuda_compile_only_plan():
  r = _run_plan("--config=configs/debug.py", "--target=cuda:h100:2", "--json", "--nocross_check")
  assert r.returncode == 0, r.stderr[-3000:]
  p = json.loads(r.stdout)
  assert p["device_kind"] == "NVIDIA H100 80GB HBM3" and p["devices"] == 2 and p["fits"]
  assert p["argument_bytes"] >= p["params_bytes"] + p["opt_state_bytes"]


_CUDNN_STEP = """
import re
from configs import debug
from gpt_jax import config as config_lib, plan, pretrain, sharding
config = config_lib.validate(debug.get_config())
m = config.model
m.update(attention_impl="cudnn", dtype="bfloat16", attention_pattern=("dense", "local"), local_window=8)
config = config_lib.validate(config)
devices = plan.target_devices(plan.parse_target("cuda:h100:2"))
mesh = sharding.make_mesh(config.mesh, devices)
program, batch, _ = pretrain.train_program(config, mesh)
with sharding.activate(mesh, sharding.rules(config)):
  hlo = program.step.lower(program.abstract, batch).compile().as_text()
print(sorted(re.findall(r'custom_call_target="(__cudnn[^"]*)"', hlo)))
"""


@pytest.mark.slow
@pytest.mark.skipif(
  not HAS_CUDNN,
  reason="jax CUDA plugin or cuDNN not installed (pip install jax-cuda12-plugin nvidia-cudnn-cu12)",
)
def test_cudnn_attention_compiles_to_cudnn_kernels_for_h100():
  # The train step of a dense + local model, compiled for H100s without a GPU:
  # each layer's attention is one cuDNN fused kernel forward and one backward.
  r = subprocess.run(
    [sys.executable, "-c", _CUDNN_STEP], cwd=ROOT, env=_subprocess_env(), capture_output=True, text=True
  )
  assert r.returncode == 0, r.stderr[-3000:]
  kernels = json.loads(r.stdout.strip().splitlines()[-1].replace("'", '"'))
  assert kernels == ["__cudnn$fmhaSoftmax"] * 2 + ["__cudnn$fmhaSoftmaxBackward"] * 2

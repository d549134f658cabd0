"""The planner: targets, per-device memory from the compiled train step, FLOPs cross-check, suggestions.

The CPU path always runs (conftest's 8 fake devices). TPU and CUDA targets run
in a subprocess when their compiler is installed (libtpu / the jax CUDA
plugin) and are skipped with the reason otherwise.
"""

import copy
import dataclasses
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
from gpt_jax import aot, cli, errors, model, optim, plan, pretrain, suggest, targets, train
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
  assert targets.tpu_topology(name) == topology


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
  assert aot.parse_oom(msg) == ("total", pytest.approx(56.02 * 2**30), pytest.approx(15.75 * 2**30))
  msg = (
    "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
    "(24.29G) exceeds available HBM (15.75G)."
  )
  assert aot.parse_oom(msg) == ("temporaries", pytest.approx(24.29 * 2**30), pytest.approx(15.75 * 2**30))
  assert aot.parse_oom("INTERNAL: something else") is None


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
  assert aot.model_plan(config)["params"] == aot.model_plan(_fsdp_debug())["params"]


def test_finetune_configs_say_what_is_planned():
  p = aot.model_plan(cli.load_config(str(ROOT / "configs" / "finetune_rte.py")))
  assert p["job_note"].startswith("job=finetune: planned as the language-model train step")
  assert "note: job=finetune" in plan.format_plan(p)
  assert "job_note" not in aot.model_plan(cli.load_config(str(ROOT / "configs" / "gpt2_small.py")))


def test_embedding_layout_reports_replicated_vocab_and_padding():
  config = _fsdp_debug()
  config.model.vocab_size = 321  # Not divisible by tensor=2.
  config.mesh.update(fsdp=4, tensor=2)
  mesh = jax.make_mesh((1, 4, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
  emb = aot.embedding_layout(config, mesh)
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
  assert aot.xla_flops_per_token(config)["xla_flops_per_token"] == pytest.approx(unrolled, rel=1e-6)
  # ...which agrees with the PaLM formula up to the non-matmul work (softmax, LayerNorm, Adam).
  formula = aot.model_plan(config)["flops_per_token"]
  assert 1.0 <= unrolled / formula < 1.15


def test_suggest_ranks_batch_until_saturation_then_less_recompute():
  def trial(remat, seqs, fits=True, tensor=1):
    return {"remat": remat, "sequences_per_device": seqs, "fits": fits, "mesh": {"tensor": tensor}}

  trials = [
    trial("none", 1),
    trial("none", 2, fits=False),
    trial("dots_saveable", 4),
    trial("dots_saveable", 8, fits=False),
    trial("full", 16),
  ]
  # 4 x 1024 tokens saturate: dots_saveable at 4 beats full remat at 16.
  assert suggest.best_setting(trials, 1024, 4096) is trials[2]
  # Below saturation the larger batch wins despite the recompute.
  assert suggest.best_setting(trials, 1024, 16384) is trials[4]
  assert suggest.best_setting([trial("full", 1, fits=False)], 1024, 4096) is None
  # Same tokens and recompute: less tensor parallelism (fewer activation all-reduces) wins.
  pair = [trial("none", 4, tensor=2), trial("none", 4)]
  assert suggest.best_setting(pair, 1024, 4096) is pair[1]


def _memory_model(calls, per_seq, capacity=16.0):
  """A compile_plan stand-in: fixed bytes + bytes per sequence (fewer the more a policy
  recomputes, and split over tensor parallelism)."""

  def fake_compile(config, target, devices):
    dp = config.mesh.data * config.mesh.fsdp
    seqs = config.train.batch_size // config.train.grad_accum_steps // dp
    mesh = {a: config.mesh[a] for a in ("data", "fsdp", "tensor")}
    calls.append((mesh["tensor"], config.model.remat, seqs, config.train.grad_accum_steps))
    needed = 4.0 + per_seq[config.model.remat] * seqs / mesh["tensor"]
    return {"remat": config.model.remat, "sequences_per_device": seqs, "mesh": mesh,
            "fits": needed <= capacity, "needed_bytes": needed,
            "grad_accum_steps": config.train.grad_accum_steps, "compile_seconds": 0.0}  # fmt: skip

  return fake_compile


def test_suggest_bisects_the_batch_and_stops_at_saturation(monkeypatch, tmp_path):
  per_seq = {"none": 5.0, "dots_saveable": 2.0, "attention_saveable": 1.0, "full": 0.5}
  calls = []
  monkeypatch.setattr(aot, "compile_plan", _memory_model(calls, per_seq))
  config = _fsdp_debug()
  config.train.batch_size = 256  # 32 sequences per device on fsdp 8.
  lines = []
  result = suggest.suggest(config, plan.parse_target("cpu:8"), saturation_tokens=8 * 32, log=lines.append)
  # heads 4 and d_model 32 on 8 devices: fsdp 8, fsdp 4 x tensor 2, fsdp 2 x tensor 4.
  assert [m["tensor"] for m in suggest.mesh_candidates(config, plan.parse_target("cpu:8"))] == [1, 2, 4]
  # Saturation (8 sequences of 32 tokens) under each policy, least recompute first: on fsdp 8
  # attention_saveable is the first to fit (12 <= 16); full remat is never compiled. Tensor
  # parallelism splits the bytes per sequence: on fsdp 4 x tensor 2 dots_saveable fits (12), on
  # fsdp 2 x tensor 4 "none" does (14) and wins (no recompute beats less tensor parallelism).
  assert calls == [
    (1, "none", 8, 4), (1, "dots_saveable", 8, 4), (1, "attention_saveable", 8, 4),
    (2, "none", 8, 8), (2, "dots_saveable", 8, 8),
    (4, "none", 8, 16),
  ]  # fmt: skip
  best = result["best"]
  assert (best["mesh"]["tensor"], best["remat"], best["sequences_per_device"]) == (4, "none", 8)
  assert best == suggest.best_setting(result["trials"], 32, 8 * 32)

  # A plan saturating with no recompute on the first mesh: the other meshes compile nothing.
  calls.clear()
  per_seq["none"] = 1.0
  suggest.suggest(config, plan.parse_target("cpu:8"), saturation_tokens=8 * 32, log=lines.append)
  assert calls == [(1, "none", 8, 4)]
  per_seq["none"] = 5.0

  # A repeated search reads each compile's record from the cache: nothing is compiled again.
  calls.clear()
  kwargs = dict(saturation_tokens=8 * 32, cache_dir=str(tmp_path / "cache"), log=lines.append)
  first = suggest.suggest(config, plan.parse_target("cpu:8"), **kwargs)
  assert len(calls) == 6
  again = suggest.suggest(config, plan.parse_target("cpu:8"), **kwargs)
  assert len(calls) == 6 and again["best"] == {**first["best"], "cached": True}
  assert lines[-1].endswith("left") and "(cached)" in lines[-1]

  # Nothing fits at saturation: bisect below it with full remat, then the lighter policies there.
  calls.clear()
  per_seq.update(full=1.6, attention_saveable=1.8)
  result = suggest.suggest(
    config, plan.parse_target("cpu:8"), saturation_tokens=8 * 32, search_mesh=False, log=lines.append
  )
  assert calls == [
    (1, "none", 8, 4), (1, "dots_saveable", 8, 4), (1, "attention_saveable", 8, 4), (1, "full", 8, 4),
    (1, "full", 2, 16), (1, "full", 4, 8),  # 4 + 1.6 x 4 fits; 8 did not.
    (1, "none", 4, 8), (1, "dots_saveable", 4, 8),  # 24 does not fit, 12 does.
  ]  # fmt: skip
  assert (result["best"]["remat"], result["best"]["sequences_per_device"]) == ("dots_saveable", 4)
  assert all("so far" in line and "left" in line for line in lines if line.startswith("  ["))

  # A global batch that no mesh's data-parallel devices split is named as such (nothing compiles).
  calls.clear()
  config.train.batch_size = 1
  with pytest.raises(UserError, match=r"train.batch_size=1 splits over none of the meshes"):
    suggest.suggest(config, plan.parse_target("cpu:8"), log=lambda s: None)
  assert calls == []


def test_suggest_batch_sizes_and_slices():
  assert suggest.batch_sizes(24 * 8, 8) == [1, 2, 4, 8, 24]
  assert suggest.batch_sizes(32 * 8, 8) == [1, 2, 4, 8, 16, 32]
  config = config_lib.validate(cli.load_config(str(ROOT / "configs" / "gpt3_175b.py")))
  two = targets.parse_target("tpu:v5p-1024x2")
  assert (two.num_devices, two.num_slices, two.topology) == (1024, 2, "v5p:8x8x8")
  assert targets.parse_target("tpu:v5p-1024", num_slices=2) == dataclasses.replace(two, spec="tpu:v5p-1024")
  meshes = suggest.mesh_candidates(config, two)
  # 96 heads, d_model 12288 on 512 chips a slice: tensor 1, 2, 4, 8, 16 (32 does not divide 96 heads... it
  # does not divide 512 / 16 either way: capped at 16); data over the slices.
  assert [m["tensor"] for m in meshes] == [1, 2, 4, 8, 16]
  assert all(m["fsdp"] * m["tensor"] == 512 and m["dcn_data"] == -1 for m in meshes)


def test_suggested_plan_is_one_check_accepts():
  r = _run_plan("--config=configs/debug.py", "--target=cpu:8", "--suggest", "--json", "--cache_dir=none")
  assert r.returncode == 0, r.stderr[-3000:]
  result = json.loads(r.stdout)
  best, flags = result["best"], result["flags"]
  assert best["fits"] and "[1] fsdp=8" in r.stderr and "left" in r.stderr  # Progress with an ETA.
  r = _run_plan("--config=configs/debug.py", "--target=cpu:8", "--check", "--json", "--nocross_check", *flags)
  assert r.returncode == 0, r.stderr[-3000:]
  p = json.loads(r.stdout)
  assert p["fits"] and p["mesh"] == best["mesh"] and p["remat"] == best["remat"]
  assert p["sequences_per_device"] == best["sequences_per_device"]


def test_ladder_applies_the_overrides_to_every_rung(monkeypatch):
  seen = []

  def fake_plan_target(config, target, cross_check, with_roofline):
    seen.append((config.model.num_layers, config.mesh.fsdp, config.mesh.data))
    return {**aot.model_plan(config), "mesh": dict(config.mesh), "remat": config.model.remat,
            "sequences_per_device": 1, "params_bytes": 1, "opt_state_bytes": 2, "temp_bytes": 3,
            "needed_bytes": 6, "fits": True, "compile_seconds": 0.0, "memory_per_device_bytes": 16,
            "left_bytes": 10}  # fmt: skip

  monkeypatch.setattr(plan, "plan_target", fake_plan_target)
  monkeypatch.setitem(plan.FAMILIES, "gpt2", ("debug", "gpt2_small"))
  rows = plan.ladder(plan.parse_target("cpu:8"), ["--config.mesh.fsdp=8", "--config.mesh.data=1"],
                     str(ROOT / "configs"), log=lambda s: None)  # fmt: skip
  assert seen == [(2, 8, 1), (12, 8, 1)]
  table = plan.format_ladder(rows).splitlines()
  assert table[2].startswith("debug") and table[3].startswith("gpt2_small") and "124M" in table[3]
  assert "1 x 8 x 1" in table[3] and "left 10 B" in table[3]
  # Every rung of every family is a config file; the GPT-3 family in Table 2.1's order.
  for family, rungs in plan.FAMILIES.items():
    assert all((ROOT / "configs" / f"{r}.py").is_file() for r in rungs), family
  assert plan.FAMILIES["gpt3"][-1] == "gpt3_175b"


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
  not HAS_LIBTPU, reason="libtpu not installed (pip install libtpu, or set TPU_LIBRARY_PATH)"
)
def test_tpu_multi_slice_plan_has_data_across_slices_and_a_roofline():
  args = ["--config=configs/debug.py", "--target=tpu:v5litepod-8x2", "--json", "--nocross_check"]
  args += ["--config.train.batch_size=32", "--config.mesh.data=1", "--config.mesh.fsdp=8", "--cache_dir=none"]
  r = _run_plan(*args)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "could not determine TPU accelerator type" not in r.stderr
  p = json.loads(r.stdout)
  assert p["devices"] == 16 and p["fits"]
  assert p["mesh"] == {"data": 2, "fsdp": 8, "tensor": 1, "slices": 2, "dcn_data": 2, "dcn_fsdp": 1}
  roof = p["roofline"]
  # The gradients cross the slices once a step (megascale transfers), FSDP's gathers stay on ICI.
  assert roof["collectives"]["dcn"]["count"] > 0 and roof["collectives"]["all-gather"]["count"] > 0
  assert roof["dcn_bytes_per_chip"] > 0 and roof["ici_bytes_per_chip"] > 0
  assert 0 < roof["mfu_bound"] < 1 and roof["step_seconds"] == max(roof["seconds"].values())


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

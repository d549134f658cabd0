"""The TPU splash-attention kernel (gpt_jax/tpu_attention.py).

On CPU the kernel runs in Pallas' interpreter (the same kernel body, its
block skipping and masks, run as XLA ops): its output and gradients must equal
the model's einsum attention. On the TPU compiler (compile-only, libtpu), the
train step must hold the kernel's custom calls.
"""

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

from gpt_jax import model, model_config, plan, sharding, tpu_attention
from gpt_jax.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
# 384 positions: three 128-wide tiles, so a band of 64 leaves whole tiles that the kernel skips.
B, T, H, K = 2, 384, 2, 32


class _Einsum(nn.Module):
  """model._attend (a Linen function: it owns a Dropout) with the model's causal / banded mask."""

  @nn.compact
  def __call__(self, q_BTHK, k_BSHK, v_BSHK, window, segment_ids_BT):
    q_slot_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
    mask_B1TS = model.attention_mask(q_slot_BT, jnp.arange(T), window)
    if segment_ids_BT is not None:
      mask_B1TS = mask_B1TS & (segment_ids_BT[:, None, :, None] == segment_ids_BT[:, None, None, :])
    spec = ("BTHK,BSHK->BHTS", "BHTS,BSHK->BTHK")
    return model._attend(q_BTHK, k_BSHK, v_BSHK, mask_B1TS, *spec, q_BTHK.dtype, 0.0)


def _einsum(q, k, v, window=None, segment_ids_BT=None):
  return _Einsum().apply({}, q, k, v, window, segment_ids_BT)


def _qkv(dtype=jnp.float32):
  r = np.random.default_rng(0)
  return tuple(jnp.asarray(r.normal(size=(B, T, H, K)), dtype) for _ in range(3))


# Two packed documents per row, boundaries inside tiles and on one.
SEGMENTS_BT = np.zeros((B, T), np.int32)
SEGMENTS_BT[0, 100:] = 1
SEGMENTS_BT[1, 128:] = 1
SEGMENTS_BT[1, 300:] = 2


@pytest.mark.parametrize("window", [None, 64], ids=["causal", "band64"])
@pytest.mark.parametrize("segments", [False, True], ids=["", "segments"])
def test_interpreted_kernel_equals_einsum_attention(window, segments):
  q, k, v = _qkv()
  ids = jnp.asarray(SEGMENTS_BT) if segments else None
  cotangent = jnp.asarray(np.random.default_rng(1).normal(size=(B, T, H, K)), jnp.float32)
  splash = lambda q, k, v: tpu_attention.attention(q, k, v, window, segment_ids_BT=ids, interpret=True)
  einsum = lambda q, k, v: _einsum(q, k, v, window, ids)
  out, vjp = jax.vjp(splash, q, k, v)
  want, want_vjp = jax.vjp(einsum, q, k, v)
  np.testing.assert_allclose(out, want, atol=2e-6, rtol=1e-5)
  for got_g, want_g in zip(vjp(cotangent), want_vjp(cotangent)):
    np.testing.assert_allclose(got_g, want_g, atol=2e-5, rtol=1e-5)


def test_traced_window_under_a_mesh_picks_the_kernel():
  """Scanned layers pass the window as data; batch over data, heads over tensor (shard_map)."""
  q, k, v = _qkv()
  mesh = jax.make_mesh((2, 1, 2), sharding.AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  rules = (("batch", ("data", "fsdp")), ("length", None), ("act_heads", "tensor"), ("kv", None))
  attend = lambda q, k, v, w: tpu_attention.attention(q, k, v, w, local_window=64, interpret=True)
  with sharding.activate(mesh, rules):
    f = jax.jit(attend)
    hlo = f.lower(q, k, v, jnp.int32(64)).as_text()
    banded, dense = f(q, k, v, jnp.int32(64)), f(q, k, v, jnp.int32(2**30))
  assert "shard_map" in hlo or "sdy.manual_computation" in hlo
  np.testing.assert_allclose(banded, _einsum(q, k, v, 64), atol=2e-6, rtol=1e-5)
  np.testing.assert_allclose(dense, _einsum(q, k, v, None), atol=2e-6, rtol=1e-5)


def test_lengths_the_kernel_cannot_tile_are_refused():
  assert [tpu_attention.block_size(n) for n in (128, 384, 1024, 2048)] == [128, 128, 512, 512]
  with pytest.raises(ValueError, match="multiple of 128"):
    tpu_attention.block_size(200)


@pytest.mark.slow
def test_model_with_splash_equals_the_einsum_model(debug_config, monkeypatch):
  """GPT(attention_impl="splash") vs "xla": logits and parameter gradients, scanned dense + local
  layers (a traced window), and a 100-token forward, which falls back to the einsums."""
  monkeypatch.setattr(tpu_attention, "INTERPRET", True)
  m = debug_config.model
  m.update(block_size=128, attention_pattern=("dense", "local"), local_window=16, scan_layers=True)
  params = model.init_params(m, jax.random.key(0))
  tokens_BT = jax.random.randint(jax.random.key(1), (1, 128), 0, m.vocab_size)

  def loss(params, impl, length=128):
    cfg = m.copy_and_resolve_references()
    cfg.attention_impl = impl
    logits_BTV = model.GPT(cfg).apply({"params": params}, tokens_BT[:, :length])
    return (jax.nn.log_softmax(logits_BTV)[..., 0]).mean(), logits_BTV

  (l_splash, logits), g_splash = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(
    params, "splash"
  )
  (l_xla, want), g_xla = jax.value_and_grad(loss, has_aux=True)(params, "xla")
  np.testing.assert_allclose(logits, want, atol=1e-5, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_splash), jax.tree.leaves(g_xla)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)
  np.testing.assert_allclose(loss(params, "splash", 100)[1], loss(params, "xla", 100)[1], rtol=1e-6)


# --------------------------------------------------- TPU compiler (compile-only)

HAS_LIBTPU = bool(os.environ.get("TPU_LIBRARY_PATH")) or importlib.util.find_spec("libtpu") is not None

# One process (libtpu starts once) compiles for 8 v5e chips, fsdp 4 x tensor 2: the gradient of
# banded attention alone, then the train step of a scanned dense + local model per
# (attention_impl, remat); prints the kernels' custom calls of each.
_TPU_PROGRAMS = """
import collections, json, re
import jax, jax.numpy as jnp
from configs import debug
from gpt_jax import config as config_lib, plan, pretrain, sharding, tpu_attention

def kernels(compiled):
  lines = [l for l in compiled.as_text().splitlines() if 'custom_call_target="tpu_custom_call"' in l]
  calls = [l.split("=")[0].strip().lstrip("%") for l in lines]
  return dict(collections.Counter(re.sub(r"[.]\\d+$", "", c) for c in calls))

devices = plan.target_devices(plan.parse_target("tpu:v5e:2x4"))
mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2}, devices)
rules = (("batch", ("data", "fsdp")), ("length", None), ("act_heads", "tensor"), ("kv", None))
x = jax.ShapeDtypeStruct((8, 512, 4, 64), jnp.bfloat16)
loss = lambda q, k, v: tpu_attention.attention(q, k, v, 128).astype(jnp.float32).sum()
with sharding.activate(mesh, rules):
  out = {"grad": kernels(jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile())}
for impl, remat in [("splash", "dots_saveable"), ("splash", "full")]:
  config = debug.get_config()
  config.model.update(
    block_size=256, d_model=128, num_heads=2, attention_pattern=("dense", "local"), local_window=64,
    scan_layers=True, dtype="bfloat16", attention_impl=impl, remat=remat,
  )
  config.mesh.update(data=1, fsdp=4, tensor=2)
  config = config_lib.validate(config)
  mesh = sharding.make_mesh(config.mesh, devices)
  program, batch, _ = pretrain.train_program(config, mesh)
  with sharding.activate(mesh, sharding.rules(config)):
    out[impl + "/" + remat] = kernels(program.step.lower(program.abstract, batch).compile())
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.skipif(
  not HAS_LIBTPU, reason="libtpu not installed (pip install libtpu, or set TPU_LIBRARY_PATH)"
)
def test_attention_and_train_step_compile_to_splash_kernels_for_tpu_v5e():
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  r = subprocess.run(
    [sys.executable, "-c", _TPU_PROGRAMS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
  )
  assert r.returncode == 0, r.stderr[-3000:]
  kernels = json.loads(r.stdout.strip().splitlines()[-1])
  fwd, bwd = "splash_mha_fwd_residuals", "splash_mha_dkv_no_residuals"
  # Attention alone: one forward kernel (saving the softmax statistics), one fused backward.
  assert kernels["grad"] == {fwd: 1, bwd: 1}
  # One scanned layer holds the kernels of both masks (the cond's branches). With dots_saveable,
  # which keeps the kernel's named residuals, each runs forward once and backward once (as
  # without remat); full remat runs the forward kernels again in the backward pass.
  assert kernels["splash/dots_saveable"] == {fwd: 2, bwd: 2}
  assert kernels["splash/full"] == {fwd: 4, bwd: 2}


def test_splash_is_refused_off_tpu(debug_config):
  debug_config.model.attention_impl = "splash"
  with pytest.raises(
    ConfigError, match=r"^config.model.attention_impl='splash' runs on TPUs only, not --target=cpu:8"
  ):
    plan.compile_plan(debug_config, plan.parse_target("cpu:8"))
  with pytest.raises(ConfigError, match=r"runs on TPUs only, not this run's cpu devices"):
    model.check_platform(model_config.of(debug_config.model), "cpu", "this run's cpu devices")
  model.check_platform(model_config.of(debug_config.model), "tpu", "-")

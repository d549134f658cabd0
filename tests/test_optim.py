"""The optimiser: warmup + decay schedules, the weight-decay mask, config.optim."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import gpt3_small
from gpt_jax import config as config_lib
from gpt_jax import errors, model, optim, ramp


def test_lr_schedule_shape(debug_config):
  o = debug_config.optim
  o.update(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
  s = optim.lr_schedule(o, 110)
  assert float(s(0)) == 0.0 and abs(float(s(10)) - 1.0) < 1e-6
  assert abs(float(s(60)) - 0.55) < 1e-6  # Half-way down the cosine: (1 + 0.1) / 2.
  assert abs(float(s(110)) - 0.1) < 1e-6
  o.schedule = "linear"
  s = optim.lr_schedule(o, 110)
  assert abs(float(s(60)) - 0.55) < 1e-6 and abs(float(s(110)) - 0.1) < 1e-6


@pytest.mark.parametrize("scan", [False, True])
def test_weight_decay_only_on_matmul_weights(debug_config, scan):
  debug_config.model.scan_layers = scan
  params = nn.unbox(model.abstract_params(debug_config.model))  # Names and ranks: no init compile.
  mask = optim.decay_mask(params)
  flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
  decayed = sorted(k for k, m in flat.items() if m)
  assert decayed and all(k.endswith("['kernel']") or k == "['wte']" for k in decayed), decayed
  assert "['wte']" in decayed and "['wpe']" not in decayed
  # Every kernel (attention in/out, MLP in/out in each block) is decayed.
  kernels = [k for k in flat if k.endswith("['kernel']")]
  assert len(kernels) == (4 if scan else 4 * debug_config.model.num_layers) and set(kernels) <= set(decayed)


def test_schedule_variants(debug_config):
  o = debug_config.optim
  o.update(lr=2.0, warmup_steps=0, min_lr_ratio=0.0, schedule="linear")
  s = optim.lr_schedule(o, 100)
  # No warmup: the decay starts at the peak; linear to lr * min_lr_ratio = 0 at num_steps.
  assert float(s(0)) == 2.0 and float(s(50)) == pytest.approx(1.0) and float(s(100)) == 0.0
  o.update(schedule="constant", warmup_steps=4)
  s = optim.lr_schedule(o, 100)
  assert [float(s(t)) for t in (0, 2, 4, 50, 100)] == [0.0, 1.0, 2.0, 2.0, 2.0]
  o.update(schedule="cosine", min_lr_ratio=0.1)
  assert float(optim.lr_schedule(o, 4)(4)) == pytest.approx(2.0)  # Decay steps at least 1.


def test_lookup_tables_are_named_by_the_caller(debug_config):
  params = nn.unbox(model.abstract_params(debug_config.model))
  mask = optim.decay_mask(params, lookup_only=("wpe", "wte"))
  assert not mask["wte"] and not mask["wpe"] and mask["block_0"]["mlp"]["c_fc"]["kernel"]


@pytest.mark.parametrize("scan", [False, True])
def test_the_optimizer_decays_exactly_the_masked_leaves(debug_config, scan):
  """With zero gradients AdamW's update is the decoupled decay alone: -lr * wd * param."""
  debug_config.model.scan_layers = scan
  debug_config.optim.update(lr=0.5, warmup_steps=0, schedule="constant", weight_decay=0.1)
  shapes = nn.unbox(model.abstract_params(debug_config.model))
  params = jax.tree.map(lambda s: np.ones(s.shape, np.float32), shapes)
  tx = optim.make_optimizer(debug_config)
  updates, _ = jax.jit(tx.update)(jax.tree.map(np.zeros_like, params), tx.init(params), params)
  want = optim.decay_mask(params, tuple(model.position_tables(debug_config.model)))
  assert not want["wpe"] and want["wte"]  # The position table (model.position_tables) multiplies nothing.

  def check(path, u, decayed):
    expected = -0.5 * 0.1 if decayed else 0.0
    np.testing.assert_allclose(np.asarray(u), expected, rtol=1e-6, err_msg=jax.tree_util.keystr(path))

  jax.tree_util.tree_map_with_path(check, updates, want)


@pytest.mark.parametrize(
  "field, value, allowed",
  [
    ("lr", -0.001, "must be a number > 0"),
    ("lr", 0.0, "must be a number > 0"),
    ("warmup_steps", -1, "must be a number >= 0"),
    ("weight_decay", -0.1, "must be a number >= 0"),
    ("grad_clip", -1.0, "must be a number >= 0"),
    ("eps", -1e-8, "must be a number >= 0"),
    ("schedule", "step", "allowed values are 'cosine', 'linear', 'constant'"),
    ("min_lr_ratio", 1.5, "must be in [0.0, 1.0]"),
    ("b1", 1.0, "must be in [0.0, 1.0)"),
    ("b2", -0.5, "must be in [0.0, 1.0)"),
  ],
)
def test_validate_names_the_field(debug_config, field, value, allowed):
  with debug_config.optim.ignore_type():
    debug_config.optim[field] = value
  with pytest.raises(errors.ConfigError) as e:
    optim.validate(debug_config)
  assert str(e.value) == f"config.optim.{field}={value!r} is invalid: {allowed}"


def test_min_lr_ratio_may_be_one(debug_config):
  debug_config.optim.min_lr_ratio = 1.0  # A constant rate after warmup, through the decay schedule.
  optim.validate(debug_config)


# ------------------------------------------------------ schedule in tokens


def test_token_schedule_equals_the_step_schedule_at_a_constant_batch(debug_config):
  c = debug_config
  c.optim.update(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
  c.train.num_steps = 110
  tokens_per_step = c.train.batch_size * c.model.block_size
  by_steps = optim.lr_schedule(c.optim, 110)
  c.optim.update(warmup_tokens=10 * tokens_per_step, decay_tokens=110 * tokens_per_step, warmup_steps=0)
  by_tokens = optim.schedule(c)
  for s in (0, 5, 10, 37, 60, 109, 110, 200):
    assert float(by_tokens(jnp.int32(s))) == pytest.approx(float(by_steps(s)), abs=1e-6), s
  c.optim.decay_tokens = 0  # The decay then ends at train.num_steps.
  assert float(optim.schedule(c)(110)) == pytest.approx(0.1)


def test_gpt3_small_schedule_in_tokens():
  c = config_lib.validate(gpt3_small.get_config())
  lr = optim.schedule(c)
  tokens_per_step = 256 * 2048
  at = lambda tokens: float(lr(jnp.int32(round(tokens / tokens_per_step))))
  assert at(0) == 0.0
  assert at(375e6) == pytest.approx(6e-4, rel=2e-3)  # Warmup ends at 375M tokens (715 steps).
  assert at((375e6 + 260e9) / 2) == pytest.approx(6e-4 * 0.55, rel=1e-3)  # Half-way down the cosine.
  assert at(260e9) == pytest.approx(6e-5, rel=1e-4) and at(300e9) == pytest.approx(6e-5)
  # Inside jit, at the last step of 300B tokens: no int32 overflow on the way.
  assert float(jax.jit(lr)(jnp.int32(c.train.num_steps))) == pytest.approx(6e-5)


def test_token_schedule_follows_a_batch_ramp(debug_config):
  """With a ramp, the rate at a step is the rate at the tokens consumed before it."""
  c = debug_config
  c.optim.update(lr=1.0, warmup_tokens=1000, decay_tokens=100_000, schedule="linear", min_lr_ratio=0.0)
  table = ramp.stages(64, 32, 8, 4096, num_stages=4, multiple=8)
  lr = optim.schedule(c, table)
  by_tokens = optim.lr_at_tokens(c.optim, 100_000.0)
  for step in range(0, table[-1].first_step + 5):
    tokens = ramp.sequences_before(step, table) * 32
    assert float(lr(jnp.int32(step))) == pytest.approx(float(by_tokens(tokens)), rel=1e-6)


def test_decay_must_end_after_warmup(debug_config):
  debug_config.optim.update(warmup_tokens=1000, decay_tokens=1000)
  with pytest.raises(errors.ConfigError, match="optim.decay_tokens"):
    optim.validate(debug_config)

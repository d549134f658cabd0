"""Params layouts: stacked (scan_layers) and unstacked blocks, [out, in] kernels for CPU decoding."""

import jax
import numpy as np
import pytest
from test_model import _cfg, _logits, _random_params, _tokens

from gpt_jax import layout, model_config


def test_stack_unstack_round_trip(debug_config):
  params = _random_params(debug_config.model)
  stacked = layout.stack_blocks(params, debug_config.model.num_layers)
  assert "block_0" not in stacked and stacked["blocks"]["mlp"]["c_fc"]["kernel"].shape == (2, 32, 128)
  back = layout.unstack_blocks(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, back, params)))


def test_stacking_needs_every_block():
  params = {"wte": np.zeros((4, 2)), "block_0": {"w": np.zeros(2)}, "block_2": {"w": np.zeros(2)}}
  with pytest.raises(ValueError, match=r"^params have no block_1 \(expected 3 unstacked blocks\)$"):
    layout.stack_blocks(params, 3)
  unstacked = {"wte": np.zeros((4, 2)), "block_0": {"w": np.zeros(2)}}
  assert layout.unstack_blocks(unstacked) is unstacked  # Nothing to do.


def test_stacked_leaves_put_the_layer_first():
  params = {
    "block_0": {"w": np.full((2, 3), 0.0)},
    "block_1": {"w": np.full((2, 3), 1.0)},
    "ln_f": np.ones(3),
  }
  stacked = layout.stack_blocks(params, 2)
  assert stacked["blocks"]["w"].shape == (2, 2, 3) and np.array_equal(
    stacked["blocks"]["w"][1], params["block_1"]["w"]
  )
  assert stacked["ln_f"] is params["ln_f"]


@pytest.mark.parametrize("stacked", [False, True])
def test_transpose_kernels_moves_the_input_axes_last(stacked):
  """Synthetic shapes whose every axis differs (D=6, H=2, K=3, F=5; 3 layers when stacked)."""
  rng = np.random.default_rng(0)
  block = {
    "attn": {"c_attn": {"kernel": rng.standard_normal((6, 3, 2, 3)), "bias": rng.standard_normal((3, 2, 3))},
             "c_proj": {"kernel": rng.standard_normal((2, 3, 6)), "bias": rng.standard_normal(6)}},
    "mlp": {"c_fc": {"kernel": rng.standard_normal((6, 5)), "bias": rng.standard_normal(5)}},
    "ln_1": {"scale": rng.standard_normal(6)},
  }  # fmt: skip
  if stacked:
    block = jax.tree.map(lambda x: np.stack([x, x + 1, x + 2]), block)
  name = "blocks" if stacked else "block_0"
  params = {"wte": rng.standard_normal((7, 6)), name: block}
  got = layout.transpose_kernels(params)[name]
  first = 1 if stacked else 0  # The layer axis stays in front.
  kernel = lambda tree, *keys: tree[keys[0]][keys[1]]["kernel"]
  # c_attn [D, 3, H, K] -> [3, H, K, D]; the attention output [H, K, D] (two input axes) -> [D, H, K].
  want = {
    ("attn", "c_attn"): np.moveaxis(kernel(block, "attn", "c_attn"), first, -1),
    ("attn", "c_proj"): np.moveaxis(kernel(block, "attn", "c_proj"), -1, first),
    ("mlp", "c_fc"): np.swapaxes(kernel(block, "mlp", "c_fc"), -1, -2),
  }
  for keys, w in want.items():
    np.testing.assert_array_equal(kernel(got, *keys), w)
  assert kernel(got, "attn", "c_proj").shape[first:] == (6, 2, 3)
  # Biases, gains and the embedding table are not touched.
  for keys in (
    ("attn", "c_attn", "bias"),
    ("attn", "c_proj", "bias"),
    ("mlp", "c_fc", "bias"),
    ("ln_1", "scale"),
  ):
    a, b = got, block
    for k in keys:
      a, b = a[k], b[k]
    assert a is b, keys


@pytest.mark.parametrize("changes", [{}, {"scan_layers": True, "norm_position": "post"}])
def test_transposed_kernels_give_the_same_logits(debug_config, changes):
  """The sampler's [outputs, inputs] kernel layout, for few rows (the CPU
  [N, K] x [K, M] product) and many (a plain einsum)."""
  m = _cfg(debug_config, **changes)
  params = _random_params(m)
  out_in = model_config.of(m, kernel_layout="out_in", few_row_head=True)
  transposed = layout.transpose_kernels(params)
  c_attn = "blocks" if m.scan_layers else "block_0"
  assert transposed[c_attn]["attn"]["c_attn"]["kernel"].shape[-4:] == (3, 4, 8, 32)  # [3, H, K, D]
  assert transposed[c_attn]["attn"]["c_proj"]["kernel"].shape[-3:] == (32, 4, 8)  # [D, H, K]
  for batch, length in [(2, 3), (3, m.block_size)]:  # 6 rows, then 96 (> 64).
    tokens_BT = _tokens(m, batch=batch, length=length)
    np.testing.assert_allclose(
      _logits(out_in, transposed, tokens_BT), _logits(m, params, tokens_BT), rtol=1e-5, atol=1e-5
    )

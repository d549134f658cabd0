"""Layouts of a GPT params tree, and the conversions between them.

- Unstacked: `block_0 .. block_{L-1}`, one subtree per layer (scan_layers=False).
- Stacked: `blocks`, every leaf with a leading layer axis [L, ...] (scan_layers=True).
- Kernels [inputs..., outputs...] (as trained and stored), or [outputs...,
  inputs...] (`kernel_layout="out_in"`), the layout XLA:CPU decodes fastest in.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def stack_blocks(params: dict, num_layers: int) -> dict:
  """`block_0..block_{L-1}` -> `blocks` with a leading layer axis (the `scan_layers` layout)."""
  missing = [f"block_{i}" for i in range(num_layers) if f"block_{i}" not in params]
  if missing:
    raise ValueError(f"params have no {missing[0]} (expected {num_layers} unstacked blocks)")
  out = {k: v for k, v in params.items() if not k.startswith("block_")}
  out["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *(params[f"block_{i}"] for i in range(num_layers)))
  return out


def unstack_blocks(params: dict) -> dict:
  """`blocks` [L, ...] -> `block_0..block_{L-1}`; params without `blocks` come back unchanged."""
  if "blocks" not in params:
    return params
  blocks = params["blocks"]
  num_layers = jax.tree.leaves(blocks)[0].shape[0]
  out = {k: v for k, v in params.items() if k != "blocks"}
  for i in range(num_layers):
    out[f"block_{i}"] = jax.tree.map(lambda x, i=i: x[i], blocks)
  return out


def transpose_kernels(params):
  """Projection kernels [inputs..., outputs...] -> [outputs..., inputs...], the
  layout of a model config with `kernel_layout="out_in"`.

  Measured on XLA:CPU with 8 rows: [N, K] x [K, M] runs about 2x faster than
  [M, K] x [K, N] for the 768-3072 wide layer kernels, so the sampler
  transposes them once per call on CPU. A scanned model's leading layer axis
  stays first. The attention output projection has two input axes (heads, kv).
  """

  def move(path, x):
    names = [getattr(p, "key", "") for p in path]
    if names[-1] != "kernel":
      return x
    num_in = 2 if names[-3:-1] == ["attn", "c_proj"] else 1
    start = 1 if "blocks" in names else 0  # scan_layers: [L, ...]
    order = list(range(start)) + list(range(start + num_in, x.ndim)) + list(range(start, start + num_in))
    return x.transpose(order)

  return jax.tree_util.tree_map_with_path(move, params)

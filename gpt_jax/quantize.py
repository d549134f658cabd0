"""Weights in fewer bytes for decoding: bfloat16, or int8 with one symmetric scale per output channel.

    params8 = quantize.quantize_params(params, "int8")
    tokens = sample.generate(cfg, params8, prompts, max_new_tokens=64, temperature=0.0)

Weight-only: activations, the KV cache, LayerNorms, biases and the position
table stay in the model's dtypes. int8: each output channel of a projection
kernel (and each token row of the tied embedding, which is the head's output
channel) gets scale = max |w| / 127 over its inputs, and w ~ round(w / scale)
in [-127, 127]; the model multiplies the product by the scale after the
contraction (`model.Projection` reads `kernel_scale`, `model.GPT` reads
`wte_scale`), so the int8 kernel is the only operand of the matmul that
needs converting.

Whether that reads fewer bytes is up to the compiler fusing the int8 ->
float convert into the matmul; see /work/notes/decode_findings.md for what
XLA:CPU does (it materialises a float copy for matrix-vector products).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax.errors import UserError

WEIGHT_FORMATS = ("float32", "bfloat16", "int8")


def _num_in(names) -> int:
  """Input axes of a Projection kernel: the attention output projection has two (heads, kv)."""
  return 2 if names[-3:-1] == ["attn", "c_proj"] else 1


def quantize_int8(w, in_axes: tuple[int, ...]):
  """(int8 values, float32 scale) with one symmetric scale per index of the other axes.

  The scale has w's shape without `in_axes`; an all-zero channel gets scale 1.
  """
  w = jnp.asarray(w, jnp.float32)
  absmax = jnp.max(jnp.abs(w), axis=in_axes, keepdims=True)
  scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
  q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
  return q, jnp.squeeze(scale, axis=in_axes)


def dequantize_int8(q, scale, in_axes: tuple[int, ...]):
  return q.astype(jnp.float32) * jnp.expand_dims(scale, in_axes)


def check_weights(weights: str) -> None:
  if weights not in WEIGHT_FORMATS:
    raise UserError(f"--weights={weights!r}: must be one of {', '.join(WEIGHT_FORMATS)}")


def quantize_params(params, weights: str):
  """Params in the default layout (kernels [inputs..., outputs...]) with matmul weights in `weights`.

  Projection kernels and the tied embedding `wte` change format; everything
  else is kept. Apply before `model.transpose_kernels` / the sampler's CPU
  layout, which carry the scales along unchanged.
  """
  check_weights(weights)
  if weights == "float32":
    return params

  def convert(tree, names):
    out = {}
    for key, value in tree.items():
      path = [*names, key]
      if isinstance(value, dict):
        out[key] = convert(value, path)
      elif key in ("kernel", "wte"):
        lead = 1 if "blocks" in path else 0  # Scanned layers: [L, ...] first.
        if weights == "bfloat16":
          out[key] = jnp.asarray(value, jnp.bfloat16)
          continue
        if key == "wte":  # [V, D]: one scale per token row (the head's output channel).
          out[key], out["wte_scale"] = quantize_int8(value, (1,))
        else:
          num_in = _num_in(path)
          out[key], out["kernel_scale"] = quantize_int8(value, tuple(range(lead, lead + num_in)))
      else:
        out[key] = value
    return out

  return jax.jit(lambda p: convert(p, []))(params)


def weight_bytes(params) -> int:
  """Bytes of every parameter except the position table (a decoding step reads one row of it)."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  keep = [x for path, x in leaves if "wpe" not in jax.tree_util.keystr(path)]
  return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in keep))

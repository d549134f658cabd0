"""Fused attention on TPU: the Pallas splash-attention kernel that ships with JAX.

`attention(q_BTHK, k_BSHK, v_BSHK, window)` is softmax attention over
training-length sequences (S == T), causal or causal and banded to `window`
keys, optionally restricted to equal segment ids (packed documents), forward
and backward (the kernel's own custom VJP), in Pallas kernels that never hold
a [T, S] score matrix in HBM. It computes what model._attend computes (scores
and softmax in float32, scale 1/sqrt(K)) except attention dropout, which the
kernel does not have.

The kernel works on one sequence, [H, T, K]: it is vmapped over the batch,
and under a mesh it runs inside shard_map with the batch and heads split as
the logical rules split ("batch", "act_heads"): every device attends its own
sequences and heads, with no communication. Off TPU it runs only in Pallas'
interpret mode (`interpret=True`, what the CPU tests use).

The kernel names its residuals (the output and the softmax's logsumexp)
`CHECKPOINT_NAME`, so a remat policy can keep them (model.REMAT_POLICIES)
rather than run the forward kernel again in the backward pass.
"""

from __future__ import annotations

import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

# The kernel's key blocks are computed in slices of 128 lanes (splash_attention_kernel.NUM_LANES).
LANES = 128
# Largest tile first: 512 x 512 score tiles in float32 are 1 MiB of VMEM, within every TPU's
# scoped default (16 MiB v5e, 32 MiB v5p/v6e) with the kernel's double buffers.
_BLOCKS = (512, 256, 128)
# Pallas' interpreter instead of the TPU kernel when attention() is not told: the CPU tests
# set it to run the model's splash path; compiling for TPU needs False.
INTERPRET = False
# Activation layout of queries / keys / values and of the output (model.CausalSelfAttention).
LOGICAL_AXES = ("batch", "length", "act_heads", "kv")
# jax.ad_checkpoint name of the kernel's saved output and logsumexp.
CHECKPOINT_NAME = "attention"


def _splash():
  """JAX's splash-attention package, imported on first use: Pallas' TPU modules add ~0.4 s to
  every entry point's start-up, and only a splash model needs them."""
  return importlib.import_module("jax.experimental.pallas.ops.tpu.splash_attention")


def block_size(seq_len: int) -> int:
  """The largest supported tile that divides `seq_len` (a multiple of 128)."""
  for b in _BLOCKS:
    if seq_len % b == 0:
      return b
  raise ValueError(f"splash attention needs a sequence length that is a multiple of {LANES}, not {seq_len}")


def _block_sizes(seq_len: int):
  b = block_size(seq_len)
  # The fused backward computes dq inside the dK/dV kernel: one pass over the
  # scores instead of two.
  return _splash().BlockSizes(
    block_q=b, block_kv=b, block_kv_compute=b,
    block_q_dkv=b, block_kv_dkv=b, block_kv_dkv_compute=b,
    use_fused_bwd_kernel=True,
  )  # fmt: skip


def _kernel(num_heads: int, seq_len: int, window: int | None, interpret: bool):
  """The splash kernel for [H, T, K] inputs. Built in each trace (its block tables become
  constants of that trace); splash caches the numpy work of turning a mask into tables."""
  splash = _splash()
  shape = (seq_len, seq_len)
  if window is None or window >= seq_len:
    head_mask = splash.CausalMask(shape)
  else:
    # Key s is visible from query t when t - (window - 1) <= s <= t (model.attention_mask).
    head_mask = splash.LocalMask(shape, window_size=(window - 1, 0), offset=0)
  return splash.make_splash_mha(
    splash.MultiHeadMask([head_mask] * num_heads),
    block_sizes=_block_sizes(seq_len),
    head_shards=1,
    q_seq_shards=1,
    residual_checkpoint_name=CHECKPOINT_NAME,
    interpret=interpret,
  )


def _local_attention(q_BTHK, k_BSHK, v_BSHK, segment_ids_BT, window, interpret):
  """Unsharded: vmap the one-sequence kernel over the batch."""
  B, T, H, K = q_BTHK.shape
  kernel = _kernel(H, T, window, interpret)
  # The kernel does not scale the scores; scaling q is the same product (in float32 first).
  q_BTHK = (q_BTHK.astype(jnp.float32) / np.sqrt(K)).astype(q_BTHK.dtype)
  heads_first = lambda x_BTHK: x_BTHK.transpose(0, 2, 1, 3)
  q_BHTK, k_BHSK, v_BHSK = heads_first(q_BTHK), heads_first(k_BSHK), heads_first(v_BSHK)
  if segment_ids_BT is None:
    out_BHTK = jax.vmap(kernel)(q_BHTK, k_BHSK, v_BHSK)
  else:
    ids = _splash().SegmentIds(q=segment_ids_BT, kv=segment_ids_BT)
    out_BHTK = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=s))(q_BHTK, k_BHSK, v_BHSK, ids)
  return out_BHTK.transpose(0, 2, 1, 3)


def _mesh_spec(mesh) -> PartitionSpec:
  """[B, T, H, K] as the logical rules place attention activations; T and K unsplit (the
  kernel needs whole sequences: it cannot split keys)."""
  spec = nn.logical_to_mesh_axes(LOGICAL_AXES)
  spec = tuple(spec) + (None,) * (4 - len(spec)) if spec is not None else (None,) * 4
  names = set(mesh.axis_names)
  keep = lambda axes: (
    axes if axes is None or set((axes,) if isinstance(axes, str) else axes) <= names else None
  )
  return PartitionSpec(keep(spec[0]), None, keep(spec[2]), None)


def attention(
  q_BTHK,
  k_BSHK,
  v_BSHK,
  window=None,
  *,
  local_window=None,
  segment_ids_BT=None,
  interpret: bool | None = None,
):
  """Causal (banded to `window` keys, if given) softmax attention [B, T, H, K] -> [B, T, H, K].

  `window`: None (dense), an int, or a traced int32 as scanned layers alternating dense and
  local attention pass it (model.layer_windows: `local_window` or a value >= T for dense);
  a traced window selects between the two static kernels with lax.cond, so both are
  compiled and one runs. `segment_ids_BT`: int32 [B, T]; a query sees only keys of its own
  segment. Under an active mesh (jax.set_mesh) of several devices, the batch and heads are
  split by shard_map as the logical rules split attention activations. `interpret`: run
  Pallas' interpreter (any backend; default `INTERPRET`).
  """
  B, T, H, K = q_BTHK.shape
  interpret = INTERPRET if interpret is None else interpret
  if k_BSHK.shape[1] != T:
    raise ValueError(f"splash attention: {k_BSHK.shape[1]} keys for {T} queries; it serves S == T only")
  block_size(T)
  traced = not (window is None or isinstance(window, (int, np.integer)))
  if traced and local_window is None:
    raise ValueError("splash attention: a traced window needs the static local_window it stands for")

  def attend(q, k, v, ids, w):
    if not traced:
      return _local_attention(q, k, v, ids, None if w is None else int(w), interpret)
    local = lambda *a: _local_attention(*a, int(local_window), interpret)
    dense = lambda *a: _local_attention(*a, None, interpret)
    return jax.lax.cond(w < T, local, dense, q, k, v, ids)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return attend(q_BTHK, k_BSHK, v_BSHK, segment_ids_BT, window)
  spec = _mesh_spec(mesh)
  args, specs = [q_BTHK, k_BSHK, v_BSHK], [spec, spec, spec]
  if segment_ids_BT is not None:
    args.append(segment_ids_BT)
    specs.append(PartitionSpec(spec[0], None))
  if traced:
    args.append(window)
    specs.append(PartitionSpec())

  def body(q, k, v, *rest):
    rest = list(rest)
    ids = rest.pop(0) if segment_ids_BT is not None else None
    return attend(q, k, v, ids, rest.pop(0) if traced else window)

  return jax.shard_map(body, mesh=mesh, in_specs=tuple(specs), out_specs=spec, check_vma=False)(*args)

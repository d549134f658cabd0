"""Language-model cross-entropy over the tied head, in chunks of the sequence.

The plain loss (pretrain.lm_loss_fn) materialises float32 logits [B, T, V]: for
GPT-2's 50,257-token vocabulary at 8 x 1024 tokens per device that is 1.6 GiB,
and its gradient another as much, the largest activations of a small model.
`chunked_cross_entropy` computes the same sum from the final hidden states and
the embedding table, `chunk` positions at a time: a lax.scan whose body is
rematerialised, so the backward pass recomputes each chunk's logits instead of
keeping them. At most one chunk's [B, chunk, V] float32 logits (and their
gradient) exist at once; the FLOPs are the plain loss's plus one more logits
matmul (the recomputation).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

# Activation layout of the logits (model.GPT).
LOGITS_AXES = ("batch", "length", "act_vocab")


def chunked_cross_entropy(h_BTD, wte_VD, labels_BT, mask_BT=None, *, chunk: int, vocab_size=None, dtype=None):
  """sum over tokens of mask * -log softmax(h @ wte^T)[label], float32; never [B, T, V] at once.

  Args:
    h_BTD: final hidden states (after the final LayerNorm), compute dtype.
    wte_VD: the tied embedding table; rows from `vocab_size` on (model.vocab_pad_multiple
      padding) take no part in the softmax.
    labels_BT: int32 next-token ids, < vocab_size.
    mask_BT: per-token weights (default 1).
    chunk: positions per step of the scan; T need not be a multiple (the last chunk is padded
      with weight 0).
    dtype: the matmul's input dtype (default h's); products accumulate in float32, as the
      model's head does.
  """
  B, T, D = h_BTD.shape
  V = wte_VD.shape[0]
  vocab_size = vocab_size or V
  dtype = dtype or h_BTD.dtype
  mask_BT = jnp.ones((B, T), jnp.float32) if mask_BT is None else mask_BT.astype(jnp.float32)
  n = -(-T // chunk)
  pad = n * chunk - T
  if pad:
    h_BTD = jnp.pad(h_BTD, ((0, 0), (0, pad), (0, 0)))
    labels_BT = jnp.pad(labels_BT, ((0, 0), (0, pad)))
    mask_BT = jnp.pad(mask_BT, ((0, 0), (0, pad)))
  # [B, n * C] -> [n, B, C]: the scan runs over chunks; batch sharding is untouched.
  to_chunks = lambda x: x.reshape(B, n, chunk, *x.shape[2:]).swapaxes(0, 1)

  # prevent_cse=False: inside a scan, remat needs no CSE barrier (jax.checkpoint docs).
  @functools.partial(jax.checkpoint, prevent_cse=False)
  def chunk_loss(wte_VD, h_BCD, labels_BC, mask_BC):
    w_VD = wte_VD.astype(dtype)
    h_BCD = h_BCD.astype(dtype)
    logits_BCV = jnp.einsum("BCD,VD->BCV", h_BCD, w_VD, preferred_element_type=jnp.float32)
    logits_BCV = nn.with_logical_constraint(logits_BCV, LOGITS_AXES)
    if vocab_size < V:  # Padded rows: out of the softmax, without reslicing a sharded vocab axis.
      logits_BCV = jnp.where(jnp.arange(V) < vocab_size, logits_BCV, -jnp.inf)
    lse_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
    # The label's logit straight from its embedding row: no one-hot or gather over V.
    label_BC = jnp.einsum("BCD,BCD->BC", h_BCD, w_VD[labels_BC], preferred_element_type=jnp.float32)
    return ((lse_BC - label_BC) * mask_BC).sum()

  def body(total, xs):
    return total + chunk_loss(wte_VD, *xs), None

  total, _ = jax.lax.scan(
    body, jnp.zeros((), jnp.float32), tuple(map(to_chunks, (h_BTD, labels_BT, mask_BT)))
  )
  return total

"""How the next token is chosen, and how prompts and stops are laid out: shared by the
plain sampler (gpt_jax.sample) and speculative decoding (gpt_jax.speculative).

Sampling applies temperature, then top-k (as in GPT-2's samples, Radford et al.
2019), then nucleus (top-p) filtering (Holtzman et al. 2019).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from gpt_jax import layout, model_config
from gpt_jax.errors import UserError

# --------------------------------------------------------------- sampling


def _sortable(x):
  """uint32 keys in the order of the float32 values, so thresholds can be bisected exactly."""
  i = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  i = i ^ ((i >> 31) & 0x7FFFFFFF)
  return jax.lax.bitcast_convert_type(i, jnp.uint32) ^ jnp.uint32(0x80000000)


def _largest_threshold(holds, batch: int):
  """Per row, the largest uint32 t with holds(t_B1) true (holds: true at 0, monotone)."""

  def halve(_, lo_hi):
    lo, hi = lo_hi
    mid = lo + (hi - lo) // 2 + ((hi - lo) & 1)
    ok = holds(mid)
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

  lo = jnp.zeros((batch, 1), jnp.uint32)
  return jax.lax.fori_loop(0, 32, halve, (lo, jnp.full_like(lo, 0xFFFFFFFF)))[0]


def _bisect_threshold(logits_BV, top_k, top_p):
  """Sortable key of the last token kept, by bisection over the whole vocabulary.

  64 passes over the row: XLA runs that far faster than a sort of 50k logits.
  """
  B, V = logits_BV.shape
  key_BV = _sortable(logits_BV)
  none_B1 = jnp.zeros((B, 1), jnp.uint32)
  k_min_B1 = jax.lax.cond(
    (top_k > 0) & (top_k < V),
    lambda: _largest_threshold(lambda t: jnp.sum(key_BV >= t, axis=-1, keepdims=True) >= top_k, B),
    lambda: none_B1,
  )
  probs_BV = jax.nn.softmax(jnp.where(key_BV >= k_min_B1, logits_BV, -jnp.inf), axis=-1)
  p_min_B1 = jax.lax.cond(
    top_p < 1,
    lambda: _largest_threshold(
      lambda t: jnp.sum(jnp.where(key_BV >= t, probs_BV, 0.0), axis=-1, keepdims=True) >= top_p, B
    ),
    lambda: none_B1,
  )
  return jnp.maximum(k_min_B1, p_min_B1)


def _cumsum(x_BN):
  # A triangular matmul: for rows of a few hundred it compiles and runs
  # faster on CPU than XLA's cumulative sum.
  n = x_BN.shape[-1]
  upper_NN = jnp.arange(n)[:, None] <= jnp.arange(n)[None, :]
  return jnp.dot(x_BN, upper_NN.astype(x_BN.dtype), precision=jax.lax.Precision.HIGHEST)


# The kept set usually lies among the 256 most likely tokens (top_k <= 256,
# or a nucleus that closes within them): lax.top_k finds those cheaply.
_CANDIDATES = 256
_FEW_CANDIDATES = 64


def _candidate_threshold(logits_BV, top_k, top_p, num_candidates: int = _CANDIDATES):
  """(sortable key of the last token kept, fits_B) from the most likely tokens only.

  Where fits_B is False the kept set may reach beyond the candidates.
  """
  V = logits_BV.shape[-1]
  C = min(num_candidates, V)
  cand_BC = jax.lax.top_k(logits_BV, C)[0]
  small_k = (top_k > 0) & (top_k <= C)
  in_k_BC = jnp.broadcast_to(jnp.arange(C)[None, :] < jnp.where(small_k, top_k, C), cand_BC.shape)
  # Probabilities relative to the top-k set, or to the whole vocabulary. (The
  # maximum is not read off cand_BC: slicing top_k's output makes XLA:CPU
  # replace it with a full sort, 40x slower.)
  max_B1 = jnp.max(logits_BV, axis=-1, keepdims=True)
  p_BC = jnp.where(in_k_BC, jnp.exp(cand_BC - max_B1), 0.0)
  z_B1 = jnp.where(
    small_k,
    jnp.sum(p_BC, axis=-1, keepdims=True),
    jnp.sum(jnp.exp(logits_BV - max_B1), axis=-1, keepdims=True),
  )
  probs_BC = p_BC / z_B1
  num_kept_B1 = jnp.sum(in_k_BC & (_cumsum(probs_BC) - probs_BC < top_p), axis=-1, keepdims=True)
  # A top_k beyond the candidates normalises over tokens not seen here.
  fits_B = small_k | ((top_k <= 0) & (jnp.sum(probs_BC, axis=-1) >= top_p))
  return _sortable(jnp.take_along_axis(cand_BC, num_kept_B1 - 1, axis=-1)), fits_B


def filter_logits(logits_BV, top_k, top_p):
  """Top-k then nucleus (top-p) filtering; dropped logits become -inf. k and p may be traced.

  top_k <= 0 keeps every token. Nucleus (Holtzman et al. 2019, §3.1): a
  token survives when the mass of the (top-k) tokens more probable than it
  is still below p, so the top token always survives and the last one kept
  makes the mass reach p. Tokens tied with the last one kept survive too.
  """
  # Top-k alone with a small k (GPT-2's samples used 40): fewer candidates,
  # since lax.top_k's time grows with them (8 x 50k logits: 0.6 ms for 64, 1.4 ms for 256).
  few = (top_k > 0) & (top_k <= _FEW_CANDIDATES) & (top_p >= 1)
  threshold_B1, fits_B = jax.lax.cond(
    few,
    lambda: _candidate_threshold(logits_BV, top_k, top_p, _FEW_CANDIDATES),
    lambda: _candidate_threshold(logits_BV, top_k, top_p),
  )
  threshold_B1 = jax.lax.cond(
    jnp.all(fits_B), lambda: threshold_B1, lambda: _bisect_threshold(logits_BV, top_k, top_p)
  )
  return jnp.where(_sortable(logits_BV) >= threshold_B1, logits_BV, -jnp.inf)


_BLOCK = 256


def sample_categorical(key, logits_BV):
  """One token per row from softmax(logits_BV), by inverse CDF in two levels.

  First a block of 256 ids by the blocks' masses, then an id inside it, each
  from its own uniform in (0, 1], so a zero-probability (-inf) token can never
  come out. Needs 2 random numbers per row where jax.random.categorical's
  Gumbel trick needs V: on CPU that is 10-40x faster for a 50k vocabulary.
  """
  B, V = logits_BV.shape
  num_blocks = -(-V // _BLOCK)
  p_BV = jnp.exp(logits_BV - jnp.max(logits_BV, axis=-1, keepdims=True))
  p_BNK = jnp.pad(p_BV, ((0, 0), (0, num_blocks * _BLOCK - V))).reshape(B, num_blocks, _BLOCK)
  u_B2 = 1.0 - jax.random.uniform(key, (B, 2))
  mass_BN = _cumsum(jnp.sum(p_BNK, axis=-1))
  block_B = jnp.sum(mass_BN < u_B2[:, :1] * mass_BN[:, -1:], axis=-1)
  mass_BK = _cumsum(jnp.take_along_axis(p_BNK, block_B[:, None, None], axis=1)[:, 0])
  return (block_B * _BLOCK + jnp.sum(mass_BK < u_B2[:, 1:] * mass_BK[:, -1:], axis=-1)).astype(jnp.int32)


def first_argmax(x_BV):
  """argmax over the last axis (the first index on ties) as two plain
  reductions: XLA:CPU's (value, index) reduction behind jnp.argmax took 1.0 ms
  for 8 x 50k logits, these 0.33 ms."""
  max_B1 = jnp.max(x_BV, axis=-1, keepdims=True)
  V = x_BV.shape[-1]
  return jnp.min(jnp.where(x_BV == max_B1, jnp.arange(V, dtype=jnp.int32), V), axis=-1)


def choose(logits_BV, key, consts, greedy: bool):
  """Next tokens; sampling settings other than greedy are traced (no recompilation)."""
  logits_BV = jnp.where(jnp.arange(logits_BV.shape[-1]) < consts["vocab_limit"], logits_BV, -jnp.inf)
  if greedy:
    return first_argmax(logits_BV)
  top_k, top_p = consts["top_k"], consts["top_p"]
  logits_BV = jax.lax.cond(
    (top_k > 0) | (top_p < 1),
    lambda x: filter_logits(x, top_k, top_p),
    lambda x: x,
    logits_BV / consts["temperature"],
  )
  return sample_categorical(key, logits_BV)


# ------------------------------------------------------------ host side


@jax.jit
def cpu_decode_layout(params):
  """Layers unstacked and projection kernels [out, in]: the layout XLA:CPU decodes fastest in.

  A scanned model slices its stacked weights at every layer of every step,
  and XLA:CPU copies each slice (at batch 8 on 6 x 768: 42 ms a step against
  21 ms unrolled); few-row products run about 2x faster on [out, in] kernels.
  """
  return layout.transpose_kernels(layout.unstack_blocks(params))


CPU_LAYOUT_FROM_STEPS = 16


def decode_config(model_cfg, max_new_tokens: int, mesh) -> model_config.ModelConfig:
  """The ModelConfig `decode` compiles: on CPU the tied head is computed transposed for few
  rows and, for a decode of 16+ tokens on unsharded params, the weights are copied once per
  call into the layout XLA:CPU decodes fastest (unrolled layers, [out, in] kernels)."""
  cfg = model_config.of(model_cfg)
  if jax.default_backend() != "cpu":
    return cfg
  if mesh is None and max_new_tokens >= CPU_LAYOUT_FROM_STEPS:
    return model_config.of(cfg, few_row_head=True, kernel_layout="out_in", scan_layers=False)
  return model_config.of(cfg, few_row_head=True)


def prompt_bucket(length: int, cap: int) -> int:
  """Padded prompt length: the next power of two (few compilations), at most cap."""
  return min(1 << max(length - 1, 0).bit_length(), cap)


def cut_generation(ids: list[int], eot_id: int | None, stop_sequences) -> list[int]:
  """Generated ids up to the first EOT or the start of the first stop sequence to complete."""
  for end in range(1, len(ids) + 1):
    starts = [end - 1] if eot_id is not None and ids[end - 1] == eot_id else []
    starts += [end - len(s) for s in stop_sequences if end >= len(s) and ids[end - len(s) : end] == s]
    if starts:
      return ids[: min(starts)]
  return list(ids)


def check_sampling(temperature, top_k, top_p, max_new_tokens=0, *, prefix: str = "") -> None:
  """Raises UserError for a setting generate cannot use; `prefix` ("config.sample.") names the fields."""

  def is_int(x):
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

  def number(x):
    return isinstance(x, (int, float, np.number)) and not isinstance(x, bool)

  if not is_int(max_new_tokens) or max_new_tokens < 0:
    raise UserError(f"{prefix}max_new_tokens={max_new_tokens!r} must be an integer >= 0")
  if not number(temperature) or not temperature >= 0:
    raise UserError(f"{prefix}temperature={temperature!r} must be >= 0 (0 = greedy)")
  if not is_int(top_k) or top_k < 0:
    raise UserError(f"{prefix}top_k={top_k!r} must be an integer >= 0 (0 = off)")
  if not number(top_p) or not 0 < top_p <= 1:
    raise UserError(f"{prefix}top_p={top_p!r} must be in (0, 1] (1 = off)")


def prepare_prompts(cfg, prompts, max_new_tokens, eot_id):
  check_sampling(0.0, 0, 1.0, max_new_tokens)
  if max_new_tokens >= cfg.block_size:
    raise UserError(
      f"max_new_tokens={max_new_tokens} must be < model.block_size={cfg.block_size} (room for the prompt)"
    )
  room = cfg.block_size - max_new_tokens
  rows = []
  for n, prompt in enumerate(prompts):
    prompt = [int(t) for t in prompt] or ([] if eot_id is None else [eot_id])
    if not prompt:
      raise UserError(f"prompt {n} is empty and no eot_id was given to start from")
    bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
    if bad:
      raise UserError(f"prompt {n} has token id {bad[0]} outside [0, {cfg.vocab_size})")
    rows.append(prompt[-room:])
  longest = max(len(p) for p in prompts)
  if longest > room:
    logging.warning(
      "prompts of up to %d tokens: keeping the last %d of each (model.block_size=%d - max_new_tokens=%d)",
      longest,
      room,
      cfg.block_size,
      max_new_tokens,
    )
  lengths_B = np.array([len(p) for p in rows], np.int32)
  P = prompt_bucket(int(lengths_B.max()), room)
  tokens_BP = np.zeros((len(rows), P), np.int32)
  for b, p in enumerate(rows):
    tokens_BP[b, P - len(p) :] = p
  return tokens_BP, lengths_B


def stop_array(stop_sequences):
  stops = [list(map(int, s)) for s in stop_sequences or () if len(s)]
  width = max([len(s) for s in stops], default=1)
  stop_QL = np.full((len(stops), width), -1, np.int32)
  for q, s in enumerate(stops):
    stop_QL[q, width - len(s) :] = s
  return stops, stop_QL

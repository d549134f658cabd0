"""Speculative decoding: a small draft model proposes, the target model verifies.

    tokens = speculative.generate(target_cfg, target_params, draft_cfg, draft_params, prompts,
                                  max_new_tokens=100, draft_tokens=4, temperature=0.0)

Each round the draft decodes `draft_tokens` = k tokens one at a time with
its own KV cache, then the target scores all k + 1 positions (its last
token and the k proposals) in one forward pass with its cache, which costs
about one ordinary decoding step when decoding is bound by reading the
weights (Leviathan et al. 2023, "Fast Inference from Transformers via
Speculative Decoding"; Chen et al. 2023, "Accelerating Large Language Model
Decoding with Speculative Sampling").

Acceptance keeps the output distribution exactly the target's:
- Greedy: the longest prefix of proposals that equal the target's argmax,
  then the target's own token at the first mismatch (or after all k): the
  tokens are those of plain greedy decoding.
- Sampling: p and q are the target's and the draft's *filtered*
  distributions, each made as `sampling.choose` makes the one it samples from
  (vocab_limit, temperature, top-k, then top-p). The draft samples d ~ q;
  d is kept with probability min(1, p(d) / q(d)); at the first rejection
  the token comes from max(0, p - q) renormalised (Leviathan et al. §2.3,
  Chen et al. Algorithm 2); after k acceptances a bonus token comes from p
  at the last position. Every emitted token is then distributed as p, the
  filtered distribution plain sampling draws from (a token the target's
  filter dropped has p = 0: always rejected, never drawn from the
  residual). Filtering the draft too is a choice for acceptance only: any q
  would give the same output distribution.

Batches: every row keeps its own cache end (`model.init_cache`'s `end` as an
int32 [B]), so rows accept different numbers of tokens in the same round and
each rolls back on its own: a rejected proposal's slots stay in the cache
but lie beyond the row's end, so causality hides them until the next round
writes over them. A row that has stopped (EOT, a stop sequence, or
max_new_tokens reached) no longer advances.

The draft's cache lags the target's by one slot at the start of a round: its
first step feeds the two newest tokens (rewriting, with the same values, the
slot it may already hold), so a round in which all k proposals were accepted
needs no extra draft pass for the k-th proposal.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from gpt_jax import loading, model_config, quantize, sampling
from gpt_jax import model as model_lib
from gpt_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class _Mode:
  num_steps: int  # max_new_tokens
  draft_tokens: int  # k
  greedy: bool


@dataclasses.dataclass
class Decoded:
  """tokens_BN: raw tokens (rows padded after they stop); per-row round and acceptance counts."""

  tokens_BN: np.ndarray
  steps: int  # The longest row's emitted tokens (<= max_new_tokens).
  rounds: int  # Target forward passes after the prefill.
  rounds_B: np.ndarray  # Rounds in which each row was still generating.
  accepted_B: np.ndarray  # Draft tokens each row accepted.
  emitted_B: np.ndarray  # Tokens each row emitted (at most max_new_tokens).
  draft_tokens: int

  @property
  def acceptance_rate(self) -> float:
    """Accepted share of the proposals made to rows still generating."""
    k = self.draft_tokens
    return float(self.accepted_B.sum() / max(1, k * self.rounds_B.sum()))

  @property
  def tokens_per_pass(self) -> float:
    """Emitted tokens per target pass, per row (1 = no gain, k + 1 = every proposal kept)."""
    return float(self.emitted_B.sum() / max(1, self.rounds_B.sum()))


# --------------------------------------------------------------- acceptance


def filtered_logits(logits_BV, consts):
  """The logits plain sampling draws from (sampling.choose): vocab limit, temperature, top-k, top-p."""
  logits_BV = jnp.where(jnp.arange(logits_BV.shape[-1]) < consts["vocab_limit"], logits_BV, -jnp.inf)
  top_k, top_p = consts["top_k"], consts["top_p"]
  return jax.lax.cond(
    (top_k > 0) | (top_p < 1),
    lambda x: sampling.filter_logits(x, top_k, top_p),
    lambda x: x,
    logits_BV / consts["temperature"],
  )


def _limited(logits_BV, consts):
  return jnp.where(jnp.arange(logits_BV.shape[-1]) < consts["vocab_limit"], logits_BV, -jnp.inf)


def accept_greedy(target_logits_BJV, draft_BK, consts):
  """(emitted_BJ, num_accepted_B): the target's argmax at each of the J = k + 1 positions.

  A proposal is accepted while it equals the target's argmax; the tokens
  emitted are then the target's argmax tokens up to the first mismatch.
  """
  B, J, V = target_logits_BJV.shape
  best_BJ = sampling.first_argmax(_limited(target_logits_BJV.reshape(B * J, V), consts)).reshape(B, J)
  match_BK = best_BJ[:, :-1] == draft_BK
  return best_BJ, jnp.sum(jnp.cumprod(match_BK, axis=-1), axis=-1).astype(jnp.int32)


def accept_sampled(key, target_logits_BJV, draft_BK, draft_probs_BKV, consts):
  """(emitted_BJ, num_accepted_B) by the speculative sampling rule over filtered distributions.

  emitted_BJ[:, i] is the proposal i for i < num_accepted, and at
  i = num_accepted the residual sample (or the bonus token when all k were
  accepted); later columns are meaningless.
  """
  B, J, V = target_logits_BJV.shape
  K = J - 1
  p_BJV = jax.nn.softmax(filtered_logits(target_logits_BJV.reshape(B * J, V), consts), axis=-1)
  p_BJV = p_BJV.reshape(B, J, V)
  p_BK = jnp.take_along_axis(p_BJV[:, :K], draft_BK[..., None], axis=-1)[..., 0]
  q_BK = jnp.take_along_axis(draft_probs_BKV, draft_BK[..., None], axis=-1)[..., 0]
  accept_key, residual_key = jax.random.split(key)
  # u < p / q, written so that q = 0 (impossible for a drawn token) cannot divide.
  u_BK = jax.random.uniform(accept_key, (B, K))
  ok_BK = u_BK * q_BK < p_BK
  num_B = jnp.sum(jnp.cumprod(ok_BK, axis=-1), axis=-1).astype(jnp.int32)
  # The residual at the first rejection; after k acceptances q is taken as 0 (a draw from p).
  q_BJV = jnp.concatenate([draft_probs_BKV, jnp.zeros((B, 1, V), draft_probs_BKV.dtype)], axis=1)
  p_BV = jnp.take_along_axis(p_BJV, num_B[:, None, None], axis=1)[:, 0]
  q_BV = jnp.take_along_axis(q_BJV, num_B[:, None, None], axis=1)[:, 0]
  r_BV = jnp.maximum(p_BV - q_BV, 0.0)
  # p == q exactly leaves no residual, and then rejection has probability 0;
  # rounding can still reject there: draw from p.
  r_BV = jnp.where(jnp.sum(r_BV, axis=-1, keepdims=True) > 0, r_BV, p_BV)
  fix_B = sampling.sample_categorical(residual_key, jnp.log(r_BV))
  emitted_BJ = jnp.concatenate([draft_BK, jnp.zeros((B, 1), jnp.int32)], axis=1)
  emitted_BJ = jnp.where(jnp.arange(J)[None] == num_B[:, None], fix_B[:, None], emitted_BJ)
  return emitted_BJ, num_B


# ------------------------------------------------------- device programs


def _apply(cfg, params, tokens_BT, positions_BT, cache, valid_BS):
  # One row: a scalar end, so the cache writes are dynamic_update_slices, not scatters.
  one = tokens_BT.shape[0] == 1
  if one:
    cache = dict(cache, end=cache["end"][0])
  logits_BTV, cache = model_lib.GPT(cfg).apply(
    {"params": params}, tokens_BT, positions_BT=positions_BT, cache=cache, key_valid_BS=valid_BS
  )
  if one:
    cache = dict(cache, end=cache["end"][None])
  return logits_BTV, cache


def _row_cache(cfg, B, num_slots, end_B):
  return dict(model_lib.init_cache(cfg, B, num_slots), end=end_B)


def _prefill(target_cfg, draft_cfg, mode, target_params, draft_params, tokens_BP, lengths_B, consts):
  """Target cache holds the first P - 1 slots, the draft's the first P - 2; returns the loop state."""
  B, P = tokens_BP.shape
  K = mode.draft_tokens
  num_slots = P + mode.num_steps + K - 1
  positions_BP = jnp.maximum(jnp.arange(P)[None, :] - (P - lengths_B)[:, None], 0)
  valid_BS = consts["valid_BS"]
  t_cache = _row_cache(target_cfg, B, num_slots, jnp.zeros((B,), jnp.int32))
  _, t_cache = _apply(target_cfg, target_params, tokens_BP[:, :-1], positions_BP[:, :-1], t_cache, valid_BS)
  d_cache = _row_cache(draft_cfg, B, num_slots, jnp.zeros((B,), jnp.int32))
  if P > 2:
    _, d_cache = _apply(draft_cfg, draft_params, tokens_BP[:, :-2], positions_BP[:, :-2], d_cache, valid_BS)
  return {
    "t_cache": t_cache,
    "d_cache": d_cache,
    "last_B2": tokens_BP[:, -2:],  # The two newest tokens; the second is not in either cache yet.
    "pos_B": lengths_B - 1,  # Position of the newest token.
    "n_B": jnp.zeros((B,), jnp.int32),  # Tokens emitted per row.
    "done_B": jnp.zeros((B,), bool),
    "round": jnp.zeros((), jnp.int32),
    "rounds_B": jnp.zeros((B,), jnp.int32),
    "accepted_B": jnp.zeros((B,), jnp.int32),
    # As in sample.py, stop_width - 1 columns of -1 first; then room for a last round's k + 1 tokens.
    "out_BW": jnp.full((B, consts["stop_QL"].shape[1] - 1 + mode.num_steps + K), -1, jnp.int32),
  }


def _draft(draft_cfg, mode, draft_params, state, key, consts):
  """(draft cache, k proposals per row, the filtered distributions they were drawn from or None)."""
  B = state["pos_B"].shape[0]
  K = mode.draft_tokens
  valid_BS = consts["valid_BS"]

  def pick(logits_BV, i):
    if mode.greedy:
      return sampling.first_argmax(_limited(logits_BV, consts)), None
    logits_BV = filtered_logits(logits_BV, consts)
    tok_B = sampling.sample_categorical(jax.random.fold_in(key, i), logits_BV)
    return tok_B, jax.nn.softmax(logits_BV, axis=-1)

  pos_B2 = jnp.maximum(state["pos_B"][:, None] + jnp.arange(-1, 1)[None], 0)
  logits_B2V, cache = _apply(draft_cfg, draft_params, state["last_B2"], pos_B2, state["d_cache"], valid_BS)
  tok_B, probs_BV = pick(logits_B2V[:, -1], 0)
  draft_BK = jnp.zeros((B, K), jnp.int32).at[:, 0].set(tok_B)
  V = logits_B2V.shape[-1]
  probs_BKV = None if mode.greedy else jnp.zeros((B, K, V), jnp.float32).at[:, 0].set(probs_BV)

  def step(i, carry):
    cache, draft_BK, probs_BKV = carry
    tok_B1 = jax.lax.dynamic_slice_in_dim(draft_BK, i - 1, 1, axis=1)
    logits_B1V, cache = _apply(
      draft_cfg, draft_params, tok_B1, (state["pos_B"] + i)[:, None], cache, valid_BS
    )
    tok_B, probs_BV = pick(logits_B1V[:, 0], i)
    draft_BK = jax.lax.dynamic_update_slice_in_dim(draft_BK, tok_B[:, None], i, axis=1)
    if probs_BKV is not None:
      probs_BKV = jax.lax.dynamic_update_slice_in_dim(probs_BKV, probs_BV[:, None], i, axis=1)
    return cache, draft_BK, probs_BKV

  return jax.lax.fori_loop(1, K, step, (cache, draft_BK, probs_BKV))


def _round(target_cfg, draft_cfg, mode, target_params, draft_params, state, consts):
  """One round: k draft steps, one target pass over k + 1 positions, acceptance, bookkeeping."""
  K = mode.draft_tokens
  J = K + 1
  key = jax.random.fold_in(consts["key"], state["round"])
  draft_key, accept_key = jax.random.split(key)
  d_cache, draft_BK, probs_BKV = _draft(draft_cfg, mode, draft_params, state, draft_key, consts)

  tokens_BJ = jnp.concatenate([state["last_B2"][:, 1:], draft_BK], axis=1)
  positions_BJ = state["pos_B"][:, None] + jnp.arange(J)[None]
  logits_BJV, t_cache = _apply(
    target_cfg, target_params, tokens_BJ, positions_BJ, state["t_cache"], consts["valid_BS"]
  )
  if mode.greedy:
    emitted_BJ, num_B = accept_greedy(logits_BJV, draft_BK, consts)
  else:
    emitted_BJ, num_B = accept_sampled(accept_key, logits_BJV, draft_BK, probs_BKV, consts)

  # Stopping inside the round: EOT or a stop sequence ending at emitted token j <= num_B.
  stop_QL = consts["stop_QL"]
  L = stop_QL.shape[1]
  active_B = ~state["done_B"]
  write = jax.vmap(functools.partial(jax.lax.dynamic_update_slice_in_dim, axis=0))
  out_BW = write(state["out_BW"], emitted_BJ, L - 1 + state["n_B"])
  read = jax.vmap(lambda row, start: jax.lax.dynamic_slice_in_dim(row, start, L))
  stop_at_BJ = []
  for j in range(J):
    tail_BL = read(out_BW, state["n_B"] + j)
    match_BQL = (tail_BL[:, None, :] == stop_QL[None]) | (stop_QL[None] < 0)
    stop_at_BJ.append(jnp.any(jnp.all(match_BQL, axis=-1), axis=-1) | (emitted_BJ[:, j] == consts["eot_id"]))
  stop_at_BJ = jnp.stack(stop_at_BJ, axis=1) & (jnp.arange(J)[None] <= num_B[:, None])
  stops_B = jnp.any(stop_at_BJ, axis=-1)
  # Tokens this row keeps: up to and including a stop, at most num_B + 1.
  first_stop_B = jnp.argmax(stop_at_BJ, axis=-1).astype(jnp.int32)
  keep_B = jnp.where(stops_B, first_stop_B + 1, num_B + 1)
  keep_B = jnp.where(active_B, keep_B, 0)
  # Columns past a row's count are overwritten by its next round (or cut on the host).
  out_BW = jnp.where(active_B[:, None], out_BW, state["out_BW"])
  n_B = state["n_B"] + keep_B
  newest_B2 = jnp.take_along_axis(
    jnp.concatenate([state["last_B2"][:, 1:], emitted_BJ], axis=1),
    jnp.maximum(keep_B, 1)[:, None] - 1 + jnp.arange(2)[None],
    axis=1,
  )
  last_B2 = jnp.where(active_B[:, None], newest_B2, state["last_B2"])
  t_cache = dict(t_cache, end=state["t_cache"]["end"] + keep_B)
  # The draft re-feeds the second newest token: its cache ends one slot before the target's.
  d_cache = dict(d_cache, end=jnp.where(active_B, t_cache["end"] - 1, state["d_cache"]["end"]))
  return dict(
    state,
    t_cache=t_cache,
    d_cache=d_cache,
    last_B2=last_B2,
    pos_B=state["pos_B"] + keep_B,
    n_B=n_B,
    done_B=state["done_B"] | stops_B | (n_B >= mode.num_steps),
    round=state["round"] + 1,
    rounds_B=state["rounds_B"] + active_B,
    accepted_B=state["accepted_B"] + jnp.where(active_B, jnp.minimum(num_B, keep_B), 0),
    out_BW=out_BW,
  )


@functools.lru_cache(maxsize=16)
def _program(target_cfg, draft_cfg, mode: _Mode):
  def run(target_params, draft_params, tokens_BP, lengths_B, consts):
    state = _prefill(target_cfg, draft_cfg, mode, target_params, draft_params, tokens_BP, lengths_B, consts)
    state = jax.lax.while_loop(
      lambda s: ~jnp.all(s["done_B"]),
      lambda s: _round(target_cfg, draft_cfg, mode, target_params, draft_params, s, consts),
      state,
    )
    keys = ("out_BW", "n_B", "round", "rounds_B", "accepted_B")
    return {k: state[k] for k in keys}

  return jax.jit(run)


# ------------------------------------------------------------ host side


@dataclasses.dataclass(eq=False)
class Draft:
  """A draft model for `sample.generate(..., draft=)`: it proposes `tokens` (k) tokens per round."""

  cfg: model_config.ModelConfig
  params: Any
  tokens: int = 4

  def __post_init__(self):
    self.cfg = model_config.of(self.cfg)
    check_draft_tokens(self.tokens)


def check_draft_tokens(k, flag: str = "draft_tokens") -> None:
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise UserError(f"{flag}={k!r} must be an integer >= 1")


def load_draft(
  target_cfg, target_tokenizer, *, workdir=None, hf_dir=None, draft_tokens: int = 4, weights: str = "float32"
) -> Draft | None:
  """The draft from a gpt_jax workdir or a Hugging Face folder (None if neither is given), checked
  against the target (same tokenizer, vocabulary, and at least its context) and in `weights`."""
  if workdir and hf_dir:
    raise UserError("give at most one of --draft_workdir or --draft_hf_dir")
  if not (workdir or hf_dir):
    return None
  check_draft_tokens(draft_tokens, "--draft_tokens")
  quantize.check_weights(weights)
  if hf_dir and not loading.is_hf_dir(hf_dir):
    raise UserError(f"--draft_hf_dir={hf_dir} is not a Hugging Face GPT-2 folder (config.json with n_embd)")
  cfg, params, tok = loading.load_for_inference(
    workdir=workdir or None, hf_dir=hf_dir or None, weights=weights
  )
  check_pair(target_cfg, cfg, target_tokenizer, tok)
  return Draft(cfg, params, draft_tokens)


def define_flags() -> None:
  """--draft_workdir / --draft_hf_dir / --draft_tokens / --weights, shared by sample, evaluate and chat."""
  flags.DEFINE_string("draft_workdir", None, "Draft model for speculative decoding: a gpt_jax workdir.")
  flags.DEFINE_string("draft_hf_dir", None, "Draft model for speculative decoding: a Hugging Face folder.")
  flags.DEFINE_integer("draft_tokens", 4, "Tokens the draft proposes per target pass (k).")
  flags.DEFINE_enum(
    "weights", "float32", list(quantize.WEIGHT_FORMATS), "Matmul weights for decoding (weight-only)."
  )


def draft_from_flags(target_cfg, target_tokenizer) -> Draft | None:
  F = flags.FLAGS
  return load_draft(
    target_cfg,
    target_tokenizer,
    workdir=F.draft_workdir,
    hf_dir=F.draft_hf_dir,
    draft_tokens=F.draft_tokens,
    weights=F.weights,
  )


def check_pair(target_cfg, draft_cfg, target_tokenizer=None, draft_tokenizer=None) -> None:
  """Raises UserError (one line) for a draft that cannot propose for this target."""
  if target_tokenizer is not None and draft_tokenizer is not None:
    t, d = target_tokenizer.fingerprint, draft_tokenizer.fingerprint
    if t != d:
      raise UserError(
        f"the draft's tokenizer (fingerprint {d[:12]}) is not the target's ({t[:12]}): both must share one"
      )
  if draft_cfg.vocab_size != target_cfg.vocab_size:
    raise UserError(
      f"draft model.vocab_size={draft_cfg.vocab_size} differs from the target's {target_cfg.vocab_size}"
    )
  if draft_cfg.block_size < target_cfg.block_size:
    raise UserError(
      f"draft model.block_size={draft_cfg.block_size} is shorter than the target's "
      f"{target_cfg.block_size}: the draft must see every position the target decodes"
    )


def _decode_layout(cfg, params, max_new_tokens):
  """sample.decode's config and params layout (on CPU: unstacked layers, [out, in] kernels)."""
  cfg = sampling.decode_config(cfg, max_new_tokens, None)
  if cfg.kernel_layout == "out_in":
    params = sampling.cpu_decode_layout(params)
  return cfg, params


def decode(
  target_cfg,
  target_params,
  draft_cfg,
  draft_params,
  prompts,
  *,
  max_new_tokens: int,
  draft_tokens: int = 4,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  seed: int = 0,
  eot_id: int | None = None,
  stop_sequences=None,
  vocab_limit: int | None = None,
) -> Decoded:
  """The device part of `generate`: raw tokens (not cut) and acceptance counts."""
  sampling.check_sampling(temperature, top_k, top_p, max_new_tokens)
  check_pair(target_cfg, draft_cfg)
  k = draft_tokens
  check_draft_tokens(k)
  block = min(target_cfg.block_size, draft_cfg.block_size)
  if max_new_tokens + k >= block:
    raise UserError(
      f"max_new_tokens={max_new_tokens} + draft_tokens={k} must be < model.block_size={block} "
      "(the target scores k positions past the last token)"
    )
  # Room for the prompt: the last round may write k slots past max_new_tokens.
  sized = types.SimpleNamespace(block_size=block, vocab_size=target_cfg.vocab_size)
  tokens_BP, lengths_B = sampling.prepare_prompts(sized, prompts, max_new_tokens + k, eot_id)
  if tokens_BP.shape[1] == 1:  # The draft's first step reads two tokens: one masked pad slot.
    tokens_BP = np.pad(tokens_BP, ((0, 0), (1, 0)))
  B, P = tokens_BP.shape
  if max_new_tokens == 0:
    z = np.zeros((B,), np.int64)
    return Decoded(np.zeros((B, 0), np.int32), 0, 0, z, z, z, k)
  _, stop_QL = sampling.stop_array(stop_sequences)
  num_slots = P + max_new_tokens + k - 1
  consts = {
    "valid_BS": np.arange(num_slots)[None, :] >= (P - lengths_B)[:, None],
    "stop_QL": stop_QL,
    "key": jax.random.key_data(jax.random.key(seed)),
    "temperature": np.float32(temperature or 1.0),
    "top_k": np.int32(top_k),
    "top_p": np.float32(top_p),
    "eot_id": np.int32(-1 if eot_id is None else eot_id),
    "pad_id": np.int32(eot_id or 0),
    "vocab_limit": np.int32(vocab_limit or target_cfg.vocab_size),
  }
  target_frozen, target_params = _decode_layout(target_cfg, target_params, max_new_tokens)
  draft_frozen, draft_params = _decode_layout(draft_cfg, draft_params, max_new_tokens)
  mode = _Mode(num_steps=max_new_tokens, draft_tokens=k, greedy=temperature == 0)
  run = _program(target_frozen, draft_frozen, mode)
  out = jax.device_get(run(target_params, draft_params, tokens_BP, lengths_B, consts))
  n_B = np.minimum(np.asarray(out["n_B"]), max_new_tokens)
  tokens = np.asarray(out["out_BW"])[:, stop_QL.shape[1] - 1 :][:, :max_new_tokens]
  # Rows that stopped early: pad after their last token, as sample.decode writes them.
  tokens = np.where(np.arange(max_new_tokens)[None] < n_B[:, None], tokens, consts["pad_id"])
  return Decoded(
    tokens_BN=tokens,
    steps=int(n_B.max()),
    rounds=int(out["round"]),
    rounds_B=np.asarray(out["rounds_B"]),
    accepted_B=np.asarray(out["accepted_B"]),
    emitted_B=n_B,
    draft_tokens=k,
  )


def generate(
  target_cfg,
  target_params,
  draft_cfg,
  draft_params,
  prompts: list[list[int]],
  *,
  max_new_tokens: int,
  draft_tokens: int = 4,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  seed: int = 0,
  eot_id: int | None = None,
  stop_sequences: list[list[int]] | None = None,
  vocab_limit: int | None = None,
  stats: dict | None = None,
) -> list[list[int]]:
  """`sample.generate` with a draft model: the same arguments and result.

  Greedy output equals plain greedy decoding's (up to float rounding between
  a one-token and a (k + 1)-token forward pass, which can only flip exact
  near-ties); sampled output follows the same filtered distribution (not the
  same tokens for a seed). `stats`, if given, receives `acceptance_rate`,
  `tokens_per_pass` and `rounds`. A prompt keeps its last
  block_size - max_new_tokens - draft_tokens tokens.
  """
  if len(prompts) == 0:
    return []
  decoded = decode(
    target_cfg,
    target_params,
    draft_cfg,
    draft_params,
    prompts,
    max_new_tokens=max_new_tokens,
    draft_tokens=draft_tokens,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    seed=seed,
    eot_id=eot_id,
    stop_sequences=stop_sequences,
    vocab_limit=vocab_limit,
  )
  if stats is not None:
    stats.update(
      acceptance_rate=decoded.acceptance_rate, tokens_per_pass=decoded.tokens_per_pass, rounds=decoded.rounds
    )
  stops, _ = sampling.stop_array(stop_sequences)
  return [
    sampling.cut_generation(row[:n].tolist(), eot_id, stops)
    for row, n in zip(decoded.tokens_BN, decoded.emitted_B)
  ]

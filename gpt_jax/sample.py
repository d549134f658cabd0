"""Autoregressive generation with a KV cache, and its CLI.

    python -m gpt_jax.sample --hf_dir=/models/gpt2 --prompt="Hello" --temperature=0.8 --top_k=40

Prompts are left-padded to a bucketed length and prefilled into a cache of
`prompt bucket + max_new_tokens - 1` slots; then one token per step is fed
back. Without a streaming callback the whole loop (prefill included) is one
jitted `lax.while_loop`, compiled once per (batch, prompt bucket,
max_new_tokens, greedy or sampled) and ending as soon as every row has
stopped; temperature, top-k, top-p, seed and stop tokens are traced values,
so changing them does not recompile. How each token is chosen (temperature,
top-k, top-p) is gpt_jax.sampling's; with a draft model the tokens come from
gpt_jax.speculative instead.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from gpt_jax import cli, loading, sampling, sharding, speculative
from gpt_jax import model as model_lib
from gpt_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class _Mode:
  """What shapes the compiled program besides the arrays' shapes."""

  num_steps: int
  greedy: bool = False
  keep_logits: bool = False


# ------------------------------------------------------- device programs


def _prefill(cfg, mode: _Mode, params, tokens_BP, lengths_B, stop_QL, consts):
  """Writes all but the last prompt token into a fresh cache; returns the loop state.

  The last prompt token is fed by the first decode step, so the prefill's
  [B, P, V] logits are never used and XLA drops the vocabulary matmul.
  """
  B, P = tokens_BP.shape
  pad_B = P - lengths_B
  num_slots = P + mode.num_steps - 1
  cache = model_lib.init_cache(cfg, B, num_slots)
  if P > 1:
    positions_BP = jnp.maximum(jnp.arange(P)[None, :] - pad_B[:, None], 0)
    _, cache = model_lib.GPT(cfg).apply(
      {"params": params},
      tokens_BP[:, :-1],
      positions_BT=positions_BP[:, :-1],
      cache=cache,
      key_valid_BS=consts["valid_BS"],
    )
  stop_width = stop_QL.shape[1]
  state = {
    "cache": cache,
    "tok_B": tokens_BP[:, -1],
    "pos_B": lengths_B - 1,
    "i": jnp.zeros((), jnp.int32),
    "done_B": jnp.zeros((B,), bool),
    # Generated tokens, after stop_width - 1 columns of -1 so the last
    # stop_width tokens are one dynamic_slice away at every step.
    "out_BW": jnp.full((B, stop_width - 1 + mode.num_steps), -1, jnp.int32),
  }
  if mode.keep_logits:
    state["logits_BNV"] = jnp.zeros((B, mode.num_steps, cfg.vocab_size), jnp.float32)
  return state


def _step(cfg, mode: _Mode, params, state, stop_QL, consts):
  """Feeds one token per row, samples the next, records it and who has stopped."""
  B = state["tok_B"].shape[0]
  i = state["i"]
  logits_B1V, cache = model_lib.GPT(cfg).apply(
    {"params": params},
    state["tok_B"][:, None],
    positions_BT=state["pos_B"][:, None],
    cache=state["cache"],
    key_valid_BS=consts["valid_BS"],
  )
  logits_BV = logits_B1V[:, 0]
  tok_B = sampling.choose(logits_BV, jax.random.fold_in(consts["key"], i), consts, mode.greedy)
  tok_B = jnp.where(state["done_B"], consts["pad_id"], tok_B)
  stop_width = stop_QL.shape[1]
  out_BW = jax.lax.dynamic_update_slice(state["out_BW"], tok_B[:, None], (0, stop_width - 1 + i))
  tail_BL = jax.lax.dynamic_slice(out_BW, (0, i), (B, stop_width))
  # Stop sequences are right-aligned in stop_QL; -1 marks unused columns.
  match_BQL = (tail_BL[:, None, :] == stop_QL[None]) | (stop_QL[None] < 0)
  stopped_B = jnp.any(jnp.all(match_BQL, axis=-1), axis=-1) | (tok_B == consts["eot_id"])
  new = dict(state, cache=cache, tok_B=tok_B, pos_B=state["pos_B"] + 1, i=i + 1, out_BW=out_BW)
  new["done_B"] = state["done_B"] | stopped_B
  if mode.keep_logits:
    new["logits_BNV"] = jax.lax.dynamic_update_slice(state["logits_BNV"], logits_BV[:, None], (0, i, 0))
  return new


def _replicated(tree, mesh):
  if mesh is None:
    return tree
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, rep), tree)


def _results(state, mode, mesh):
  out = {"out_BW": state["out_BW"], "steps": state["i"]}
  if mode.keep_logits:
    out["logits_BNV"] = state["logits_BNV"]
  return _replicated(out, mesh)


@functools.lru_cache(maxsize=32)
def _programs(cfg, mode: _Mode, mesh):
  """Jitted (whole decode, prefill, single step) for one frozen model config and mode."""

  def decode(params, tokens_BP, lengths_B, stop_QL, consts):
    state = _prefill(cfg, mode, params, tokens_BP, lengths_B, stop_QL, consts)
    state = jax.lax.while_loop(
      lambda s: (s["i"] < mode.num_steps) & ~jnp.all(s["done_B"]),
      lambda s: _step(cfg, mode, params, s, stop_QL, consts),
      state,
    )
    return _results(state, mode, mesh)

  def step(params, state, stop_QL, consts):
    state = _step(cfg, mode, params, state, stop_QL, consts)
    return state, _replicated((state["tok_B"], state["done_B"]), mesh)

  prefill = functools.partial(_prefill, cfg, mode)
  return (
    jax.jit(decode),
    jax.jit(prefill),
    jax.jit(step, donate_argnums=1),
    jax.jit(functools.partial(_results, mode=mode, mesh=mesh)),
  )


@dataclasses.dataclass
class Decoded:
  """Raw decode output: tokens_BN (rows padded after they stop), steps run, optional logits."""

  tokens_BN: np.ndarray
  steps: int
  logits_BNV: np.ndarray | None = None


def decode(
  model_cfg,
  params,
  prompts,
  *,
  max_new_tokens: int,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  seed: int = 0,
  eot_id: int | None = None,
  stop_sequences=None,
  on_token=None,
  vocab_limit: int | None = None,
  keep_logits: bool = False,
) -> Decoded:
  """The device part of `generate`: raw tokens (not cut), optionally the logits of every step."""
  sampling.check_sampling(temperature, top_k, top_p)
  tokens_BP, lengths_B = sampling.prepare_prompts(model_cfg, prompts, max_new_tokens, eot_id)
  B, P = tokens_BP.shape
  _, stop_QL = sampling.stop_array(stop_sequences)
  mode = _Mode(num_steps=max_new_tokens, greedy=temperature == 0, keep_logits=keep_logits)
  mesh = sharding.params_mesh(params)
  num_slots = P + max_new_tokens - 1
  consts = {
    "valid_BS": np.arange(num_slots)[None, :] >= (P - lengths_B)[:, None],
    "key": jax.random.key_data(jax.random.key(seed)),
    "temperature": np.float32(temperature or 1.0),
    "top_k": np.int32(top_k),
    "top_p": np.float32(top_p),
    "eot_id": np.int32(-1 if eot_id is None else eot_id),
    "pad_id": np.int32(eot_id or 0),
    "vocab_limit": np.int32(vocab_limit or model_cfg.vocab_size),
  }
  args = (tokens_BP, lengths_B, stop_QL, consts)
  if mesh is not None:
    args = jax.device_put(args, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  if max_new_tokens == 0:
    return Decoded(
      np.zeros((B, 0), np.int32), 0, np.zeros((B, 0, model_cfg.vocab_size)) if keep_logits else None
    )
  cfg = sampling.decode_config(model_cfg, max_new_tokens, mesh)
  if cfg.kernel_layout == "out_in":
    # One copy of the weights per call (a few steps' time) in the layout XLA:CPU decodes fastest.
    params = sampling.cpu_decode_layout(params)
  run_all, prefill, step, results = _programs(cfg, mode, mesh)
  if on_token is None:
    out = run_all(params, *args)
  else:
    state = prefill(params, *args)
    for i in range(max_new_tokens):
      state, (tok_B, done_B) = step(params, state, *args[2:])
      on_token(i, np.asarray(tok_B))
      if np.asarray(done_B).all():
        break
    out = results(state)
  logits = np.asarray(out["logits_BNV"]) if keep_logits else None
  return Decoded(np.asarray(out["out_BW"])[:, stop_QL.shape[1] - 1 :], int(out["steps"]), logits)


def generate(
  model_cfg,
  params,
  prompts: list[list[int]],
  *,
  max_new_tokens: int,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  seed: int = 0,
  eot_id: int | None = None,
  stop_sequences: list[list[int]] | None = None,
  on_token=None,
  vocab_limit: int | None = None,
  draft: speculative.Draft | None = None,
  stats: dict | None = None,
) -> list[list[int]]:
  """Generated ids per prompt (prompt excluded), cut at EOT / a stop sequence (both excluded).

  temperature 0 = greedy; top_k 0 and top_p 1 = off. The same call gives the
  same tokens (the key is `seed` folded with the step). An empty prompt starts
  from `eot_id`; a prompt longer than block_size - max_new_tokens keeps its
  last tokens (with a warning). `on_token(step, tokens_B)` streams each step's
  tokens (rows that have stopped get eot_id, or 0); without it the loop runs
  entirely on device. `vocab_limit` forbids ids >= it (a tokenizer smaller
  than the model's vocabulary).

  With a `draft` model the tokens come from speculative decoding: greedy
  output is plain greedy's, sampled output follows the same distribution
  (gpt_jax.speculative); `stats` then receives the acceptance rate and
  tokens per target pass. It does not stream (`on_token` must be None).
  """
  if len(prompts) == 0:
    return []
  if draft is not None:
    if on_token is not None:
      raise ValueError("on_token streaming is not available with a draft model")
    return speculative.generate(
      model_cfg,
      params,
      draft.cfg,
      draft.params,
      prompts,
      max_new_tokens=max_new_tokens,
      draft_tokens=draft.tokens,
      temperature=temperature,
      top_k=top_k,
      top_p=top_p,
      seed=seed,
      eot_id=eot_id,
      stop_sequences=stop_sequences,
      vocab_limit=vocab_limit,
      stats=stats,
    )
  decoded = decode(
    model_cfg,
    params,
    prompts,
    max_new_tokens=max_new_tokens,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    seed=seed,
    eot_id=eot_id,
    stop_sequences=stop_sequences,
    on_token=on_token,
    vocab_limit=vocab_limit,
  )
  stops, _ = sampling.stop_array(stop_sequences)
  return [sampling.cut_generation(row[: decoded.steps].tolist(), eot_id, stops) for row in decoded.tokens_BN]


def cut_text(text: str, stop_strings) -> str:
  """Text before the earliest occurrence of any stop string."""
  cuts = [text.find(s) for s in stop_strings if s and s in text]
  return text[: min(cuts)] if cuts else text


def _generate_texts(model_cfg, params, tokenizer, prompts, stop_strings=(), **kw):
  """(ids, texts) per prompt; ids trimmed to the text when a stop string cut inside them."""
  stop_strings = [s for s in stop_strings if s]
  kw.setdefault("eot_id", tokenizer.eot_id)
  kw["stop_sequences"] = list(kw.get("stop_sequences") or []) + [tokenizer.encode(s) for s in stop_strings]
  kw.setdefault("vocab_limit", min(tokenizer.vocab_size, model_cfg.vocab_size))
  ids = generate(model_cfg, params, [tokenizer.encode(p) for p in prompts], **kw)
  texts = []
  for n, row in enumerate(ids):
    full = tokenizer.decode(row)
    text = cut_text(full, stop_strings)
    if text != full:  # The stop string came out under another tokenisation.
      keep = len(row)
      while keep and not text.startswith(tokenizer.decode(row[:keep])):
        keep -= 1
      ids[n] = row[:keep]
    texts.append(text)
  return ids, texts


def generate_text(model_cfg, params, tokenizer, prompts: list[str], *, stop_strings=(), **kw) -> list[str]:
  """Text continuations of text prompts (an empty prompt starts from EOT).

  Each stop string stops a row early when the model emits its usual
  tokenisation, and the text is always cut before its first occurrence.
  Keyword arguments are those of `generate`; eot_id defaults to the tokenizer's.
  """
  return _generate_texts(model_cfg, params, tokenizer, prompts, stop_strings, **kw)[1]


class TextStreamer:
  """Writes one row's text as its tokens arrive, never printing a partial character or stop string."""

  def __init__(self, tokenizer, stop_strings=(), row: int = 0, out=None):
    self.tokenizer, self.row, self.out = tokenizer, row, out or sys.stdout
    self.stop_strings = [s for s in stop_strings if s]
    self.ids, self.printed, self.finished = [], "", False

  def __call__(self, step, tokens_B):
    tok = int(tokens_B[self.row])
    if self.finished or tok == self.tokenizer.eot_id:
      self.finished = True
      return
    self.ids.append(tok)
    text = self.tokenizer.decode(self.ids)
    safe = cut_text(text, self.stop_strings)
    if safe != text:
      self.finished = True
    else:
      # Hold back an incomplete UTF-8 character and a possible stop-string prefix.
      safe = safe.rstrip("\ufffd")
      held = max([n for s in self.stop_strings for n in range(1, len(s)) if safe.endswith(s[:n])], default=0)
      safe = safe[: len(safe) - held]
    self._write(safe)

  def finish(self, final_text: str):
    self._write(final_text)

  def _write(self, text):
    if text.startswith(self.printed) and len(text) > len(self.printed):
      self.out.write(text[len(self.printed) :])
      self.out.flush()
      self.printed = text


# ------------------------------------------------------------------ CLI


def _define_flags():
  flags.DEFINE_string(
    "workdir", None, "gpt_jax training run directory (config.json, tokenizer/, checkpoints)."
  )
  flags.DEFINE_string(
    "hf_dir", None, "Local Hugging Face GPT-2 folder (config.json, model.safetensors, ...)."
  )
  flags.DEFINE_string("prompt", "", "Prompt text; empty = start from <|endoftext|>.")
  flags.DEFINE_integer("num_samples", 1, "Samples to draw (one batch).")
  flags.DEFINE_integer("max_new_tokens", 100, "Tokens to generate per sample.")
  flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 = greedy.")
  flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens; 0 = off.")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass; 1 = off.")
  flags.DEFINE_integer("seed", 0, "Sampling seed (same seed, same samples).")
  flags.DEFINE_multi_string("stop", [], "Stop a sample before this string (repeatable).")
  flags.DEFINE_bool("json", False, "Print one JSON object per sample: prompt, tokens, text.")
  speculative.define_flags()


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  F = flags.FLAGS
  if bool(F.workdir) == bool(F.hf_dir):
    raise UserError("give exactly one of --workdir or --hf_dir")
  if F.num_samples < 1:
    raise UserError(f"--num_samples={F.num_samples} must be >= 1")
  sampling.check_sampling(F.temperature, F.top_k, F.top_p, F.max_new_tokens)
  cfg, params, tokenizer = loading.load_for_inference(workdir=F.workdir, hf_dir=F.hf_dir, weights=F.weights)
  draft = speculative.draft_from_flags(cfg, tokenizer)
  stats = {}
  # Speculative decoding emits a round's tokens at once: no per-step streaming.
  stream = not F.json and sys.stdout.isatty() and draft is None
  streamer = TextStreamer(tokenizer, F.stop) if stream else None
  if stream:
    sys.stdout.write(F.prompt)
  ids, texts = _generate_texts(
    cfg,
    params,
    tokenizer,
    [F.prompt] * F.num_samples,
    F.stop,
    max_new_tokens=F.max_new_tokens,
    temperature=F.temperature,
    top_k=F.top_k,
    top_p=F.top_p,
    seed=F.seed,
    on_token=streamer,
    draft=draft,
    stats=stats,
  )
  if draft is not None:
    print(
      f"speculative decoding: {stats['acceptance_rate']:.1%} of the draft's k={draft.tokens} proposals "
      f"accepted, {stats['tokens_per_pass']:.2f} tokens per target pass ({stats['rounds']} passes)",
      file=sys.stderr,
      flush=True,
    )
  for n, (row, text) in enumerate(zip(ids, texts)):
    if F.json:
      print(json.dumps({"prompt": F.prompt, "tokens": row, "text": text}, ensure_ascii=False), flush=True)
      continue
    if n:
      print("-" * 40)
    if stream and n == 0:
      streamer.finish(text)
      print(flush=True)
    else:
      print(F.prompt + text, flush=True)


if __name__ == "__main__":
  _define_flags()
  cli.run(main)

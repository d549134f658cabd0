"""DialoGPT-style multi-turn chat with MMI reranking (Zhang et al. 2020), in the terminal.

    python -m gpt_jax.chat --workdir=runs/dialogue
    python -m gpt_jax.chat --workdir=runs/dialogue --mmi_workdir=runs/dialogue_backward
    python -m gpt_jax.chat --workdir=runs/dialogue --once "Hello there"

--workdir is a forward dialogue model (configs/dialogue.py), --mmi_workdir an
optional backward one (configs/dialogue_backward.py): the same recipe on
reversed turns, so it scores P(source | response).

Each reply: the history is laid out as in training,
    <|endoftext|> t_1 <|endoftext|> ... t_n <|endoftext|>
keeping the newest turns that fit in block_size - max_new_tokens tokens (the
oldest are dropped first). The forward model samples the response until
<|endoftext|>. With a backward model, K candidates are sampled (top-k) and the
one with the highest backward log P(source | candidate) is returned
(DialoGPT's MMI step; an empty candidate is chosen only if all are empty).
The source is scored exactly as the backward model was trained on it:
<|endoftext|> candidate <|endoftext|> t_n <|endoftext|> ... t_1 <|endoftext|>,
summing the log-probabilities of everything after the candidate; the same
history turns are scored for every candidate, so the sums are comparable.

Reading a terminal, the chat prompts with "you> " and answers with "bot> ";
reading a pipe, it prints one reply per input line and nothing else. A reply
is always one line: the line breaks a model trained on verse or scripts
produces are shown as " / " (the history keeps them). An empty line is
skipped; "/reset" forgets the history; "/quit" or end of input exits.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from gpt_jax import cli, loading, model_config, sample, sampling, speculative
from gpt_jax import model as model_lib
from gpt_jax.errors import UserError
from gpt_jax.finetune_data import dialogue_sequence, join_turns
from gpt_jax.model_config import ModelConfig


@dataclasses.dataclass
class Model:
  cfg: ModelConfig  # A config.model section is converted.
  params: Any
  tok: Any  # tokenizer.Tokenizer
  draft: Any = None  # speculative.Draft: replies decoded speculatively (the forward model only).

  def __post_init__(self):
    self.cfg = model_config.of(self.cfg)


def load(workdir: str, weights: str = "float32") -> Model:
  cfg, params, tok = loading.load_for_inference(workdir=workdir, weights=weights)
  return Model(cfg, params, tok)


def fit_history(turns: list[list[int]], eot: int, room: int) -> list[list[int]]:
  """The newest turns whose joined sequence has at most `room` tokens.

  The oldest turns go first; if the newest alone is too long it keeps its
  last tokens (what the reply answers).
  """
  turns = list(turns)
  while len(turns) > 1 and len(join_turns(turns, eot)) > room:
    turns.pop(0)
  if turns and len(join_turns(turns, eot)) > room:
    turns = [turns[-1][len(turns[-1]) - max(room - 2, 0) :]]
  return turns


@functools.lru_cache(maxsize=8)
def _logprob_program(cfg):
  def fn(params, tokens_BT, mask_BT):
    logits_BTV = model_lib.GPT(cfg).apply({"params": params}, tokens_BT[:, :-1])
    logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
    target_BT = jnp.take_along_axis(logp_BTV, tokens_BT[:, 1:, None], axis=-1)[..., 0]
    return (target_BT * mask_BT).sum(-1)

  return jax.jit(fn)


def sequence_logprobs(m: Model, seqs: list[list[int]], masks: list[list[int]]) -> np.ndarray:
  """Sum of log p(tokens[j + 1] | tokens[: j + 1]) over the j where mask[j] = 1, per sequence."""
  length = sampling.prompt_bucket(max(len(s) for s in seqs), m.cfg.block_size + 1)
  tokens_BT = np.zeros((len(seqs), length), np.int32)
  mask_BT = np.zeros((len(seqs), length - 1), np.float32)
  for b, (s, k) in enumerate(zip(seqs, masks)):
    tokens_BT[b, : len(s)] = s
    mask_BT[b, : len(k)] = k
  return np.asarray(_logprob_program(m.cfg)(m.params, tokens_BT, mask_BT), np.float64)


def backward_scores(bwd: Model, history: list[list[int]], candidates: list[list[int]]) -> np.ndarray:
  """log P_backward(source | candidate) for each candidate; source = the history turns.

  The history turns kept (newest first, as reversed training saw them) are
  the same for every candidate: those that fit beside the longest candidate.
  """
  eot = bwd.tok.eot_id
  longest = max(len(c) for c in candidates)
  room = bwd.cfg.block_size + 1 - (longest + 2)  # Tokens left after <eot> candidate <eot>.
  kept = list(history)
  while kept and sum(len(t) + 1 for t in kept) > room:
    if len(kept) > 1:
      kept.pop(0)
    else:  # The newest turn alone is too long: keep its start, next to the candidate.
      kept = [kept[0][: max(room - 1, 0)]] if room > 1 else []
  if not kept:
    return np.zeros(len(candidates))
  seqs, masks = [], []
  for c in candidates:
    tokens, mask = dialogue_sequence(
      [*kept, c], eot, max_len=bwd.cfg.block_size, loss_turns="all", reverse=True
    )
    seqs.append(tokens)
    masks.append(mask)
  return sequence_logprobs(bwd, seqs, masks)


def rerank(candidates: list[list[int]], scores) -> int:
  """Index of the best-scoring candidate (the first on ties); empty ones only if all are empty."""
  scores = np.asarray(scores, np.float64).copy()
  empty = np.array([len(c) == 0 for c in candidates])
  if not empty.all():
    scores[empty] = -np.inf
  return int(np.argmax(scores))


def respond(
  fwd: Model,
  history: list[str],
  *,
  bwd: Model | None = None,
  num_candidates: int = 16,
  top_k: int = 10,
  temperature: float = 1.0,
  max_new_tokens: int = 64,
  seed: int = 0,
) -> tuple[str, dict]:
  """The reply to the last turn of `history` (user and bot turns alternating, oldest first).

  Returns (reply text, {"candidates": [...], "scores": [...] or None}).
  Without `bwd` one sample is drawn; with it, num_candidates are reranked.
  """
  tok = fwd.tok
  eot = tok.eot_id
  if bwd is not None and bwd.tok.fingerprint != tok.fingerprint:
    raise UserError("the forward and MMI (backward) models use different tokenizers")
  max_new = min(max_new_tokens, fwd.cfg.block_size // 2)
  turns = [tok.encode(t) for t in history]
  prompt = join_turns(fit_history(turns, eot, fwd.cfg.block_size - max_new), eot)
  k = num_candidates if bwd is not None else 1
  candidates = sample.generate(
    fwd.cfg,
    fwd.params,
    [prompt] * k,
    max_new_tokens=max_new,
    temperature=temperature,
    top_k=top_k,
    seed=seed,
    eot_id=eot,
    vocab_limit=min(tok.vocab_size, fwd.cfg.vocab_size),
    draft=fwd.draft,
  )
  scores = backward_scores(bwd, turns, candidates) if bwd is not None else np.zeros(len(candidates))
  best = rerank(candidates, scores)
  texts = [tok.decode(c).strip() for c in candidates]
  return texts[best], {"candidates": texts, "scores": scores.tolist() if bwd is not None else None}


def one_line(text: str) -> str:
  """A reply on one line: its non-blank lines joined by " / "."""
  return " / ".join(line.strip() for line in text.splitlines() if line.strip())


def trim_history(history: list[str], tok, block_size: int) -> list[str]:
  """Drops the oldest turns that no longer fit in the context (they would be cut anyway)."""
  lengths = [len(tok.encode(t)) + 1 for t in history]
  while len(history) > 1 and 1 + sum(lengths) > block_size:
    history, lengths = history[1:], lengths[1:]
  return history


def chat_loop(fwd: Model, lines, out, *, bwd=None, interactive=False, show_candidates=False, **kw) -> None:
  """Answers each line of `lines` in turn, keeping the conversation's history."""
  history: list[str] = []
  seed = kw.pop("seed", 0)
  for n, line in enumerate(lines):
    text = line.strip()
    if not text:
      continue
    if text == "/quit":
      break
    if text == "/reset":
      history = []
      continue
    history.append(text)
    reply, info = respond(fwd, history, bwd=bwd, seed=seed + n, **kw)
    if show_candidates and info["scores"] is not None:
      for cand, score in sorted(zip(info["candidates"], info["scores"]), key=lambda x: -x[1]):
        print(f"  [{score:9.3f}] {one_line(cand)}", file=sys.stderr)
    history = trim_history([*history, reply], fwd.tok, fwd.cfg.block_size)
    print(("bot> " if interactive else "") + one_line(reply), file=out, flush=True)


def _terminal_lines():
  while True:
    try:
      yield input("you> ")
    except EOFError:
      print()
      return


# ------------------------------------------------------------------- CLI


def _define_flags():
  flags.DEFINE_string("workdir", None, "Forward dialogue model: a gpt_jax workdir or params export.")
  flags.DEFINE_string("mmi_workdir", None, "Backward dialogue model for MMI reranking (optional).")
  flags.DEFINE_string("once", None, "Reply to this one message, print the reply and exit.")
  flags.DEFINE_integer("num_candidates", 16, "Candidates sampled per reply for MMI (DialoGPT: 16).")
  flags.DEFINE_integer("top_k", 10, "Top-k sampling of the candidates; 0 = off.")
  flags.DEFINE_float("temperature", 1.0, "Sampling temperature; 0 = greedy.")
  flags.DEFINE_integer("max_new_tokens", 64, "Longest reply, in tokens (at most half the context).")
  flags.DEFINE_integer("seed", 0, "Sampling seed (turn n uses seed + n).")
  flags.DEFINE_bool(
    "show_candidates", False, "Print the MMI candidates to stderr, one per line with its score."
  )
  speculative.define_flags()
  flags.mark_flag_as_required("workdir")


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  F = flags.FLAGS
  if F.num_candidates < 1:
    raise UserError(f"--num_candidates={F.num_candidates} must be >= 1")
  fwd = load(F.workdir, F.weights)
  fwd.draft = speculative.draft_from_flags(fwd.cfg, fwd.tok)
  bwd = load(F.mmi_workdir, F.weights) if F.mmi_workdir else None
  kw = dict(
    bwd=bwd,
    num_candidates=F.num_candidates,
    top_k=F.top_k,
    temperature=F.temperature,
    max_new_tokens=F.max_new_tokens,
    seed=F.seed,
    show_candidates=F.show_candidates,
  )
  if F.once is not None:
    chat_loop(fwd, [F.once], sys.stdout, **kw)
    return
  interactive = sys.stdin.isatty()
  chat_loop(fwd, _terminal_lines() if interactive else sys.stdin, sys.stdout, interactive=interactive, **kw)


if __name__ == "__main__":
  _define_flags()
  cli.run(main)

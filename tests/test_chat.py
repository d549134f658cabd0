"""DialoGPT: the training loss, chat history, MMI reranking, and the chat CLI (the data layout:
test_finetune_data.py)."""

import io
import json
import random
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import debug
from gpt_jax import chat, checkpoint, finetune, model, pretrain, sample, tokenizer
from gpt_jax import config as config_lib
from gpt_jax import finetune_data as fd

EOT = 9


def test_chat_history_drops_its_oldest_turns_first():
  # As training data does (test_finetune_data.py: test_long_dialogues_drop_their_oldest_turns_first).
  assert chat.fit_history([[1, 1, 1], [2, 2], [3]], EOT, 6) == [[2, 2], [3]]
  assert chat.fit_history([[1, 1, 1], [2, 2, 2, 2, 2, 2]], EOT, 6) == [[2, 2, 2, 2]]


def numpy_params(init_fn, seed):
  """Random params with init_fn's shapes, drawn by numpy: compiling random initialisers is slow on CPU."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(init_fn)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape).astype(np.float32)), shapes)


def numpy_init(cfg, seed):
  """GPT params drawn like model.init_params (N(0, init_std), unit gains, zero biases), by numpy."""
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return np.ones(s.shape, np.float32)
    if "bias" in name:
      return np.zeros(s.shape, np.float32)
    return rng.normal(0.0, cfg.init_std, s.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(
    draw, jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
  )


def log_probs_fn(cfg):
  """jit(params, tokens [T]) -> log-probabilities [T, V] of the next token (one compilation per length)."""
  return jax.jit(lambda p, t: jax.nn.log_softmax(model.GPT(cfg).apply({"params": p}, t[None])[0], -1))


def test_training_loss_is_the_response_tokens_negative_log_likelihood():
  cfg = debug.get_config().model
  params = numpy_params(lambda: model.init_params(cfg, jax.random.key(0)), 0)
  log_probs = log_probs_fn(cfg)
  examples = [fd.dialogue_sequence([[1, 2, 3], [4, 5]], EOT, max_len=31, loss_turns="last", reverse=False)]
  examples.append(fd.dialogue_sequence([[6], [7], [8, 8]], EOT, max_len=31, loss_turns="last", reverse=False))
  arrays = fd.pack_dialogues(examples, 16, EOT)
  batch = {
    "tokens": jnp.asarray(arrays["tokens"], jnp.int32),
    "mask": jnp.asarray(arrays["mask"], jnp.float32),
  }
  loss_sum, weight, _ = jax.jit(pretrain.lm_loss_fn(cfg), static_argnums=3)(
    params, batch, jax.random.key(0), True
  )
  want, count = 0.0, 0
  # Example 1 trains on 4, 5, <eot> (targets of positions 4..6); example 2 on 8, 8, <eot> (4..6).
  for tokens, targets in ((examples[0][0], range(4, 7)), (examples[1][0], range(4, 7))):
    logp = log_probs(params, jnp.asarray(tokens[:-1]))
    want -= sum(float(logp[j, tokens[j + 1]]) for j in targets)
    count += len(targets)
  assert float(weight) == count == 6
  assert float(loss_sum) == pytest.approx(want, rel=1e-5)


class NumberTokenizer:
  eot_id = EOT
  vocab_size = 64
  fingerprint = "numbers"

  def encode(self, text):
    return [int(t) for t in text.split()]

  def decode(self, ids):
    return " ".join(str(i) for i in ids)


def tiny_model(seed):
  c = debug.get_config()
  c.model.vocab_size = 64
  params = numpy_params(lambda: model.init_params(c.model, jax.random.key(seed)), seed)
  return chat.Model(c.model, params, NumberTokenizer())


def direct_backward_score(m, history, candidate, log_probs):
  """log P(history | candidate) under m, from one unpadded forward pass."""
  tokens = [EOT, *candidate, EOT]
  start = len(tokens)
  for turn in reversed(history):
    tokens += [*turn, EOT]
  logp = log_probs(m.params, jnp.asarray(tokens[:-1]))
  return sum(float(logp[j, tokens[j + 1]]) for j in range(start - 1, len(tokens) - 1))


def test_mmi_reranking_picks_the_candidate_with_the_best_backward_score(monkeypatch):
  fwd, bwd = tiny_model(0), tiny_model(1)
  history = [[11, 12, 13], [14, 15]]
  candidates = [[20, 21], [22], [23, 24, 25], [26, 27]]
  scores = chat.backward_scores(bwd, history, candidates)
  log_probs = log_probs_fn(bwd.cfg)
  want = [direct_backward_score(bwd, history, c, log_probs) for c in candidates]
  np.testing.assert_allclose(scores, want, rtol=1e-5)
  assert len(set(np.round(want, 4))) == len(want)  # Distinct: picking the wrong one would show.
  assert chat.rerank(candidates, scores) == int(np.argmax(want))
  # respond() samples K candidates from the forward model and returns the reranked best.
  monkeypatch.setattr(sample, "generate", lambda *a, **k: [list(c) for c in candidates])
  reply, info = chat.respond(fwd, ["11 12 13", "14 15"], bwd=bwd, num_candidates=4)
  assert reply == " ".join(map(str, candidates[int(np.argmax(want))]))
  assert info["scores"] == pytest.approx(want, rel=1e-5)
  reply, info = chat.respond(fwd, ["11 12 13", "14 15"], num_candidates=4)
  assert reply == "20 21" and info["scores"] is None  # No backward model: the first sample.


def test_every_reply_and_candidate_is_one_line(monkeypatch, capsys):
  """Through a pipe: one output line per input turn, whatever the model writes; the
  history keeps the reply as written."""
  fwd = tiny_model(0)
  # The tiny model's tokenizer reads numbers: turns and replies are numbers and line breaks.
  replies = iter(["20 21\n22", "\n  23  \n\n", "24"])
  seen = []

  def respond(model, history, **kw):
    seen.append(list(history))
    reply = next(replies)
    return reply, {"candidates": [reply, "a\nb"], "scores": [1.5, -2.0]}

  monkeypatch.setattr(chat, "respond", respond)
  out = io.StringIO()
  chat.chat_loop(fwd, ["11", "", "12 13", "/reset", "14", "/quit", "15"], out, show_candidates=True)
  assert out.getvalue().splitlines() == ["20 21 / 22", "23", "24"]
  assert seen == [["11"], ["11", "20 21\n22", "12 13"], ["14"]]  # The model sees its turns unchanged.
  assert capsys.readouterr().err.splitlines() == [
    "  [    1.500] 20 21 / 22",
    "  [   -2.000] a / b",
    "  [    1.500] 23",
    "  [   -2.000] a / b",
    "  [    1.500] 24",
    "  [   -2.000] a / b",
  ]


def test_rerank_prefers_any_non_empty_candidate():
  assert chat.rerank([[], [1], [2]], [5.0, -3.0, -1.0]) == 2
  assert chat.rerank([[], []], [1.0, 2.0]) == 1


# ------------------------------------------------------------ end to end

PROMPTS = ["what news", "how now", "who goes there", "speak", "what say you", "come hither"]


def dialogues(n, seed):
  """Multi-turn dialogues whose last turn is always "good night"."""
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    turns = [rng.choice(PROMPTS) for _ in range(rng.randint(1, 3))] + ["good night"]
    out.append({"turns": turns})
  return out


@pytest.mark.slow
def test_dialogue_training_and_chat_over_stdin(tmp_path):
  for name, n, seed in (("train", 256, 1), ("eval", 32, 2)):
    (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in dialogues(n, seed)))
  # The starting checkpoint: numpy-drawn weights (compiling random initialisers is slow on CPU)
  # and a byte-level BPE trained on the dialogue texts.
  c = debug.get_config()
  tok = tokenizer.train_bpe(PROMPTS + ["good night"] * 4, 320)
  checkpoint.save_params(
    tmp_path / "init",
    c,
    numpy_init(c.model, 0),
    tok,
  )
  c.job = "finetune"
  c.init_from = str(tmp_path / "init")
  c.finetune.update(
    task="dialogue",
    train_path=str(tmp_path / "train.jsonl"),
    eval_path=str(tmp_path / "eval.jsonl"),
    epochs=8.0,
  )
  c.train.batch_size = 16
  c.optim.update(lr=3e-3, schedule="linear", min_lr_ratio=0.0)
  c.checkpoint.every_steps = 1000
  c.log.update(every_steps=32, tensorboard=False)
  c.sample.num_samples = 0
  workdir = tmp_path / "dialogue"
  final = finetune.run(config_lib.validate(c), str(workdir))
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  evals = [r["eval_loss"] for r in records if "eval_loss" in r]
  assert len(evals) == 8 and evals[-1] < 0.2 * evals[0], evals  # The responses become predictable.
  assert final["step"] == 128
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "gpt_jax.chat",
      f"--workdir={workdir}",
      f"--mmi_workdir={workdir}",
      "--num_candidates=3",
      "--temperature=0",
      "--max_new_tokens=12",
    ],
    input="what news\n\nhow now\n/reset\nspeak\n",
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.splitlines() == ["good night"] * 3

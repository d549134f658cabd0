"""Speculative decoding: greedy equals plain greedy, sampling follows the target's filtered distribution."""

import itertools
import types

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

from configs import debug
from gpt_jax import (
  chat,
  errors,
  evaluate,
  harness,
  model,
  model_config,
  sample,
  sampling,
  speculative,
  tokenizer,
)

N = 8  # New tokens: below sampling.CPU_LAYOUT_FROM_STEPS, so plain and speculative share one layout.


def _cfg(**overrides):
  return model_config.of(debug.get_config().model, **overrides)


def _init(cfg, seed, std=0.2):
  """Random params drawn with numpy (std 0.2: the random model's greedy tokens vary)."""
  rng = np.random.default_rng(seed)

  def draw(path, x):
    offset = 1.0 if "scale" in jax.tree_util.keystr(path) else 0.0
    return (offset + rng.normal(0, std, x.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, flax.linen.unbox(model.abstract_params(cfg)))


def _noisy(params, seed, std):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: x + rng.normal(0, std, x.shape).astype(np.float32), params)


def _prompts(lengths, vocab, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, vocab, n).tolist() for n in lengths]


@pytest.fixture(scope="module")
def target():
  cfg = _cfg()
  return cfg, _init(cfg, 1)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_equals_plain_greedy(target, k):
  cfg, params = target
  prompts = _prompts([1, 5, 9], cfg.vocab_size)  # Ragged: left padding, one row of a single token.
  plain = sample.generate(cfg, params, prompts, max_new_tokens=N, temperature=0.0)
  assert len({tuple(r) for r in plain}) == 3
  # Another random model (almost every proposal rejected), a perturbed copy (some accepted: rows
  # accept different counts in a round), the target itself (every proposal accepted).
  drafts = {"random": _init(cfg, 2), "noisy": _noisy(params, 3, 0.1), "self": params}
  rates = {}
  for name, draft in drafts.items():
    stats = {}
    spec = speculative.generate(
      cfg, params, cfg, draft, prompts, max_new_tokens=N, draft_tokens=k, temperature=0.0, stats=stats
    )
    assert spec == plain, name
    rates[name] = stats["acceptance_rate"]
  assert rates["self"] == 1.0
  assert rates["random"] < rates["noisy"] < 1.0
  if k == 3:  # Batch 1 (a scalar cache end inside the model): the same row.
    kw = dict(max_new_tokens=N, draft_tokens=k, temperature=0.0)
    assert speculative.generate(cfg, params, cfg, drafts["noisy"], prompts[1:2], **kw) == plain[1:2]
  # Every proposal accepted: k + 1 tokens per pass until max_new_tokens (the last round may be cut).
  got = speculative.decode(cfg, params, cfg, params, prompts, max_new_tokens=N, draft_tokens=k, temperature=0)
  np.testing.assert_array_equal(got.rounds_B, [-(-N // (k + 1))] * 3)


def test_eot_and_stop_sequences_as_plain(target):
  cfg, params = target
  prompts = _prompts([3, 6], cfg.vocab_size, seed=4)
  free = sample.generate(cfg, params, prompts, max_new_tokens=N, temperature=0.0)
  draft = _noisy(params, 5, 0.1)
  kw = dict(max_new_tokens=N, temperature=0.0)
  for extra in (dict(eot_id=free[0][2]), dict(stop_sequences=[free[1][3:5], [cfg.vocab_size] * 2])):
    expected = sample.generate(cfg, params, prompts, **kw, **extra)
    assert expected != free
    assert speculative.generate(cfg, params, cfg, draft, prompts, draft_tokens=3, **kw, **extra) == expected


def _train(cfg, params, tokens_BT, steps, lr=3e-3):
  opt = optax.adam(lr)

  def loss(p):
    logits = model.GPT(cfg).apply({"params": p}, tokens_BT[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens_BT[:, 1:]).mean()

  @jax.jit
  def step(p, s):
    g = jax.grad(loss)(p)
    updates, s = opt.update(g, s)
    return optax.apply_updates(p, updates), s

  state = opt.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return params


def test_greedy_equals_plain_on_trained_models_of_different_shapes():
  # A noisy deterministic sequence language: both models learn it, so proposals are often right.
  target_cfg = _cfg(attention_pattern=("dense",))
  draft_cfg = _cfg(attention_pattern=("dense",), num_layers=1, d_model=16, num_heads=2)
  rng = np.random.default_rng(0)
  nxt = rng.integers(0, 64, 64)
  seqs = np.zeros((32, target_cfg.block_size), np.int32)
  for b in range(32):
    seqs[b, 0] = rng.integers(64)
    for t in range(1, seqs.shape[1]):
      seqs[b, t] = nxt[seqs[b, t - 1]] if rng.random() < 0.8 else rng.integers(64)
  t_params = _train(target_cfg, _init(target_cfg, 6, 0.02), seqs, 150)
  d_params = _train(draft_cfg, _init(draft_cfg, 7, 0.02), seqs, 150)
  prompts = _prompts([2, 7], 64, seed=8)
  plain = sample.generate(target_cfg, t_params, prompts, max_new_tokens=N, temperature=0.0)
  stats = {}
  spec = speculative.generate(
    target_cfg, t_params, draft_cfg, d_params, prompts, max_new_tokens=N, draft_tokens=3, temperature=0.0,
    stats=stats,
  )  # fmt: skip
  assert spec == plain
  assert stats["acceptance_rate"] > 0.5


# ------------------------------------------------------------------ sampling

V = 8  # A vocabulary small enough to enumerate every 3-token continuation.


def _exact_filtered(cfg, params, prompt, n, temperature, top_k, top_p):
  """Probability of every n-token continuation under the target's filtered distribution."""
  seqs = np.array([prompt + list(c) for c in itertools.product(range(V), repeat=n)], np.int32)
  logits = np.asarray(jax.jit(model.GPT(cfg).apply)({"params": params}, seqs[:, :-1]))
  P = len(prompt)
  steps = logits[:, P - 1 :].reshape(-1, V) / temperature
  kept = np.asarray(jax.jit(sampling.filter_logits)(steps, np.int32(top_k), np.float32(top_p)))
  probs = np.asarray(jax.nn.softmax(kept, axis=-1)).reshape(len(seqs), n, V)
  chosen = np.take_along_axis(probs, seqs[:, P:, None], axis=-1)[..., 0]
  return chosen.prod(axis=-1)


def _chi2_pvalue(counts, probs):
  probs = np.asarray(probs, np.float64)
  expected = probs / probs.sum() * counts.sum()
  big = expected >= 5  # Pool the sparse cells so the chi-square approximation holds.
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  keep = exp > 0
  if np.any(obs[~keep] > 0):
    return 0.0  # Continuations of probability 0 came out.
  return scipy.stats.chisquare(obs[keep], exp[keep]).pvalue


@pytest.mark.parametrize(
  "temperature,top_k,top_p", [(1.0, 0, 1.0), (0.8, 5, 0.9)], ids=["unfiltered", "temperature-topk-topp"]
)
def test_sampling_follows_the_targets_filtered_distribution(temperature, top_k, top_p):
  cfg = _cfg(vocab_size=V, block_size=8, attention_pattern=("dense",))
  t_params = _init(cfg, 11, 0.5)
  d_params = _noisy(t_params, 12, 0.1)  # A draft that is often, not always, right.
  prompt, n, rows = [3], 3, 40_000
  kw = dict(temperature=temperature, top_k=top_k, top_p=top_p)
  got = speculative.decode(
    cfg, t_params, cfg, d_params, [prompt] * rows, max_new_tokens=n, draft_tokens=2, seed=0, **kw
  )
  # Rounds ended after every position: accepted, residual and bonus tokens were all emitted.
  assert 0.2 < got.acceptance_rate < 0.9 and got.rounds >= 2
  index = (got.tokens_BN * V ** np.arange(n)[::-1]).sum(axis=-1)
  counts = np.bincount(index, minlength=V**n)
  exact = _exact_filtered(cfg, t_params, prompt, n, **kw)
  assert _chi2_pvalue(counts, exact) > 1e-3
  # The test can tell: the draft's distribution, or the target's unfiltered one, is rejected.
  assert _chi2_pvalue(counts, _exact_filtered(cfg, d_params, prompt, n, **kw)) < 1e-6
  if top_k:
    assert _chi2_pvalue(counts, _exact_filtered(cfg, t_params, prompt, n, 1.0, 0, 1.0)) < 1e-6


def test_residual_and_bonus_by_hand():
  # k = 1, V = 3. p = [0.5, 0.5, 0], q = [0.1, 0.9, 0]: a proposed 1 is kept with
  # probability 0.5 / 0.9; on rejection the residual max(0, p - q) = [0.4, 0, 0] gives 0.
  p, q = np.array([np.log(0.5), np.log(0.5), -np.inf]), np.array([0.1, 0.9, 0.0], np.float32)
  logits_1JV = jnp.asarray(np.stack([p, [0.0, 0.0, 5.0]])[None], jnp.float32)
  consts = {"vocab_limit": 3, "top_k": np.int32(0), "top_p": np.float32(1), "temperature": np.float32(1)}
  accept = jax.jit(
    jax.vmap(lambda key: speculative.accept_sampled(key, logits_1JV, jnp.array([[1]]), q[None, None], consts))
  )
  emitted, num = (np.asarray(x)[:, 0] for x in accept(jax.random.split(jax.random.key(0), 20_000)))
  np.testing.assert_allclose(num.mean(), 0.5 / 0.9, atol=0.015)
  assert set(emitted[num == 0, 0]) == {0}  # Rejected: the residual's only token.
  assert np.all(emitted[num == 1, 0] == 1)
  bonus = emitted[num == 1, 1]  # Bonus token from p at the second position: mostly 2.
  np.testing.assert_allclose(np.mean(bonus == 2), np.exp(5) / (np.exp(5) + 2), atol=0.015)


# ------------------------------------------------------------------ refusals


def test_refuses_a_draft_that_cannot_propose(target):
  cfg, _ = target
  tok = lambda f: types.SimpleNamespace(fingerprint=f)  # noqa: E731
  speculative.check_pair(cfg, _cfg(num_layers=1), tok("abc"), tok("abc"))
  for draft_cfg, toks, msg in (
    (cfg, (tok("a" * 16), tok("b" * 16)), r"^the draft's tokenizer \(fingerprint bbbbbbbbbbbb\) is not"),
    (_cfg(vocab_size=256), (), r"^draft model.vocab_size=256 differs from the target's 320$"),
    (_cfg(block_size=16), (), r"^draft model.block_size=16 is shorter than the target's 32: "),
  ):
    with pytest.raises(errors.UserError, match=msg):
      speculative.check_pair(cfg, draft_cfg, *toks)
  with pytest.raises(errors.UserError, match=r"max_new_tokens=28 \+ draft_tokens=4 must be < model"):
    speculative.generate(cfg, _init(cfg, 1), cfg, _init(cfg, 1), [[1]], max_new_tokens=28, draft_tokens=4)
  with pytest.raises(errors.UserError, match="draft_tokens=0 must be an integer >= 1"):
    speculative.generate(cfg, _init(cfg, 1), cfg, _init(cfg, 1), [[1]], max_new_tokens=4, draft_tokens=0)


# --------------------------------------------------------------- entry points


@pytest.fixture(scope="module")
def text_pair():
  """A random target and a perturbed draft over a real BPE tokenizer (the entry points take text)."""
  words = "the a cat dog sat on mat quick brown fox jumps over lazy river bank".split()
  rng = np.random.default_rng(0)
  corpus = [" ".join(rng.choice(words, size=rng.integers(3, 20))) + "." for _ in range(200)]
  tok = tokenizer.train_bpe(corpus, 300)
  cfg = _cfg(vocab_size=tok.vocab_size, attention_pattern=("dense",))
  params = _init(cfg, 21)
  return cfg, params, tok, speculative.Draft(cfg, _noisy(params, 22, 0.1), tokens=3)


def test_draft_through_sample_evaluate_harness_and_chat(text_pair):
  cfg, params, tok, draft = text_pair
  contexts = ["the cat sat", "a quick brown fox jumps over the"]
  ids = [tok.encode(c) for c in contexts]
  kw = dict(max_new_tokens=N, temperature=0.0)
  stats = {}
  assert sample.generate(cfg, params, ids, draft=draft, stats=stats, **kw) == sample.generate(
    cfg, params, ids, **kw
  )
  assert 0 < stats["acceptance_rate"] < 1 and 1 < stats["tokens_per_pass"] <= draft.tokens + 1
  with pytest.raises(ValueError, match="streaming"):
    sample.generate(cfg, params, ids, draft=draft, on_token=print, **kw)
  gen = dict(until=["."], max_new_tokens=N, batch_size=2)
  plain_texts = evaluate.generate_texts(cfg, params, tok, ids, **gen)
  assert evaluate.generate_texts(cfg, params, tok, ids, draft=draft, **gen) == plain_texts
  requests = [types.SimpleNamespace(args=(c, {"until": ["."], "max_gen_toks": N})) for c in contexts]
  lm = lambda d: harness.GptJaxLM(model_cfg=cfg, params=params, tokenizer=tok, draft=d)  # noqa: E731
  assert lm(draft).generate_until(requests) == lm(None).generate_until(requests) == plain_texts
  history = ["the dog sat on the mat"]
  reply = chat.respond(chat.Model(cfg, params, tok), history, temperature=0.0, max_new_tokens=N)
  assert (
    chat.respond(chat.Model(cfg, params, tok, draft), history, temperature=0.0, max_new_tokens=N) == reply
  )


def test_refuses_another_tokenizer_and_bad_draft_arguments(text_pair):
  cfg, params, tok, _ = text_pair
  other = tokenizer.train_bpe(["an entirely different corpus of words, numbers 1 2 3."] * 50, 300)
  with pytest.raises(
    errors.UserError, match=r"^the draft's tokenizer \(fingerprint \w+\) is not the target's"
  ):
    speculative.check_pair(cfg, cfg, tok, other)
  with pytest.raises(errors.UserError, match=r"^give at most one of --draft_workdir or --draft_hf_dir$"):
    speculative.load_draft(cfg, tok, workdir="a", hf_dir="b")
  assert speculative.load_draft(cfg, tok) is None
  with pytest.raises(errors.UserError, match=r"^--draft_tokens=0 must be an integer >= 1$"):
    speculative.load_draft(cfg, tok, workdir="a", draft_tokens=0)
  with pytest.raises(errors.UserError, match=r"^draft_tokens=2.5 must be an integer >= 1$"):
    speculative.Draft(cfg, params, 2.5)

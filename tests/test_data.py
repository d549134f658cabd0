"""Data pipeline: sources, token cache, packing, per-host sharding, resume, errors."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpt_jax import data, data_sources
from gpt_jax import tokenizer as tok_lib
from gpt_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def short_waits(monkeypatch):
  # A process > 0 that finds no cache waits for process 0: never for long in tests.
  monkeypatch.setattr(tok_lib, "WAIT_TIMEOUT_S", 5.0)


@pytest.fixture(scope="module")
def bpe():
  return tok_lib.train_bpe(data_sources.shakespeare_documents()[:20], 320)


@pytest.fixture(scope="module")
def byte_tok():
  """No merges: one token per byte, so token counts follow from the text by hand."""
  return tok_lib.train_bpe(["x"], 257)


@pytest.fixture
def run(debug_config, tmp_path):
  debug_config.data.update(max_documents=16)
  return debug_config, str(tmp_path / "work")


def write(path: Path, content) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  if isinstance(content, bytes):
    path.write_bytes(content)
  else:
    path.write_text(content, encoding="utf-8")
  return path


def files_config(config, tmp_path, paths, **data_kw):
  config.data.update(source="files", paths=paths, max_documents=0, **data_kw)
  return config, str(tmp_path / "work")


def rows(batches, key="index"):
  return np.concatenate([b[key] for b in batches])


# ---------------------------------------------------------- cache, packing


def test_cache_stream_windows_and_holdout(run, bpe):
  config, workdir = run
  cache = data.prepare_cache(config, bpe, workdir)
  assert cache.directory.parent == Path(workdir) / "data" / "tokens"
  header = json.loads((cache.directory / "header.json").read_text())
  assert header["tokenizer_fingerprint"] == bpe.fingerprint and header["dtype"] == "uint16"
  assert "shakespeare" in header["source"] and "max_documents=16" in header["source"]
  for split in data.SPLITS:
    docs = list(data_sources.iter_documents(config.data, split))
    expected = [t for d in docs for t in bpe.encode(d) + [bpe.eot_id]]
    stream = np.asarray(cache.tokens(split))
    np.testing.assert_array_equal(stream, expected)
    assert header["splits"][split] == {"documents": len(docs), "tokens": len(expected)}
    assert (stream == bpe.eot_id).sum() == len(docs)
  # Windows overlap by one token: their first T tokens, plus the last one's
  # final token, rebuild the stream up to the dropped tail.
  stream, t = np.asarray(cache.tokens("train")), 32
  count = data.num_windows(len(stream), t)
  assert count == (len(stream) - 1) // t and len(stream) - (count * t + 1) < t
  source = data.WindowSource(str(cache.path("train")), t, count)
  windows = [source[i]["tokens"] for i in range(count)]
  assert all(w.dtype == np.int32 and w.shape == (t + 1,) for w in windows)
  rebuilt = np.concatenate([w[:-1] for w in windows] + [windows[-1][-1:]])
  np.testing.assert_array_equal(rebuilt, stream[: count * t + 1])
  # No 48-token stretch of a validation document appears in the training stream.
  val_stream = np.asarray(cache.tokens("validation"))
  train_view = np.lib.stride_tricks.sliding_window_view(stream, 48)
  for start in range(0, len(val_stream) - 48, 997):
    assert not (train_view == val_stream[start : start + 48]).all(axis=1).any()


def test_cache_is_reused_refused_for_another_tokenizer_and_atomic(run, bpe, byte_tok, monkeypatch):
  config, workdir = run
  first = data.prepare_cache(config, bpe, workdir)
  before = first.path("train").stat().st_mtime_ns

  def no_tokenizing(*args, **kwargs):
    raise AssertionError("tokenised again")

  with monkeypatch.context() as m:
    m.setattr(data, "_tokenize_split", no_tokenizing)
    again = data.prepare_cache(config, bpe, workdir)
    assert again.header == first.header and again.path("train").stat().st_mtime_ns == before
    assert data.prepare_cache(config, bpe, workdir, process_index=1).header == first.header
    with pytest.raises(UserError, match=f"{first.directory}: token cache was made with another tokenizer"):
      data.prepare_cache(config, byte_tok, workdir)
  assert first.path("train").stat().st_mtime_ns == before  # not overwritten
  # A crash while tokenising publishes nothing and leaves no tmp directory.
  config.data.max_documents = 10
  real = data_sources.iter_documents

  def crashing(*args, **kwargs):
    for i, doc in enumerate(real(*args, **kwargs)):
      if i == 3:
        raise KeyboardInterrupt
      yield doc

  with monkeypatch.context() as m:
    m.setattr(data_sources, "iter_documents", crashing)
    with pytest.raises(KeyboardInterrupt):
      data.prepare_cache(config, bpe, workdir)
  assert sorted(p.name for p in first.directory.parent.iterdir()) == [first.directory.name]
  assert data.prepare_cache(config, bpe, workdir).header["splits"]["validation"]["documents"] == 1


# ---------------------------------------------------------- train iterator


def _iterator(config, tok, workdir, p=0, n=1):
  return data.make_train_iterator(config, tok, workdir, process_index=p, process_count=n)


def test_batches_match_windows(run, bpe):
  config, workdir = run
  batch = next(_iterator(config, bpe, workdir))
  assert batch["tokens"].shape == (8, 33) and batch["tokens"].dtype == np.int32
  assert batch["index"].shape == (8,) and batch["index"].dtype == np.int64
  stream = np.asarray(data.prepare_cache(config, bpe, workdir).tokens("train"))
  for row, i in zip(batch["tokens"], batch["index"]):
    np.testing.assert_array_equal(row, stream[i * 32 : i * 32 + 33])


@pytest.mark.parametrize("process_count", [2, 3])
def test_hosts_read_disjoint_windows_covering_each_epoch(run, bpe, process_count):
  config, workdir = run
  config.data.max_documents = 6
  config.train.batch_size = 6
  count = data.num_windows(data.prepare_cache(config, bpe, workdir).num_tokens("train"), 32)
  assert 300 < count < 2000
  per_process = []
  for p in range(process_count):
    it = _iterator(config, bpe, workdir, p, process_count)
    per_process.append(rows([next(it) for _ in range(2 * count // 6 + 2)]))
  # Interleaving the hosts' rows gives the global order: host p holds global rows p, p + n, ...
  n_rows = min(len(r) for r in per_process)
  global_order = np.stack([r[:n_rows] for r in per_process], axis=1).reshape(-1)
  epoch1, epoch2 = global_order[:count], global_order[count : 2 * count]
  assert sorted(epoch1) == list(range(count)) and sorted(epoch2) == list(range(count))
  assert not (epoch1 == epoch2).all()  # reshuffled per epoch
  single = rows([next(_iterator(config, bpe, workdir, 0, 1)) for _ in range(1)])
  assert single.tolist() == global_order[:6].tolist()  # same global order as one process


def test_exact_resume_and_orbax_round_trip(run, bpe, tmp_path):
  grain = pytest.importorskip("grain")
  ocp = pytest.importorskip("orbax.checkpoint")
  config, workdir = run
  data.prepare_cache(config, bpe, workdir)  # process 1 only reads it
  it = _iterator(config, bpe, workdir, 1, 2)
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(7)]
  fresh = _iterator(config, bpe, workdir, 1, 2)
  fresh.set_state(state)
  for want, got in zip(expected, [next(fresh) for _ in range(7)]):
    np.testing.assert_array_equal(want["tokens"], got["tokens"])
    np.testing.assert_array_equal(want["index"], got["index"])
  # Saved and restored the way train.py does, inside an Orbax Composite.
  it = _iterator(config, bpe, workdir)
  for _ in range(3):
    next(it)
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
    mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    expected = rows([next(it) for _ in range(4)])
    fresh = _iterator(config, bpe, workdir)
    mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  assert rows([next(fresh) for _ in range(4)]).tolist() == expected.tolist()


@pytest.mark.slow
def test_workers_give_the_same_stream_and_resume(run, bpe):
  config, workdir = run
  reference = rows([b for b, _ in zip(_iterator(config, bpe, workdir), range(9))])
  config.data.num_workers = 2
  it = _iterator(config, bpe, workdir)
  first = rows([next(it) for _ in range(4)])
  state = it.get_state()
  rest = rows([next(it) for _ in range(5)])
  it.close()
  assert np.concatenate([first, rest]).tolist() == reference.tolist()
  fresh = _iterator(config, bpe, workdir)
  fresh.set_state(state)
  assert rows([next(fresh) for _ in range(5)]).tolist() == rest.tolist()
  fresh.close()


# ---------------------------------------------------------------- eval


def test_eval_batches_cover_validation_once(run, bpe):
  config, workdir = run
  kw = dict(batch_size=6, num_batches=0)
  full = data.make_eval_batches(config, bpe, workdir, process_index=0, process_count=1, **kw)
  again = data.make_eval_batches(config, bpe, workdir, process_index=0, process_count=1, **kw)
  assert all((a[k] == b[k]).all() for a, b in zip(full, again) for k in a)
  val = np.asarray(data.prepare_cache(config, bpe, workdir).tokens("validation"))
  count = math.ceil((len(val) - 1) / 32)
  assert len(full) == math.ceil(count / 6)
  b = full[-1]
  assert b["tokens"].shape == (6, 33) and b["mask"].shape == (6, 32) and b["mask"].dtype == np.float32
  # Every validation target appears exactly once, in order, under mask 1.
  tokens, mask = rows(full, "tokens"), rows(full, "mask")
  targets = np.concatenate([row[1:][m > 0] for row, m in zip(tokens, mask)])
  np.testing.assert_array_equal(targets, val[1:])
  assert rows(full).tolist() == list(range(count)) + [-1] * (len(full) * 6 - count)
  # Two processes split each global batch's rows; num_batches caps the list.
  halves = [
    data.make_eval_batches(
      config, bpe, workdir, process_index=p, process_count=2, batch_size=6, num_batches=2
    )
    for p in range(2)
  ]
  for b, (h0, h1) in enumerate(zip(*halves)):
    for k in ("tokens", "index", "mask"):
      np.testing.assert_array_equal(np.concatenate([h0[k], h1[k]]), full[b][k])
  assert len(halves[0]) == 2


def test_unigram_loss_golden(debug_config, tmp_path, byte_tok):
  write(tmp_path / "c" / "a.txt", "aaab")
  write(tmp_path / "c" / "b.txt", "ba")
  config, workdir = files_config(debug_config, tmp_path, str(tmp_path / "c" / "*.txt"), val_fraction=0.5)
  # Train stream a a a b EOT (5 tokens), validation stream b a EOT (targets a, EOT);
  # add-one smoothing over 257 ids: p(a) = 4 / 262, p(EOT) = 2 / 262.
  expected = -(math.log(4 / 262) + math.log(2 / 262)) / 2
  assert data.unigram_loss(config, byte_tok, workdir) == pytest.approx(expected, rel=1e-12)


BAD_INPUTS = {
  "no_match": ({}, "nothing/*.txt", "matches no file"),
  "suffix": ({"a.csv": "x,y"}, "*.csv", "a.csv: unsupported file type '.csv'"),
  "empty": ({"a.txt": "", "b.jsonl": '{"text": ""}\n'}, "*", "the files hold no text"),
  "undecodable_txt": ({"a.txt": "ok", "b.txt": b"caf\xe9"}, "*.txt", "b.txt: not UTF-8 text"),
  "undecodable_jsonl": (
    {"a.jsonl": b'{"text": "ok"}\n{"text": "caf\xe9"}\n'},
    "*",
    "a.jsonl:2: not UTF-8 text",
  ),
  "malformed_jsonl": ({"a.jsonl": '{"text": "ok"}\n{"text": \n'}, "*", "a.jsonl:2: invalid JSON"),
  "missing_field": ({"a.jsonl": '{"text": "ok"}\n\n{"body": "x"}\n'}, "*", "a.jsonl:3: no 'text' field"),
  "field_type": ({"a.jsonl": '{"text": "ok"}\n{"text": 3}\n'}, "*", "a.jsonl:2: field 'text' is a int"),
  "too_few_tokens": (
    {"a.txt": "hi", "b.txt": "yo"},
    "*.txt",
    "the training split has 3 tokens, fewer than one window of seq_len \\+ 1 = 33",
  ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_give_one_line_errors(debug_config, tmp_path, byte_tok, case):
  files, pattern, message = BAD_INPUTS[case]
  for name, content in files.items():
    write(tmp_path / "in" / name, content)
  config, workdir = files_config(debug_config, tmp_path, str(tmp_path / "in" / pattern))
  with pytest.raises(UserError, match=message) as err:
    next(_iterator(config, byte_tok, workdir))
  assert "\n" not in str(err.value)
  tokens_dir = Path(workdir) / "data" / "tokens"
  published = sorted(tokens_dir.iterdir()) if tokens_dir.exists() else []
  # Only a valid (if too short) corpus leaves a cache behind; never a tmp directory.
  assert len(published) == (case == "too_few_tokens") and not any(p.name.startswith(".") for p in published)


def test_cli_prints_counts_and_exits_2_on_bad_input(tmp_path):
  base = [sys.executable, "-m", "gpt_jax.data", "--config=configs/debug.py", f"--workdir={tmp_path}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  bad = subprocess.run(
    base + ["--config.data.source=files", f"--config.data.paths={tmp_path}/none/*.txt"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
  )
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1] == f"error: data.paths: '{tmp_path}/none/*.txt' matches no file"
  assert "Traceback" not in bad.stderr
  ok = subprocess.run(
    base + ["--config.data.max_documents=8", "--config.data.bpe_vocab_size=300"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
  )
  assert ok.returncode == 0, ok.stderr
  assert "train: 7 documents" in ok.stdout and "validation: 1 documents" in ok.stdout
  assert "unigram validation loss" in ok.stdout

"""Data pipeline: sources, formats, token cache, packing, global order, mixtures, resume, errors."""

import gzip
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax import config as config_lib
from gpt_jax import data, data_sources, formats, token_store
from gpt_jax import tokenizer as tok_lib
from gpt_jax.errors import ConfigError, UserError

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


def jsonl(docs, field="text") -> str:
  return "".join(json.dumps({field: d}, ensure_ascii=False) + "\n" for d in docs)


def write_parquet(path: Path, docs, field="text", rows_per_group=7) -> Path:
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  path.parent.mkdir(parents=True, exist_ok=True)
  pq.write_table(pa.table({field: docs, "id": list(range(len(docs)))}), path, row_group_size=rows_per_group)
  return path


# ---------------------------------------------------------- cache, packing


def shard_files(cache, split):
  return sorted(cache.directory.glob(f"{split}-*.bin"))


def test_cache_stream_windows_and_holdout(run, bpe):
  config, workdir = run
  cache = data.prepare_cache(config.data, bpe, workdir)
  assert cache.directory.parent == Path(workdir) / "data" / "tokens"
  header = json.loads((cache.directory / "header.json").read_text())
  assert header["format"] == data.CACHE_FORMAT == 2
  assert header["tokenizer_fingerprint"] == bpe.fingerprint and header["dtype"] == "uint16"
  assert "shakespeare" in header["source"] and "max_documents=16" in header["source"]
  for split in data.SPLITS:
    docs = list(data_sources.iter_documents(config.data, split))
    expected = [t for d in docs for t in bpe.encode(d) + [bpe.eot_id]]
    stream = cache.tokens(split)[:]
    np.testing.assert_array_equal(stream, expected)
    assert header["splits"][split]["documents"] == len(docs)
    assert header["splits"][split]["tokens"] == len(expected) == cache.num_tokens(split)
    np.testing.assert_array_equal(
      cache.tokens(split).document_ends(), np.flatnonzero(stream == bpe.eot_id) + 1
    )
  # Windows overlap by one token: their first T tokens, plus the last one's
  # final token, rebuild the stream up to the dropped tail.
  stream, t = cache.tokens("train")[:], 32
  count = data.num_windows(len(stream), t)
  assert count == (len(stream) - 1) // t and len(stream) - (count * t + 1) < t
  source = data.StreamWindows(cache.tokens("train"), t)
  assert len(source) == count
  windows = [source[i]["tokens"] for i in range(count)]
  assert all(w.dtype == np.int32 and w.shape == (t + 1,) for w in windows)
  rebuilt = np.concatenate([w[:-1] for w in windows] + [windows[-1][-1:]])
  np.testing.assert_array_equal(rebuilt, stream[: count * t + 1])
  # No 48-token stretch of a validation document appears in the training stream.
  val_stream = cache.tokens("validation")[:]
  train_view = np.lib.stride_tricks.sliding_window_view(stream, 48)
  for start in range(0, len(val_stream) - 48, 997):
    assert not (train_view == val_stream[start : start + 48]).all(axis=1).any()


def test_cache_is_reused_refused_for_another_tokenizer_and_atomic(run, bpe, byte_tok, monkeypatch):
  config, workdir = run
  first = data.prepare_cache(config.data, bpe, workdir)
  (shard,) = shard_files(first, "train")
  before = shard.stat().st_mtime_ns

  def no_tokenizing(*args, **kwargs):
    raise AssertionError("tokenised again")

  with monkeypatch.context() as m:
    m.setattr(token_store, "write_shards", no_tokenizing)
    again = data.prepare_cache(config.data, bpe, workdir)
    assert again.header == first.header and shard.stat().st_mtime_ns == before
    assert (
      data.prepare_cache(config.data, bpe, workdir, process_index=1, process_count=2).header == first.header
    )
    with pytest.raises(UserError, match=f"{first.directory}: token cache was made with another tokenizer"):
      data.prepare_cache(config.data, byte_tok, workdir)
  assert shard.stat().st_mtime_ns == before  # not overwritten
  # A crash while tokenising publishes nothing and leaves no tmp directory.
  config.data.max_documents = 10
  real = data_sources.labelled_documents

  def crashing(*args, **kwargs):
    for i, doc in enumerate(real(*args, **kwargs)):
      if i == 3:
        raise KeyboardInterrupt
      yield doc

  with monkeypatch.context() as m:
    m.setattr(data_sources, "labelled_documents", crashing)
    with pytest.raises(KeyboardInterrupt):
      data.prepare_cache(config.data, bpe, workdir)
  assert sorted(p.name for p in first.directory.parent.iterdir()) == [first.directory.name]
  assert data.prepare_cache(config.data, bpe, workdir).header["splits"]["validation"]["documents"] == 1


@pytest.mark.parametrize("source", ["shakespeare", "files"])
def test_hosts_shares_concatenate_to_the_single_host_documents(debug_config, tmp_path, source):
  if source == "files":  # Whole files, jsonl lines and parquet row groups as the units hosts share.
    docs = data_sources.shakespeare_documents()[:90]
    write(tmp_path / "c" / "a.jsonl", jsonl(docs[:40]))
    for i, d in enumerate(docs[40:50]):
      write(tmp_path / "c" / f"b{i}.txt", d)
    write_parquet(tmp_path / "c" / "c.parquet", list(docs[50:]), rows_per_group=7)
    debug_config.data.update(
      source="files", paths=str(tmp_path / "c" / "*"), max_documents=0, val_fraction=0.1
    )
  single = list(data_sources.labelled_documents(debug_config.data))
  assert {s for s, _ in single} == {"train", "validation"}
  for hosts in (2, 3):
    shares = [list(data_sources.labelled_documents(debug_config.data, h, hosts)) for h in range(hosts)]
    assert all(shares) and sum(shares, []) == single


def test_every_format_gives_the_cache_of_its_plain_jsonl(debug_config, tmp_path, byte_tok):
  zstandard = pytest.importorskip("zstandard")
  docs = [f"document {i}: " + "words, é " * (i % 7) for i in range(60)]
  raw = jsonl(docs).encode()
  variants = {
    "a.jsonl": raw,
    "a.jsonl.gz": gzip.compress(raw),
    "a.jsonl.zst": zstandard.ZstdCompressor().compress(raw),
  }
  for name, content in variants.items():
    write(tmp_path / name.replace(".", "_") / name, content)
  write_parquet(tmp_path / "parquet" / "a.parquet", docs, rows_per_group=7)
  caches = {}
  for folder in ["a_jsonl", "a_jsonl_gz", "a_jsonl_zst", "parquet"]:
    config, workdir = files_config(debug_config, tmp_path, str(tmp_path / folder / "*"))
    caches[folder] = data.prepare_cache(config.data, byte_tok, workdir)
  for split in data.SPLITS:
    want = caches["a_jsonl"].tokens(split)[:]
    assert caches["a_jsonl"].header["splits"][split]["documents"] == (3 if split == "validation" else 57)
    for folder, cache in caches.items():
      np.testing.assert_array_equal(cache.tokens(split)[:], want, err_msg=folder)


def test_an_edited_file_builds_a_new_cache(debug_config, tmp_path, byte_tok):
  write(tmp_path / "c" / "a.txt", "first document\n")
  write(tmp_path / "c" / "b.txt", "second document\n")
  config, workdir = files_config(debug_config, tmp_path, str(tmp_path / "c" / "*.txt"), val_fraction=0.5)
  first = data.prepare_cache(config.data, byte_tok, workdir)
  write(tmp_path / "c" / "a.txt", "first document, edited\n")
  second = data.prepare_cache(config.data, byte_tok, workdir)
  assert second.directory != first.directory
  assert byte_tok.decode(second.tokens("train")[:-1]) == "first document, edited\n"


# ---------------------------------------------------------- train iterator


def _iterator(config, tok, workdir, p=0, n=1):
  return data.make_train_iterator(config, tok, workdir, process_index=p, process_count=n)


def test_batches_match_windows(run, bpe):
  config, workdir = run
  batch = next(_iterator(config, bpe, workdir))
  assert batch["tokens"].shape == (8, 33) and batch["tokens"].dtype == np.int32
  assert batch["index"].shape == (8,) and batch["index"].dtype == np.int64
  assert (batch["source"] == 0).all()
  stream = data.prepare_cache(config.data, bpe, workdir).tokens("train")[:]
  for row, i in zip(batch["tokens"], batch["index"]):
    np.testing.assert_array_equal(row, stream[i * 32 : i * 32 + 33])


@pytest.mark.parametrize("process_count", [2, 3])
def test_processes_share_each_global_batch_covering_each_epoch(run, bpe, process_count):
  config, workdir = run
  config.data.max_documents = 6
  config.train.batch_size = 6
  count = data.num_windows(data.prepare_cache(config.data, bpe, workdir).num_tokens("train"), 32)
  assert 300 < count < 2000
  its = [_iterator(config, bpe, workdir, p, process_count) for p in range(process_count)]
  # Process p holds rows [p * R, (p + 1) * R) of every global batch.
  steps = 2 * count // 6 + 2
  global_order = np.concatenate([np.concatenate([next(it)["index"] for it in its]) for _ in range(steps)])
  epoch1, epoch2 = global_order[:count], global_order[count : 2 * count]
  assert sorted(epoch1) == list(range(count)) and sorted(epoch2) == list(range(count))
  assert not (epoch1 == epoch2).all()  # reshuffled per epoch
  one = _iterator(config, bpe, workdir)
  assert rows([next(one) for _ in range(3)]).tolist() == global_order[:18].tolist()  # the same global order


def test_exact_and_elastic_resume_through_orbax_json(run, bpe, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  config, workdir = run
  count = data.num_windows(data.prepare_cache(config.data, bpe, workdir).num_tokens("train"), 32)
  it = _iterator(config, bpe, workdir, 1, 2)  # process 1 of 2 only reads the cache
  for _ in range(5):
    next(it)
  state = it.get_state()
  assert state == {"position": 40, "seed": 0, "sources": [["shakespeare", 1.0, count]], "seq_len": 32}
  expected = [next(it) for _ in range(7)]
  fresh = _iterator(config, bpe, workdir, 1, 2)
  fresh.set_state(state)
  for want, got in zip(expected, [next(fresh) for _ in range(7)]):
    np.testing.assert_array_equal(want["tokens"], got["tokens"])
    np.testing.assert_array_equal(want["index"], got["index"])
  # Saved and restored the way checkpoint.py does (one JSON), then resumed by two processes.
  it = _iterator(config, bpe, workdir)
  for _ in range(3):
    next(it)
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
    mngr.save(3, args=ocp.args.Composite(data=ocp.args.JsonSave(it.get_state())))
    mngr.wait_until_finished()
    expected = rows([next(it) for _ in range(4)])
    restored = mngr.restore(3, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data
  halves = [_iterator(config, bpe, workdir, p, 2) for p in range(2)]
  for h in halves:
    h.set_state(restored)
  got = np.concatenate([np.concatenate([next(h)["index"] for h in halves]) for _ in range(4)])
  assert got.tolist() == expected.tolist()
  # Another sequence length is another order: refused in one line.
  config.train.seq_len = 16
  with pytest.raises(UserError, match="the checkpoint's data order has sources="):
    _iterator(config, bpe, workdir).set_state(restored)


def test_a_per_process_grain_state_in_a_checkpoint_is_refused(debug_config, tmp_path):
  from gpt_jax import checkpoint

  class Iter:
    def get_state(self):
      return {"position": 8}

    def set_state(self, state):
      raise AssertionError("not restored")

  debug_config.checkpoint.async_save = False
  manager = checkpoint.make_manager(str(tmp_path), debug_config)
  state = {"x": jnp.zeros(3)}
  checkpoint.save(manager, 5, state, Iter(), {"tokenizer": "t"})
  manager.wait_until_finished()
  data_dir = tmp_path / "checkpoints" / "5" / "data"
  for p in data_dir.iterdir():
    p.unlink()
  (data_dir / "process_0-of-2.json").write_text('{"next_index": 3}')
  with pytest.raises(
    UserError, match="holds a per-process grain data state \\(process_0-of-2.json, ...\\)"
  ) as err:
    checkpoint.restore_latest(manager, jax_abstract(state), Iter())
  assert "\n" not in str(err.value) and "--config.init_from=" in str(err.value)
  assert sorted(p.name for p in data_dir.iterdir()) == ["process_0-of-2.json"]  # nothing set aside


def jax_abstract(tree):
  import jax

  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


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
  config.data.num_workers = 0  # A state restores under another worker count.
  fresh = _iterator(config, bpe, workdir)
  fresh.set_state(state)
  assert rows([next(fresh) for _ in range(5)]).tolist() == rest.tolist()
  fresh.close()


# -------------------------------------------------------------- mixtures


def mixture_config(config, tmp_path, weights=(0.7, 0.3)):
  docs = data_sources.shakespeare_documents()
  write(tmp_path / "books" / "a.jsonl", jsonl(docs[100:300]))
  config.data.max_documents = 0
  config.data.mixture = {
    "plays": {"weight": weights[0], "source": "shakespeare", "max_documents": 40},
    "books": {"weight": weights[1], "source": "files", "paths": str(tmp_path / "books" / "*.jsonl")},
  }
  return config_lib.validate(config), str(tmp_path / "work")


def test_mixture_batches_eval_and_baselines_per_source(debug_config, tmp_path, bpe):
  config, workdir = mixture_config(debug_config, tmp_path)
  assert [s.name for s in data.sources(config)] == ["books", "plays"]  # sorted by name
  config.train.batch_size = 100
  it = _iterator(config, bpe, workdir)
  source = np.concatenate([next(it)["source"] for _ in range(20)])
  assert abs((source == 1).mean() - 0.7) < 0.01 and abs((source == 0).mean() - 0.3) < 0.01
  caches = {s.name: data.prepare_cache(s.data, bpe, workdir) for s in data.sources(config)}
  assert len({c.directory for c in caches.values()}) == 2  # a token cache per source
  kw = dict(process_index=0, process_count=1, batch_size=4, num_batches=0)
  evals = data.make_eval_batches(config, bpe, workdir, **kw)
  assert sorted(evals) == ["books", "plays"]
  for name, batches in evals.items():
    tokens, mask = rows(batches, "tokens"), rows(batches, "mask")
    targets = np.concatenate([row[1:][m > 0] for row, m in zip(tokens, mask)])
    np.testing.assert_array_equal(targets, caches[name].tokens("validation")[1:])
  plays = data.sources(config)[1].data
  assert plays.source == "shakespeare" and plays.max_documents == 40
  assert data.unigram_loss(plays, bpe, workdir) != data.unigram_loss(
    data.sources(config)[0].data, bpe, workdir
  )


def test_mixture_config_errors_name_the_dotted_field(debug_config, tmp_path):
  cases = [
    ({"web": {"weight": 0}}, r"config\.data\.mixture\.web\.weight=0 is invalid: must be a number > 0"),
    (
      {"web": {"weight": 1, "source": "files"}},
      r"config\.data\.mixture\.web\.paths='' is invalid: give comma-separated globs when data\.source",
    ),
    ({"web": {"weight": 1, "source": "tfds"}}, r"config\.data\.mixture\.web\.tfds_name='' is invalid"),
    (
      {"web": {"weight": 1, "seed": 3}},
      r"config\.data\.mixture\.web\.seed=3 is invalid: unknown field; allowed: ",
    ),
    ({"Web": {"weight": 1}}, r"config\.data\.mixture='Web' is invalid: source names are lower-case"),
    (
      {"web": {"weight": 1, "val_fraction": 1.5}},
      r"config\.data\.mixture\.web\.val_fraction=1\.5 is invalid: must be in \(0\.0, 1\.0\)",
    ),
  ]
  for mixture, message in cases:
    config = debug_config.copy_and_resolve_references()
    config.data.mixture = mixture
    with pytest.raises(ConfigError, match=message):
      config_lib.validate(config)
  config = debug_config.copy_and_resolve_references()
  config.data.update(source="files", paths="x/train.bin", tokenizer="bpe")
  with pytest.raises(ConfigError, match=r"config\.data\.tokenizer='bpe' is invalid: token files"):
    config_lib.validate(config)
  config = debug_config.copy_and_resolve_references()
  config.data.reset_positions = True
  with pytest.raises(
    ConfigError, match=r"config\.data\.reset_positions=True is invalid: needs data\.document_mask"
  ):
    config_lib.validate(config)


# ------------------------------------------------------------ token files


def test_nanogpt_and_llmc_token_files_are_the_cache(debug_config, tmp_path):
  gpt2 = tok_lib.gpt2()
  docs = data_sources.shakespeare_documents()[:30]
  train = np.array([t for d in docs for t in gpt2.encode(d) + [gpt2.eot_id]], np.uint16)
  val = train[:700]
  (tmp_path / "nano").mkdir()
  train.tofile(tmp_path / "nano" / "train.bin")
  val.tofile(tmp_path / "nano" / "val.bin")
  header = np.zeros(256, "<i4")
  header[:3] = formats.LLMC_MAGIC, 1, len(train) // 2
  (tmp_path / "llmc").mkdir()
  (tmp_path / "llmc" / "x_train_000.bin").write_bytes(header.tobytes() + train[: len(train) // 2].tobytes())
  header[2] = len(train) - len(train) // 2
  (tmp_path / "llmc" / "x_train_001.bin").write_bytes(header.tobytes() + train[len(train) // 2 :].tobytes())
  header[2] = len(val)
  (tmp_path / "llmc" / "x_val_000.bin").write_bytes(header.tobytes() + val.tobytes())
  debug_config.model.vocab_size = 50257
  debug_config.data.update(source="files", tokenizer="gpt2", max_documents=0)
  for folder, train_glob, val_glob in (("nano", "train.bin", "val.bin"), ("llmc", "*_train_*", "*_val_*")):
    debug_config.data.update(
      paths=str(tmp_path / folder / train_glob), eval_paths=str(tmp_path / folder / val_glob)
    )
    workdir = str(tmp_path / f"work_{folder}")
    cache = data.prepare_cache(debug_config.data, gpt2, workdir)
    assert cache.directory is None and not (Path(workdir) / "data").exists()  # nothing copied
    np.testing.assert_array_equal(cache.tokens("train")[:], train)
    assert cache.header["splits"]["train"]["documents"] == 30
    batch = next(_iterator(debug_config, gpt2, workdir))
    for row, i in zip(batch["tokens"], batch["index"]):
      np.testing.assert_array_equal(row, train[i * 32 : i * 32 + 33])
    (evals,) = data.make_eval_batches(
      debug_config, gpt2, workdir, process_index=0, process_count=1, batch_size=8, num_batches=1
    ).values()
    np.testing.assert_array_equal(evals[0]["tokens"][0], val[:33])
  debug_config.data.eval_paths = ""
  with pytest.raises(
    UserError, match="data.eval_paths: token files \\(.bin\\) have no documents to hold out"
  ):
    data.prepare_cache(debug_config.data, gpt2, str(tmp_path / "w"))
  debug_config.data.eval_paths = str(tmp_path / "nano" / "val.bin")
  with pytest.raises(UserError, match="token files hold GPT-2 BPE ids, but this run's tokenizer is 'bpe'"):
    data.prepare_cache(debug_config.data, tok_lib.train_bpe(["x"], 257), str(tmp_path / "w"))


# ---------------------------------------------------------------- eval


def test_eval_batches_cover_validation_once(run, bpe):
  config, workdir = run
  kw = dict(batch_size=6, num_batches=0)
  (full,) = data.make_eval_batches(config, bpe, workdir, process_index=0, process_count=1, **kw).values()
  (again,) = data.make_eval_batches(config, bpe, workdir, process_index=0, process_count=1, **kw).values()
  assert all((a[k] == b[k]).all() for a, b in zip(full, again) for k in a)
  val = data.prepare_cache(config.data, bpe, workdir).tokens("validation")[:]
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
    )["shakespeare"]
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
  # Validation: record 0 of file j when (0 + j) % 2 == 1, i.e. b.txt.
  # Train stream a a a b EOT (5 tokens), validation stream b a EOT (targets a, EOT);
  # add-one smoothing over 257 ids: p(a) = 4 / 262, p(EOT) = 2 / 262.
  expected = -(math.log(4 / 262) + math.log(2 / 262)) / 2
  assert data.unigram_loss(config.data, byte_tok, workdir) == pytest.approx(expected, rel=1e-12)


# ----------------------------------------------------- document masking


def test_segments_start_at_each_endoftext():
  eot = 9
  tokens = np.array([[1, 2, eot, 3, 4, 5, eot, eot, 6], [eot, 1, 2, 3, 4, 5, 6, 7, 8]])
  seg, pos = data.segments(jnp.asarray(tokens), eot)
  np.testing.assert_array_equal(seg, [[0, 0, 1, 1, 1, 1, 2, 3, 3], [1, 1, 1, 1, 1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(pos, [[0, 1, 0, 1, 2, 3, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7, 8]])
  assert seg.dtype == pos.dtype == jnp.int32


def _zst(raw: bytes) -> bytes:
  zstandard = pytest.importorskip("zstandard")
  return zstandard.ZstdCompressor().compress(raw)


def _parquet_bytes(tmp_path, **columns) -> bytes:
  path = write_parquet(tmp_path / "scratch.parquet", **columns)
  content = path.read_bytes()
  path.unlink()
  return content


LINES = "".join(json.dumps({"text": f"line {i * i}"}) + "\n" for i in range(900)).encode()
BAD_INPUTS = {
  "no_match": ({}, "nothing/*.txt", "matches no file"),
  "suffix": ({"a.csv": "x,y"}, "*.csv", "a.csv: unsupported file type \\(data.paths takes .txt, "),
  "empty": ({"a.txt": "", "b.jsonl": '{"text": ""}\n'}, "*", "the train split has no documents"),
  "undecodable_txt": ({"a.txt": "ok", "b.txt": b"caf\xe9"}, "*.txt", "b.txt: not UTF-8 text"),
  "undecodable_jsonl": (
    {"a.jsonl": b'{"text": "ok"}\n{"text": "caf\xe9"}\n'},
    "*",
    "a.jsonl:2: not UTF-8 text",
  ),
  "malformed_jsonl": ({"a.jsonl": '{"text": "ok"}\n{"text": \n'}, "*", "a.jsonl:2: invalid JSON"),
  "missing_field": ({"a.jsonl": '{"text": "ok"}\n\n{"body": "x"}\n'}, "*", "a.jsonl:3: no 'text' field"),
  "field_type": ({"a.jsonl": '{"text": "ok"}\n{"text": 3}\n'}, "*", "a.jsonl:2: field 'text' is a int"),
  "truncated_gz": (
    {
      "a.jsonl": '{"text": "ok"}\n{"text": "yes"}\n',
      "b.jsonl.gz": lambda _: gzip.compress(LINES)[:-200],
    },
    "*",
    "b.jsonl.gz: truncated gzip file",
  ),
  "truncated_zst": (
    {
      "a.jsonl": '{"text": "ok"}\n{"text": "yes"}\n',
      "b.jsonl.zst": lambda _: _zst(LINES)[:-50],
    },
    "*",
    "b.jsonl.zst: truncated zstd file",
  ),
  "parquet_without_column": (
    {"a.parquet": lambda tmp: _parquet_bytes(tmp, docs=["a", "b"], field="body")},
    "*",
    "a.parquet: no column 'text' \\(data.text_field; columns: body, id\\)",
  ),
  "bin_bad_header": (
    {
      "train.bin": lambda _: (
        np.r_[np.array([20240521, 1, 3], "<i4"), np.zeros(253, "<i4")].tobytes() + b"\0" * 6
      ),
      "val.bin": b"\0\0",
    },
    "train.bin",
    "train.bin: looks like an llm.c shard \\(version 1, 3 tokens\\) but its magic is 20240521",
  ),
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
    write(tmp_path / "in" / name, content(tmp_path) if callable(content) else content)
  config, workdir = files_config(
    debug_config, tmp_path, str(tmp_path / "in" / pattern), val_fraction=0.5, eval_paths=""
  )
  if case == "bin_bad_header":
    config.data.eval_paths = str(tmp_path / "in" / "val.bin")
  with pytest.raises(UserError, match=message) as err:
    next(_iterator(config, byte_tok, workdir))
  assert "\n" not in str(err.value)
  # Nothing is published, not even a corpus too short to train on, and no folder is left behind:
  # the build's tmp folder was made in the deepest existing one (tmp_path), <workdir>/data never.
  assert not Path(workdir).exists() and [p.name for p in tmp_path.iterdir() if p.name != "in"] == []


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


def test_bench_counts_what_it_built_and_leaves_no_cache(tmp_path):
  docs = [d for d in data_sources.shakespeare_documents()[:60] if d]
  write(tmp_path / "c" / "a.jsonl", jsonl(docs[:30]))
  write(tmp_path / "c" / "b.jsonl.gz", gzip.compress(jsonl(docs[30:]).encode()))
  out = tmp_path / "bench.json"
  run = subprocess.run(
    [
      sys.executable,
      "-m",
      "gpt_jax.data",
      "--config=configs/debug.py",
      f"--workdir={tmp_path / 'w'}",
      "--config.data.tokenizer=gpt2",
      "--config.model.vocab_size=50257",
      "--config.data.source=files",
      f"--config.data.paths={tmp_path}/c/*",
      "--bench",
      "--bench_threads=2",
      "--bench_batches=5",
      f"--json_out={out}",
    ],
    cwd=ROOT,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    capture_output=True,
    text=True,
  )
  assert run.returncode == 0, run.stderr
  r = json.loads(out.read_text())
  gpt2 = tok_lib.gpt2()
  built = r["sources"]["files"]
  assert built["documents"] == len(docs) and built["tokens"] == sum(len(gpt2.encode(d)) + 1 for d in docs)
  for key in ("documents_per_s", "MB_per_s", "tokens_per_s", "single_thread_tokens_per_s", "peak_rss_GiB"):
    assert built[key] > 0, key
  assert r["iterator"]["shape"] == [8, 33] and r["iterator"]["batches_per_s"] > 0
  for line in ("cache build: ", "tiktoken single thread", "build / (2 cores x single thread)", "iterator: "):
    assert line in run.stdout, line
  assert not (tmp_path / "w" / "bench_data").exists()  # the caches it built are gone

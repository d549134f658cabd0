"""Small fine-tuning tasks made from the default corpus, for the README's guided path.

    python -m gpt_jax.finetune --make_example=runs/examples

writes, from the plays of the default corpus (as plain text):
- `keyword_train.csv` / `keyword_dev.csv`: lines of verse labelled
  "positive" when they contain the word "love" (any case), else "negative",
  balanced; a task one keyword decides, so a small pretrained model can
  learn it in a minute (configs/shakespeare_classify.py).
- `shakespeare_validation.jsonl`: {"text": scene} for the scenes the default
  job holds out for validation (data.val_fraction = 0.05), so
  `evaluate --task=perplexity:...` scores text the model never trained on.
- `dialogues_train.jsonl` / `dialogues_dev.jsonl`: {"turns": [a, b]} where b
  is the first sentence of the speech that answers the speech whose first
  sentence is a, within a scene; replies in the corpus's own words
  (configs/shakespeare_dialogue.py, chat).
Deterministic: the same files on every run. The dev rows come from scenes
the training rows never see (every 10th scene).
"""

from __future__ import annotations

import csv
import json
import random
import re
from pathlib import Path

from gpt_jax import data_sources
from gpt_jax.errors import UserError

KEYWORD = "love"
VAL_FRACTION = 0.05  # configs/base.py's data.val_fraction: the default job's validation scenes.
CLASSIFY_ROWS = {"train": 300, "dev": 100}
DIALOGUE_ROWS = {"train": 2000, "dev": 200}
_WORD = re.compile(rf"\b{KEYWORD}\b", re.IGNORECASE)


def speeches(scene_markdown: str) -> list[list[str]]:
  """The speeches of a scene (in the package's Markdown), each as its lines of plain text;
  stage directions and headings dropped."""
  out, current = [], None
  for line in scene_markdown.splitlines():
    if data_sources.is_speaker_line(line):
      current = []
      out.append(current)
    elif not line.strip() or line.lstrip().startswith(("_", "*", "#")):
      current = None  # A blank line or a stage direction ends the speech.
    elif current is not None:
      current.append(data_sources.plain_text(line).strip())
  return [[t for t in s if t] for s in out if any(s)]


def _split(scenes):
  return {"train": [s for i, s in enumerate(scenes) if i % 10], "dev": scenes[::10]}


def keyword_rows(scenes, rows: int, seed: int) -> list[dict]:
  """`rows` lines of verse, half with the keyword ("positive"), half without, shuffled."""
  lines = sorted(
    {line for scene in scenes for sp in speeches(scene) for line in sp if len(line.split()) >= 4}
  )
  pos = [t for t in lines if _WORD.search(t)]
  neg = [t for t in lines if not _WORD.search(t)]
  rng = random.Random(seed)
  half = rows // 2
  if len(pos) < half or len(neg) < rows - half:
    raise UserError(f"the corpus has too few lines for {rows} keyword rows")
  out = [{"text": t, "label": "positive"} for t in rng.sample(pos, half)]
  out += [{"text": t, "label": "negative"} for t in rng.sample(neg, rows - half)]
  rng.shuffle(out)
  return out


_SENTENCE = re.compile(r"^(.+?[.!?;])(\s|$)")
MAX_TURN_WORDS = 16


def first_sentence(speech: list[str]) -> str:
  """The speech's first sentence (to . ! ? or ;), "" if it runs past MAX_TURN_WORDS words."""
  m = _SENTENCE.match(" ".join(speech))
  return m.group(1) if m and len(m.group(1).split()) <= MAX_TURN_WORDS else ""


def dialogue_rows(scenes, rows: int, seed: int) -> list[dict]:
  """`rows` two-turn exchanges: a speech's first sentence and the first sentence of its answer."""
  pairs = []
  for scene in scenes:
    firsts = [first_sentence(sp) for sp in speeches(scene)]
    pairs += [{"turns": [a, b]} for a, b in zip(firsts, firsts[1:]) if a and b]
  rng = random.Random(seed)
  if len(pairs) < rows:
    raise UserError(f"the corpus has too few exchanges for {rows} dialogues")
  return rng.sample(pairs, rows)


def write(directory: str) -> list[Path]:
  """Writes the four example files into `directory` (created); returns their paths."""
  out = Path(directory).expanduser()
  out.mkdir(parents=True, exist_ok=True)
  splits = _split(list(data_sources.shakespeare_scenes()))
  written = []
  for split, scenes in splits.items():
    path = out / f"keyword_{split}.csv"
    with path.open("w", encoding="utf-8", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=["text", "label"])
      writer.writeheader()
      writer.writerows(keyword_rows(scenes, CLASSIFY_ROWS[split], seed=len(split)))
    written.append(path)
    path = out / f"dialogues_{split}.jsonl"
    rows = dialogue_rows(scenes, DIALOGUE_ROWS[split], seed=len(split))
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    written.append(path)
  docs = data_sources.shakespeare_documents()
  path = out / "shakespeare_validation.jsonl"
  held_out = data_sources.held_out(len(docs), VAL_FRACTION)
  path.write_text("".join(json.dumps({"text": docs[i]}) + "\n" for i in held_out), encoding="utf-8")
  written.append(path)
  return written

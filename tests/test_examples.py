"""The example fine-tuning tasks made from the default corpus (gpt_jax/examples.py)."""

import csv
import json
import re
import subprocess
import sys

from gpt_jax import data_sources, examples


def _rows(path):
  if path.suffix == ".csv":
    with path.open(encoding="utf-8", newline="") as f:
      return list(csv.DictReader(f))
  return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_example_files_are_balanced_deterministic_and_from_unseen_scenes(tmp_path):
  first = {p.name: p.read_bytes() for p in examples.write(str(tmp_path / "a"))}
  again = {p.name: p.read_bytes() for p in examples.write(str(tmp_path / "b"))}
  assert first == again  # The same files on every run.
  train, dev = (_rows(tmp_path / "a" / f"keyword_{s}.csv") for s in ("train", "dev"))
  assert len(train) == 300 and len(dev) == 100
  for rows in (train, dev):
    assert sum(r["label"] == "positive" for r in rows) == len(rows) // 2
    assert all((r["label"] == "positive") == bool(re.search(r"\blove\b", r["text"], re.I)) for r in rows)
  scenes = data_sources.shakespeare_scenes()
  dev_text = "\n".join(data_sources.plain_text(s) for s in scenes[::10])
  train_text = "\n".join(data_sources.plain_text(s) for i, s in enumerate(scenes) if i % 10)
  assert all(r["text"] in dev_text for r in dev) and all(r["text"] in train_text for r in train)
  dialogues = _rows(tmp_path / "a" / "dialogues_train.jsonl")
  assert len(dialogues) == 2000 and all(len(d["turns"]) == 2 and all(d["turns"]) for d in dialogues)
  words = set(re.findall(r"[A-Za-z']+", train_text))
  assert all(set(re.findall(r"[A-Za-z']+", t)) <= words for d in dialogues for t in d["turns"])
  # Exactly the default job's validation documents (config.data.val_fraction of configs/base.py).
  from configs import base

  held = [r["text"] for r in _rows(tmp_path / "a" / "shakespeare_validation.jsonl")]
  val = data_sources.iter_documents(base.get_config().data, "validation")
  assert held == list(val)


def test_speeches_and_first_sentences():
  scene = (
    "### SCENE I\n\n_Enter A_\n\n**A**  \nGood morrow, sir.  \nHow now?\n\n"
    "**B**  \nNothing, Messala; and\nmore.\n"
  )
  assert examples.speeches(scene) == [["Good morrow, sir.", "How now?"], ["Nothing, Messala; and", "more."]]
  assert examples.first_sentence(["Good morrow, sir.", "How now?"]) == "Good morrow, sir."
  assert examples.first_sentence(["Nothing, Messala; and", "more."]) == "Nothing, Messala;"
  assert examples.first_sentence(["a " * 20 + "end."]) == ""  # Too long for a turn.


def test_cli_writes_the_examples(tmp_path):
  r = subprocess.run(
    [sys.executable, "-m", "gpt_jax.finetune", f"--make_example={tmp_path}"], capture_output=True, text=True
  )
  assert r.returncode == 0, r.stderr[-2000:]
  assert sorted(p.name for p in tmp_path.iterdir()) == [
    "dialogues_dev.jsonl",
    "dialogues_train.jsonl",
    "keyword_dev.csv",
    "keyword_train.csv",
    "shakespeare_validation.jsonl",
  ]
  assert r.stdout.count("wrote ") == 5

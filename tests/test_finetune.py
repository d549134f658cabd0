"""GPT-1 fine-tuning end to end: pretrain, fine-tune, predict (the data: test_finetune_data.py; the
heads and losses: test_finetune_heads.py)."""

import json
import math
import random
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import debug
from gpt_jax import checkpoint, finetune, model, pretrain
from gpt_jax import config as config_lib

# ------------------------------------------------------------ end to end

LETTERS = list("abcdfghlmnopstwy")  # Single-token words under the debug BPE.


def keyword_rows(n, seed):
  """Label 1 iff the keyword "a" occurs anywhere in the text."""
  rng = random.Random(seed)
  rows = []
  for _ in range(n):
    words = [rng.choice(LETTERS[1:]) for _ in range(rng.randint(4, 8))]
    label = rng.random() < 0.5
    if label:
      words[rng.randrange(len(words))] = "a"
    rows.append({"text": " ".join(words), "label": int(label)})
  return rows


def entailment_rows(n, seed):
  """Label 1 iff every hypothesis word occurs in the premise (2 words each, from 6).

  The negatives share no word with the premise. Matching tokens is what a
  2-layer, 32-wide model with 8-dim heads learns slowest: with one shared word
  in the negatives, or 16 words, it needs ~1500 steps instead of ~300.
  """
  rng = random.Random(seed)
  words = LETTERS[:6]
  rows = []
  for _ in range(n):
    premise = rng.sample(words, 2)
    label = rng.random() < 0.5
    hypothesis = rng.sample(premise if label else [w for w in words if w not in premise], 2)
    rows.append({"premise": " ".join(premise), "hypothesis": " ".join(hypothesis), "label": int(label)})
  return rows


def choice_rows(n, seed, num_choices=3):
  """The right choice repeats the context word; the others differ from it (words from 8).

  (A context of two or more words takes this model ~1000+ steps.)
  """
  rng = random.Random(seed)
  words = LETTERS[:8]
  rows = []
  for _ in range(n):
    context = rng.choice(words)
    choices = rng.sample([w for w in words if w != context], num_choices)
    label = rng.randrange(num_choices)
    choices[label] = context
    rows.append({"context": context, "choices": choices, "label": label})
  return rows


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def numpy_init(cfg, seed):
  """GPT params drawn like model.init_params (N(0, init_std), unit gains, zero biases), by numpy.

  Compiling the random initialisers takes ~15 s on a busy 2-core CPU; this takes none.
  """
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return np.ones(s.shape, np.float32)
    if "bias" in name:
      return np.zeros(s.shape, np.float32)
    return rng.normal(0.0, cfg.init_std, s.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(
    draw, jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
  )


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A short pretraining of the debug model on Shakespeare: the checkpoint fine-tuning starts from."""
  root = tmp_path_factory.mktemp("finetune")
  c = debug.get_config()
  checkpoint.save_params(root / "init", c, numpy_init(c.model, 0))
  c.init_from = str(root / "init")
  c.data.max_documents = 60
  c.train.num_steps = 40
  c.train.compilation_cache_dir = str(root / "jax_cache")
  c.checkpoint.every_steps = 1000
  c.eval.every_steps = 0
  c.sample.num_samples = 0
  c.log.tensorboard = False
  pretrain.run(config_lib.validate(c), str(root / "pretrain"))
  return root


def finetune_run(root, name, task, train_rows, eval_rows, *, batch_size=16, lr=3e-3, **fields):
  c = debug.get_config()
  c.job = "finetune"
  c.init_from = str(root / "pretrain")
  c.finetune.update(
    task=task,
    train_path=write_jsonl(root / f"{name}_train.jsonl", train_rows),
    eval_path=write_jsonl(root / f"{name}_eval.jsonl", eval_rows),
    **fields,
  )
  c.train.update(batch_size=batch_size, compilation_cache_dir=str(root / "jax_cache"))
  c.eval.batch_size = 40
  # GPT-1's recipe (Adam b2 0.999, L2 0.01, linear decay) at a rate that suits a 2-layer, 32-wide model.
  c.optim.update(lr=lr, schedule="linear", min_lr_ratio=0.0, b2=0.999, weight_decay=0.01)
  c.checkpoint.every_steps = 1000
  c.log.update(every_steps=50, tensorboard=False)
  c.sample.num_samples = 0
  workdir = root / name
  final = finetune.run(config_lib.validate(c), str(workdir))
  return final, workdir


def val_records(workdir):
  return [
    r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines()) if "val/accuracy" in r
  ]


@pytest.mark.slow
def test_classification_reaches_90_percent_and_predicts_from_best(pretrained):
  final, workdir = finetune_run(
    pretrained,
    "keyword",
    "classification",
    keyword_rows(800, 1),
    keyword_rows(200, 2),
    epochs=4.0,
    lm_coef=0.5,
  )
  evals = val_records(workdir)
  assert [r["step"] for r in evals] == [50, 100, 150, 200]  # One evaluation per epoch.
  report("keyword classification (λ=0.5)", evals)
  assert final["best/accuracy"] >= 0.9, evals
  assert final["best/accuracy"] == max(r["val/accuracy"] for r in evals)
  assert "val/f1" in final and "lm_loss" in final
  best = json.loads((workdir / "best" / "best.json").read_text())
  assert best["accuracy"] == final["best/accuracy"]
  # predict (the CLI) labels new rows with the best params.
  rows = [{"text": "b c a d"}, {"text": "b c d f g"}, {"text": "g h l m a"}, {"text": "t w y o"}]
  path = write_jsonl(pretrained / "new_rows.jsonl", rows)
  out = subprocess.run(
    [sys.executable, "-m", "gpt_jax.finetune", f"--workdir={workdir}", f"--predict={path}"],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  preds = [json.loads(line) for line in out.stdout.splitlines()]
  assert [p["label"] for p in preds] == [1, 0, 1, 0]
  assert all(abs(sum(p["probs"]) - 1) < 1e-4 for p in preds)


def report(task, evals):
  """The figures of a generated task (shown with pytest -s)."""
  curve = ", ".join(f"{r['step']}: {r['val/accuracy']:.3f}" for r in evals)
  print(f"\n[{task}] validation accuracy by step: {curve}")


# Token matching (entailment, multiple choice) is learnt only without the auxiliary LM term here
# (λ = 0: with λ = 0.5 the task loss stays at chance for 600+ steps; GPT-1 §5 too finds that
# small datasets do not benefit from it), with a 10% warmup (a 1-step warmup stalls some seeds
# on a plateau) and batch 32.
MATCHING = dict(batch_size=32, lr=5e-3, lm_coef=0.0, head_dropout=0.0, warmup_fraction=0.1)


@pytest.mark.slow
def test_entailment_reaches_90_percent(pretrained):
  train_rows, eval_rows = entailment_rows(2000, 1), entailment_rows(200, 2)
  final, workdir = finetune_run(
    pretrained, "entail", "entailment", train_rows, eval_rows, epochs=8.0, **MATCHING
  )
  report("entailment (λ=0)", val_records(workdir))
  assert final["best/accuracy"] >= 0.9, val_records(workdir)


@pytest.mark.slow
def test_multiple_choice_reaches_90_percent(pretrained):
  train_rows, eval_rows = choice_rows(800, 1), choice_rows(200, 2)
  final, workdir = finetune_run(
    pretrained, "choice", "multiple_choice", train_rows, eval_rows, epochs=12.0, **MATCHING
  )
  report("multiple choice (λ=0)", val_records(workdir))
  assert final["best/accuracy"] >= 0.9, val_records(workdir)
  rows, summary = finetune.predict(str(workdir), str(pretrained / "choice_eval.jsonl"))
  assert len(rows) == 200 and len(rows[0]["probs"]) == 3
  assert summary["accuracy"] == pytest.approx(final["best/accuracy"])
  assert math.isclose(sum(rows[0]["probs"]), 1.0, abs_tol=1e-4)

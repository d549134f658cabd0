"""GPT-1 supervised fine-tuning (Radford et al. 2018, §3.2-3.3) and DialoGPT training, on train.run.

    python -m gpt_jax.finetune --config=configs/finetune_sst2.py --workdir=runs/sst2 \\
        --config.init_from=runs/pretrain
    python -m gpt_jax.finetune --workdir=runs/sst2 --predict=rows.jsonl --output=preds.jsonl
    python -m gpt_jax.main --config=configs/finetune_classify.py --workdir=... (same run, job="finetune")

Classification-type tasks (finetune.task: classification, entailment,
similarity, multiple_choice) turn each example into token sequences with
learned start / delim / extract tokens (layouts in finetune_data.py), appended
to the pretrained vocabulary: the embedding table grows by three rows drawn
like the rest, N(0, init_std), and the pretrained rows are kept. A linear head
reads the final hidden state at the extract token (after dropout 0.1):
classes, one similarity score (regression), or one score per choice with a
softmax over the choices. Similarity adds the two orders' extract states
elementwise before the head (§3.3). The loss is L3 = L2 + λ·L1 (§3.2): L2 the
task loss (cross-entropy, or squared error for regression), L1 the language
model loss on the same sequences, λ = finetune.lm_coef. As in the GPT-1 code,
L1 is each sequence's mean next-token loss, averaged over an example's
sequences; both terms are means over examples.

Dialogue (finetune.task="dialogue") is language modelling on DialoGPT
sequences with the loss on the response turns only: the same GPT parameters,
no new tokens; chat.py serves it.

Every run goes through train.run (sharding, checkpoints, resume, metrics). Per
epoch the validation split is scored (val/accuracy, val/f1 for two classes,
val/pearson and val/spearman for regression) into metrics.jsonl and
TensorBoard, and the best params so far are exported to <workdir>/best/, which
`--predict` reads.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
from absl import flags, logging
from ml_collections import config_flags

from gpt_jax import (
  checkpoint,
  cli,
  examples,
  hf,
  loading,
  model,
  model_config,
  paths,
  pretrain,
  sharding,
  train,
)
from gpt_jax import config as config_lib
from gpt_jax import finetune_data as fd
from gpt_jax import finetune_heads as heads
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.errors import ConfigError, UserError

# Model fields a fine-tuning config may set; every other model field comes
# from the pretrained checkpoint (they fix the parameters' shapes or meaning).
RUNTIME_FIELDS = ("dtype", "remat", "attention_impl", "embd_dropout", "attn_dropout", "resid_dropout")
BEST_DIR = "best"
BEST_FILE = "best.json"

# -------------------------------------------------------- best export


def _write_export(directory: Path, config, params, tok, record: dict) -> None:
  """The best params as a params export: config.json, params/ + checksums.json, tokenizer/, best.json."""
  final = directory / BEST_DIR
  tmp = directory / f".{BEST_DIR}.tmp-{record['step']}"
  if jax.process_index() == 0:
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    paths.write_config(tmp / paths.CONFIG_FILE, config)
    tok.save(str(tmp / "tokenizer"))
  checkpoint.write_params(tmp, params)
  if jax.process_index() == 0:
    (tmp / BEST_FILE).write_text(json.dumps(record, indent=1) + "\n")
    # Swap in two renames: a crash leaves either the old best/ or the new
    # one plus a .old copy, never a half-written best/.
    old = directory / f".{BEST_DIR}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
      os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(f"finetune best export {record['step']}")


def _local_run_dir(path: str, flag: str) -> str:
  """Fine-tuning swaps its best/ export in with directory renames, which a bucket lacks."""
  path = paths.run_dir(path, flag)
  if paths.is_url(path):
    raise UserError(
      f"{flag}={path}: fine-tuning needs a local or mounted folder (its best/ export is swapped in "
      "with directory renames, which a bucket does not have); pretraining takes gs:// workdirs"
    )
  return path


def read_best(workdir) -> dict | None:
  path = Path(workdir) / BEST_DIR / BEST_FILE
  return json.loads(path.read_text()) if path.exists() else None


def _eval_steps(workdir: str, every: int, num_steps: int) -> list[int]:
  """The steps at which train.run will call extra_eval in this run (it does not pass the step).

  The loop evaluates every `every` steps and at the end, from the newest
  checkpoint on; a broken newest checkpoint (restored from an older one)
  would shift these labels.
  """
  ckpt_dir = Path(workdir) / "checkpoints"
  done = [int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()] if ckpt_dir.exists() else []
  start = max(done, default=0)
  steps = [s for s in range(every, num_steps, every) if s > start] if every else []
  return steps + [num_steps]


# ------------------------------------------------------- pretrained model


def pretrained_model_config(path: str):
  """config.model of a gpt_jax workdir / params export / step dir (local or gs://), or of a
  Hugging Face GPT-2 folder."""
  p = _pretrained_path(path)
  if not p.exists():
    raise UserError(f"config.finetune.pretrained={path!r} does not exist")
  if loading.is_hf_dir(p):
    return hf.model_config_from_hf(json.loads((p / "config.json").read_text()), p / "config.json")
  return loading.run_config(p).model


def _pretrained_path(path: str):
  return paths.absolute(paths.run_dir(path, "config.finetune.pretrained"))


def pretrained_tokenizer(path: str) -> tokenizer_lib.Tokenizer:
  p = _pretrained_path(path)
  if loading.is_hf_dir(p):
    return tokenizer_lib.from_hf_dir(str(p))
  for d in (p / "tokenizer", p.parent.parent / "tokenizer"):
    if (d / tokenizer_lib.META_FILE).exists():
      return tokenizer_lib.load_dir(str(d))
  raise UserError(f"config.finetune.pretrained={path!r} has no tokenizer/ folder")


def _run_tokenizer(config, workdir: str) -> tokenizer_lib.Tokenizer:
  """The pretrained model's tokenizer (a random init: config.data's), checked against the one the
  workdir pinned; written there only by `_pin_tokenizer`, once nothing can refuse the run (one
  process: several wait for process 0's files, so a multi-process run pins it at once)."""
  fc = config.finetune
  if not fc.pretrained:
    return tokenizer_lib.for_run(config, workdir, pin=jax.process_count() > 1)
  tok = pretrained_tokenizer(fc.pretrained)
  pinned = Path(workdir) / "tokenizer"
  if (pinned / tokenizer_lib.META_FILE).exists():
    if tokenizer_lib.load_dir(str(pinned)).fingerprint != tok.fingerprint:
      raise UserError(f"{pinned} holds another tokenizer than {fc.pretrained}; use a new --workdir")
  return tok


def _pin_tokenizer(tok, workdir: str) -> None:
  pinned = Path(workdir) / "tokenizer"
  if jax.process_index() == 0 and not (pinned / tokenizer_lib.META_FILE).exists():
    tmp = tokenizer_lib.tmp_dir_for(pinned)
    tok.save(str(tmp))
    tokenizer_lib.publish_dir(tmp, pinned)


def finetune_model_config(config):
  """(config.model for the run, base vocabulary = first special-token id)."""
  fc = config.finetune
  if fc.pretrained:
    m = pretrained_model_config(fc.pretrained)
    for f in RUNTIME_FIELDS:
      m[f] = config.model[f]
  else:
    m = config.model.copy_and_resolve_references()
  base_vocab = int(m.vocab_size)
  if fc.task != "dialogue":
    m.vocab_size = base_vocab + fd.NUM_SPECIALS
  model_config.of(m)
  return m, base_vocab


def _initial_params(config, base_vocab: int, mesh, fc):
  """Task.initial_params: pretrained weights loaded onto the mesh, wte grown for the specials."""
  if not fc.pretrained:
    return None
  model_cfg = config.model
  rules = sharding.rules(config)

  def load(shardings):
    pre_cfg = pretrained_model_config(fc.pretrained)
    pre_abstract = jax.eval_shape(lambda: model.init_params(pre_cfg, jax.random.key(0)))
    pre_sh = sharding.logical_to_shardings(model.logical_specs(pre_cfg), pre_abstract, mesh, rules)
    _, gpt = loading.load_params(fc.pretrained, shardings=pre_sh)
    logging.info("fine-tuning from %s", fc.pretrained)
    if fc.task == "dialogue":
      return gpt

    def build(gpt, rng):
      # Only the new rows and the head are drawn: every random op costs compile time.
      k_wte, k_head = jax.random.split(rng)
      return {
        "gpt": heads.resize_embeddings(gpt, base_vocab, model_cfg, k_wte),
        "head": heads.head_params(model_cfg, fc, k_head),
      }

    return jax.jit(build, out_shardings=shardings)(gpt, jax.random.key(config.train.seed))

  return load


# ------------------------------------------------------------------ data


def _prepare_classification(config, tok, base_vocab: int):
  """(train arrays, eval arrays or None, sequences per example, padded length)."""
  fc = config.finetune
  sp = fd.Specials.after(base_vocab)
  max_len = fc.max_len or config.model.block_size
  train_enc = fd.encode_records(fc, fd.read_split(fc, "train"), tok, sp, max_len, need_labels=True)
  eval_enc = fd.encode_records(fc, fd.read_split(fc, "eval"), tok, sp, max_len, need_labels=True)
  if not len(train_enc):
    raise UserError(f"{fc.tfds_name or fc.train_path}: no training examples")
  encs = [e for e in (train_enc, eval_enc) if len(e)]
  num_seqs = max(len(row) for e in encs for row in e.seqs)
  seq_len = fd.round_len(max(len(s) for e in encs for row in e.seqs for s in row), max_len)
  train_arrays = fd.pack(train_enc, seq_len, num_seqs, fc.regression)
  eval_arrays = fd.pack(eval_enc, seq_len, num_seqs, fc.regression) if len(eval_enc) else None
  return train_arrays, eval_arrays, num_seqs, seq_len


def encode_dialogues(fc, path: str, tok, max_len: int) -> list[tuple[list[int], list[int]]]:
  dialogues = fd.read_dialogues(path, fc.max_examples)
  ids = tok.encode_batch([t for _, turns in dialogues for t in turns])
  out, pos = [], 0
  for _, turns in dialogues:
    turn_ids = ids[pos : pos + len(turns)]
    pos += len(turns)
    out.append(
      fd.dialogue_sequence(
        turn_ids, tok.eot_id, max_len=max_len, loss_turns=fc.loss_turns, reverse=fc.reverse_turns
      )
    )
  return out


def _prepare_dialogue(config, tok):
  fc = config.finetune
  max_len = fc.max_len or config.model.block_size
  train_ex = encode_dialogues(fc, fc.train_path, tok, max_len)
  if not train_ex:
    raise UserError(f"{fc.train_path}: no dialogues")
  eval_ex = encode_dialogues(fc, fc.eval_path, tok, max_len) if fc.eval_path else []
  seq_len = fd.round_len(max(len(t) - 1 for t, _ in train_ex + eval_ex), max_len)
  pack = lambda ex: fd.pack_dialogues(ex, seq_len, tok.eot_id)
  return pack(train_ex), (pack(eval_ex) if eval_ex else None), 1, seq_len


# ------------------------------------------------------------- the run


def _make_task_fn(config, tok, base_vocab: int, prepared, steps_per_epoch: int):
  fc = config.finetune
  train_arrays, eval_arrays, num_seqs, seq_len = prepared

  def task_fn(config, workdir, mesh):
    pi, pc = jax.process_index(), jax.process_count()
    train_iter = fd.train_iterator(
      train_arrays,
      batch_size=config.train.batch_size,
      seed=config.data.shuffle_seed,
      process_index=pi,
      process_count=pc,
      data_cfg=config.data,
    )
    eval_bs = config.eval.batch_size or config.train.batch_size
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if eval_arrays is not None and eval_bs % dp:
      raise ConfigError(
        f"config.eval.batch_size={eval_bs} (0 = train.batch_size) must be divisible by mesh data*fsdp = {dp}"
      )
    batches = []
    if eval_arrays is not None:
      batches = fd.eval_batches(eval_arrays, batch_size=eval_bs, process_index=pi, process_count=pc)
    common = dict(
      train_iter=train_iter,
      meta={"tokenizer": tok.fingerprint, "finetune_task": fc.task},
      tokens_per_example=num_seqs * seq_len,
      initial_params=_initial_params(config, base_vocab, mesh, fc),
      next_steps=next_steps(fc, workdir),
      pin=lambda: _pin_tokenizer(tok, workdir),
    )
    if fc.task == "dialogue":
      return train.Task(
        init_params=lambda rng: model.init_params(config.model, rng),
        param_specs=model.logical_specs(config.model),
        loss_fn=pretrain.lm_loss_fn(config.model),
        eval_batches=batches,
        **common,
      )

    extra_eval = None
    if batches:
      program = heads.scores_program(config.model, fc, mesh)
      labels = eval_arrays["label"]
      name = heads.best_metric_name(fc)
      steps = _eval_steps(workdir, config.eval.every_steps, config.train.num_steps)
      best = {"record": read_best(workdir)}

      def extra_eval(params, step=None):
        step = step if step is not None else (steps.pop(0) if steps else config.train.num_steps)
        m = heads.metrics(fc, heads.score_batches(program, params, batches, len(labels), mesh), labels)
        m["epoch"] = step / steps_per_epoch
        if best["record"] is None or m[name] > best["record"][name]:
          best["record"] = {"step": step, **m}
          _write_export(Path(workdir), config, params, tok, best["record"])
        return {f"val/{k}": v for k, v in m.items()}

    def finish(params):
      del params
      record, name = read_best(workdir), heads.best_metric_name(fc)
      if record is not None and jax.process_index() == 0:
        print(
          f"best val/{name} {record[name]:.4f} at step {record['step']} (epoch {record['epoch']:.2f}) "
          f"-> {os.path.join(workdir, BEST_DIR)}",
          flush=True,
        )

    return train.Task(
      init_params=lambda rng: heads.init_params(config.model, fc, rng),
      param_specs=heads.param_specs(config.model),
      loss_fn=heads.make_loss_fn(config.model, fc),
      eval_batches=[],
      extra_eval=extra_eval,
      finish=finish,
      **common,
    )

  return task_fn


def next_steps(fc, workdir: str) -> tuple[str, ...]:
  """Commands to run on a finished fine-tuning run, its workdir filled in."""
  w = paths.display(workdir)
  if fc.task == "dialogue":
    return (
      f'python -m gpt_jax.chat --workdir={w} --once "What news?"',
      f"python -m gpt_jax.chat --workdir={w}",
    )
  data = fc.eval_path or "FILE.csv"
  return (f"python -m gpt_jax.finetune --workdir={w} --predict={data}",)


def run(config, workdir: str) -> dict:
  """Fine-tunes config.finetune.pretrained (or config.init_from) in workdir; resumes like train.run.

  Sets config.model from the pretrained checkpoint (RUNTIME_FIELDS from the
  config), train.num_steps and eval.every_steps from finetune.epochs, and
  optim.warmup_steps from finetune.warmup_fraction, then calls train.run.
  Returns its final metrics plus the best validation record ("best/...").
  """
  workdir = _local_run_dir(workdir, "--workdir")
  fc = config.finetune
  with config.unlocked():
    if config.init_from:
      if fc.pretrained and fc.pretrained != config.init_from:
        raise ConfigError(
          f"config.init_from={config.init_from!r} and config.finetune.pretrained={fc.pretrained!r} differ"
        )
      # train.run would load init_from as a plain GPT tree; the task loads it.
      fc.pretrained, config.init_from = config.init_from, ""
    config.model, base_vocab = finetune_model_config(config)
  max_len = fc.max_len or config.model.block_size
  if max_len > config.model.block_size:
    raise ConfigError(
      f"config.finetune.max_len={fc.max_len} exceeds model.block_size={config.model.block_size}"
    )
  tok = _run_tokenizer(config, workdir)
  if tok.vocab_size > base_vocab:
    raise UserError(f"the tokenizer has {tok.vocab_size} ids but the model only {base_vocab}")
  if fc.task == "dialogue":
    prepared = _prepare_dialogue(config, tok)
  else:
    prepared = _prepare_classification(config, tok, base_vocab)
  n_train = len(prepared[0]["tokens"])
  batch = config.train.batch_size
  steps_per_epoch = math.ceil(n_train / batch)
  with config.unlocked():
    if fc.epochs > 0:
      config.train.num_steps = max(1, math.ceil(fc.epochs * n_train / batch))
      config.eval.every_steps = steps_per_epoch
    if fc.warmup_fraction > 0:
      config.optim.warmup_steps = max(1, round(fc.warmup_fraction * config.train.num_steps))
    # At least ~20 points on the training curves of a short fine-tune.
    config.log.every_steps = max(1, min(config.log.every_steps, config.train.num_steps // 20))
  logging.info(
    "fine-tuning %s: %d training examples (%d sequence(s) of %d tokens each), %d eval examples, "
    "%d steps of %d (%d per epoch), warmup %d",
    fc.task,
    n_train,
    prepared[2],
    prepared[3],
    0 if prepared[1] is None else len(prepared[1]["tokens"]),
    config.train.num_steps,
    batch,
    steps_per_epoch,
    config.optim.warmup_steps,
  )
  final = train.run(config, workdir, _make_task_fn(config, tok, base_vocab, prepared, steps_per_epoch))
  record = read_best(workdir) if fc.task != "dialogue" else None
  if record:
    final.update({f"best/{k}": v for k, v in record.items()})
  return final


# --------------------------------------------------------------- predict


def _abstract(config):
  fc = config.finetune
  if fc.task == "dialogue":
    return jax.eval_shape(lambda: model.init_params(config.model, jax.random.key(0)))
  return jax.eval_shape(lambda: heads.init_params(config.model, fc, jax.random.key(0)))


def load_finetuned(path: str):
  """(config, params, tokenizer) of a fine-tuning run: its best/ export, else its newest checkpoint.

  path: a fine-tuning workdir or a best/ directory.
  """
  p = Path(_local_run_dir(path, "--workdir"))
  export = p if (p / "params").exists() else p / BEST_DIR
  if (export / "params").exists():
    config = paths.read_config(export / paths.CONFIG_FILE)
    params = checkpoint.restore_params(export / "params", _abstract(config), in_state=False)
    return config, params, tokenizer_lib.load_dir(str(export / "tokenizer"))
  if not (p / paths.CONFIG_FILE).exists():
    raise UserError(f"{path}: not a fine-tuning workdir (no {BEST_DIR}/ and no {paths.CONFIG_FILE})")
  config = paths.read_config(p / paths.CONFIG_FILE)
  steps = sorted(int(d.name) for d in (p / "checkpoints").glob("*") if d.name.isdigit())
  if not steps:
    raise UserError(f"{path}: no finished checkpoint to predict with")
  params = checkpoint.restore_params(
    p / "checkpoints" / str(steps[-1]) / "state", _abstract(config), in_state=True
  )
  return config, params, tokenizer_lib.load_dir(str(p / "tokenizer"))


def predict(path: str, input_path: str, *, batch_size: int = 32) -> tuple[list[dict], dict]:
  """Predictions for the rows of input_path (the training file format; labels optional).

  Returns (one dict per row: "where", then "label" + "probs", or "score" for
  regression; metrics over the rows that carry a label, {} if none).
  """
  config, params, tok = load_finetuned(path)
  fc = config.finetune
  if fc.task == "dialogue":
    raise UserError(f"{path} holds a dialogue model: talk to it with python -m gpt_jax.chat")
  sp = fd.Specials.after(config.model.vocab_size - fd.NUM_SPECIALS)
  max_len = fc.max_len or config.model.block_size
  enc = fd.encode_records(fc, list(fd.read_file(input_path)), tok, sp, max_len, need_labels=False)
  if not len(enc):
    raise UserError(f"{input_path}: no rows")
  num_seqs = max(len(r) for r in enc.seqs)
  seq_len = fd.round_len(max(len(s) for r in enc.seqs for s in r), max_len)
  arrays = fd.pack(enc, seq_len, num_seqs, fc.regression)
  batches = fd.eval_batches(arrays, batch_size=batch_size, process_index=0, process_count=1)
  out = heads.score_batches(heads.scores_program(config.model, fc), params, batches, len(enc))
  names = [n.strip() for n in fc.labels.split(",")] if fc.labels else []
  rows = []
  for i, where in enumerate(enc.where):
    if fc.regression:
      rows.append({"where": where, "score": float(out[i, 0])})
      continue
    z = out[i] - out[i].max()
    probs = np.exp(z) / np.exp(z).sum()
    k = int(probs.argmax())
    rows.append(
      {"where": where, "label": names[k] if names else k, "probs": [round(float(q), 6) for q in probs]}
    )
  labelled = [i for i, v in enumerate(enc.labels) if v is not None]
  summary = {}
  if labelled:
    summary = heads.metrics(fc, out[labelled], np.array([enc.labels[i] for i in labelled]))
    summary["rows"] = len(labelled)
  return rows, summary


# ------------------------------------------------------------------- CLI

_CONFIG = None


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  F = flags.FLAGS
  if F.make_example:
    for path in examples.write(F.make_example):
      print(f"wrote {path}", flush=True)
    return
  if not F.workdir:
    raise UserError("give --workdir=DIR (the run to train in or to predict with)")
  if F.predict:
    rows, summary = predict(F.workdir, F.predict, batch_size=F.batch_size)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if F.output:
      Path(F.output).write_text(lines, encoding="utf-8")
    else:
      print(lines, end="", flush=True)
    if summary:
      print(
        "labelled rows: " + ", ".join(f"{k} {v:.4g}" for k, v in summary.items()),
        flush=True,
        file=sys.stderr,
      )
    return
  if _CONFIG.value is None:
    raise UserError("give --config=configs/finetune_*.py to train, or --predict=FILE to predict")
  config = config_lib.validate(_CONFIG.value)
  if config.job != "finetune":
    raise UserError(f"config.job={config.job!r}: gpt_jax.finetune runs configs with job='finetune'")
  logging.set_verbosity(logging.INFO)
  run(config, F.workdir)


if __name__ == "__main__":
  _CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/finetune_*.py file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Fine-tuning run directory (to train in, or to predict with).")
  flags.DEFINE_string("predict", "", "Predict labels for the rows of this .jsonl / .csv / .tsv file.")
  flags.DEFINE_string("output", "", "Write predictions here (JSONL); default stdout.")
  flags.DEFINE_integer("batch_size", 32, "Rows per prediction batch.")
  flags.DEFINE_string(
    "make_example", "", "Write example tasks from the default corpus into this folder (gpt_jax/examples.py)."
  )
  cli.run(main)

"""GPT-1 fine-tuning: input transforms, truncation, heads and losses, data files, and end-to-end runs."""

import json
import math
import random
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import debug
from gpt_jax import checkpoint, errors, finetune, model, pretrain
from gpt_jax import config as config_lib
from gpt_jax import finetune_data as fd
from gpt_jax import finetune_heads as heads

SP = fd.Specials(100, 101, 102)


class NumberTokenizer:
  """Test tokenizer: the text " 5 7 9" is the ids [5, 7, 9]."""

  eot_id = 99
  vocab_size = 100

  def encode(self, text):
    return [int(t) for t in text.split()]

  def encode_batch(self, texts):
    return [self.encode(t) for t in texts]


def ft_config(task, **finetune_fields):
  c = debug.get_config()
  c.job = "finetune"
  c.finetune.update(**{"task": task, "train_path": "train.jsonl", **finetune_fields})
  return c


def encode(task, records, max_len=64, **fields):
  fc = ft_config(task, **fields).finetune
  items = [(f"rows.jsonl:{i + 1}", r) for i, r in enumerate(records)]
  return fd.encode_records(fc, items, NumberTokenizer(), SP, max_len, need_labels=False)


# ------------------------------------------------------------- transforms


def test_transform_layouts_are_exactly_the_documented_ones():
  s, d, e = 100, 101, 102
  enc = encode("classification", [{"text": "1 2 3", "label": 1}])
  assert enc.seqs == [[[s, 1, 2, 3, e]]] and enc.labels == [1]
  enc = encode("entailment", [{"premise": "1 2", "hypothesis": "3", "label": 0}])
  assert enc.seqs == [[[s, 1, 2, d, 3, e]]]
  enc = encode("similarity", [{"text_a": "1 2", "text_b": "3 4 5", "label": 1}])
  assert enc.seqs == [[[s, 1, 2, d, 3, 4, 5, e], [s, 3, 4, 5, d, 1, 2, e]]]
  enc = encode("multiple_choice", [{"context": "7 8", "choices": ["1", "2 3", "4"], "label": 2}])
  assert enc.seqs == [[[s, 7, 8, d, 1, e], [s, 7, 8, d, 2, 3, e], [s, 7, 8, d, 4, e]]]
  assert enc.labels == [2]
  # Custom field names (GLUE style) read the same layout.
  enc = encode("entailment", [{"sentence1": "5", "sentence2": "6"}], fields="sentence1,sentence2")
  assert enc.seqs == [[[s, 5, d, 6, e]]] and enc.labels == [None]


def test_truncation_cuts_the_longest_field_and_keeps_the_documented_side():
  assert fd.fit_lengths([3, 4], 10) == [3, 4]
  assert fd.fit_lengths([2, 20], 10) == [2, 8]
  assert fd.fit_lengths([9, 20], 10) == [5, 5]
  assert fd.fit_lengths([9, 20], 11) == [5, 5]  # Equal fields are cut equally (symmetric).
  s, d, e = 100, 101, 102
  premise, hypothesis = " ".join(map(str, range(1, 11))), " ".join(map(str, range(11, 21)))
  # max_len 9 leaves 6 tokens: 3 each; the premise keeps its end, the hypothesis its start.
  enc = encode("entailment", [{"premise": premise, "hypothesis": hypothesis}], max_len=9)
  assert enc.seqs == [[[s, 8, 9, 10, d, 11, 12, 13, e]]]
  enc = encode("classification", [{"text": premise}], max_len=6)
  assert enc.seqs == [[[s, 1, 2, 3, 4, e]]]
  enc = encode("similarity", [{"text_a": premise, "text_b": "31 32"}], max_len=9)
  assert enc.seqs == [[[s, 1, 2, 3, 4, d, 31, 32, e], [s, 31, 32, d, 1, 2, 3, 4, e]]]
  # Each (context, choice) pair is fitted on its own.
  enc = encode("multiple_choice", [{"context": premise, "choices": ["1", "41 42 43 44 45"]}], max_len=9)
  assert enc.seqs == [[[s, 6, 7, 8, 9, 10, d, 1, e], [s, 8, 9, 10, d, 41, 42, 43, e]]]


def test_records_from_csv_tsv_and_jsonl(tmp_path):
  (tmp_path / "mc.csv").write_text("context,choices_0,choices_1,label\n1 2,3,4 5,1\n")
  fc = ft_config("multiple_choice").finetune
  items = list(fd.read_file(str(tmp_path / "mc.csv")))
  enc = fd.encode_records(fc, items, NumberTokenizer(), SP, 64, need_labels=True)
  assert enc.seqs == [[[100, 1, 2, 101, 3, 102], [100, 1, 2, 101, 4, 5, 102]]] and enc.labels == [1]
  assert enc.where == [f"{tmp_path / 'mc.csv'}:2"]
  (tmp_path / "c.tsv").write_text("sentence\tlabel\n1 2\tpositive\n3\tnegative\n")
  fc = ft_config("classification", fields="sentence", labels="negative,positive").finetune
  enc = fd.encode_records(
    fc, fd.read_file(str(tmp_path / "c.tsv")), NumberTokenizer(), SP, 64, need_labels=True
  )
  assert enc.labels == [1, 0]
  fc = ft_config("similarity", regression=True).finetune
  rows = [("x:1", {"text_a": "1", "text_b": "2", "label": "3.5"})]
  assert fd.encode_records(fc, rows, NumberTokenizer(), SP, 64, need_labels=True).labels == [3.5]


def test_tfds_records_are_decoded_and_unlabelled_rows_marked(monkeypatch):
  """The TFDS path on a stand-in data source (GLUE itself cannot be downloaded here)."""
  import tensorflow_datasets as tfds

  records = [
    {"sentence1": b"1 2", "sentence2": b"3", "label": np.int64(1), "idx": np.int32(0)},
    {"sentence1": b"4", "sentence2": b"5 6", "label": np.int64(-1), "idx": np.int32(1)},
  ]

  class Source:
    def __len__(self):
      return len(records)

    def __getitems__(self, keys):
      return [records[k] for k in keys]

  class Builder:
    info = type("Info", (), {"splits": {"train": None, "validation": None}})()

    def is_prepared(self):
      return True

    def as_data_source(self, split):
      assert split == "validation"
      return Source()

  monkeypatch.setattr(tfds, "builder", lambda name, **kw: Builder())
  fc = ft_config("entailment", tfds_name="glue/rte", fields="sentence1,sentence2", train_path="").finetune
  items = fd.read_split(fc, "eval")
  assert [w for w, _ in items] == ["tfds:glue/rte:validation record 0", "tfds:glue/rte:validation record 1"]
  enc = fd.encode_records(fc, items, NumberTokenizer(), SP, 64, need_labels=False)
  assert enc.seqs == [[[100, 1, 2, 101, 3, 102]], [[100, 4, 101, 5, 6, 102]]] and enc.labels == [1, None]


@pytest.mark.parametrize(
  "line, message",
  [
    ('{"text": "1", "label": 7}', "rows.jsonl:2: label 7 is out of range for 2 classes"),
    ('{"txt": "1", "label": 1}', "rows.jsonl:2: no field 'text'"),
    ('{"text": "1", "label": "maybe"}', "rows.jsonl:2: label 'maybe' is not an integer index"),
    ('{"text": "1"}', "rows.jsonl:2: no label"),
    ("{oops", "rows.jsonl:2: invalid JSON"),
  ],
)
def test_bad_rows_are_one_line_errors_naming_file_and_line(tmp_path, line, message):
  path = tmp_path / "rows.jsonl"
  path.write_text('{"text": "1", "label": 0}\n' + line + "\n")
  fc = ft_config("classification").finetune
  with pytest.raises(errors.UserError) as err:
    fd.encode_records(fc, fd.read_file(str(path)), NumberTokenizer(), SP, 64, need_labels=True)
  assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
  "fields, message",
  [
    (dict(task="tagging"), "config.finetune.task='tagging' is invalid"),
    (dict(train_path=""), "config.finetune.train_path='' is invalid"),
    (dict(num_classes=1), "config.finetune.num_classes=1 is invalid"),
    (dict(task="multiple_choice", regression=True), "config.finetune.regression=True is invalid"),
    (dict(best_metric="f1", num_classes=3), "config.finetune.best_metric='f1' is invalid"),
    (dict(head_dropout=1.0), "config.finetune.head_dropout=1.0 is invalid"),
    (dict(task="dialogue", train_path="d.csv"), "config.finetune.train_path='d.csv' is invalid"),
    (dict(task="dialogue", train_path="d.jsonl", loss_turns="first"), "config.finetune.loss_turns='first'"),
  ],
)
def test_config_errors_name_the_dotted_field(fields, message):
  c = ft_config("classification")
  c.finetune.update(**fields)
  with pytest.raises(errors.ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
    config_lib.validate(c)


def test_metrics_accuracy_f1_pearson_spearman():
  fc = ft_config("classification").finetune
  out = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
  m = heads.metrics(fc, out, np.array([1, 0, 0, 1]))
  assert m["accuracy"] == 0.75 and m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1))
  fc = ft_config("similarity", regression=True).finetune
  pred, y = np.array([1.0, 2.0, 2.0, 9.0]), np.array([0.0, 1.0, 1.0, 2.0])
  m = heads.metrics(fc, pred[:, None], y)
  assert m["spearman"] == pytest.approx(1.0)  # Same order, ties included.
  assert m["pearson"] == pytest.approx(np.corrcoef(pred, y)[0, 1])
  assert m["mse"] == pytest.approx(np.mean((pred - y) ** 2))
  m = heads.metrics(fc, np.array([[3.0], [1.0], [2.0]]), np.array([1.0, 2.0, 3.0]))
  assert m["spearman"] == pytest.approx(-0.5)


# ------------------------------------------------------ heads and losses


def numpy_params(init_fn, seed):
  """Random params with init_fn's shapes, drawn by numpy: compiling random initialisers is slow on CPU."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(init_fn)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape).astype(np.float32)), shapes)


def small_model(task, **fields):
  c = ft_config(task, **fields)
  m = c.model.copy_and_resolve_references()
  m.vocab_size = 103
  params = numpy_params(lambda: heads.init_params(m, c.finetune, jax.random.key(0)), 0)
  return m, c.finetune, params


def jit_forward(m, fc):
  return jax.jit(
    lambda p, b, with_lm: heads.forward(
      m, fc, p, b, deterministic=True, rng=jax.random.key(0), with_lm=with_lm
    ),
    static_argnums=2,
  )


def batch_of(task, records, seq_len=16, **fields):
  enc = encode(task, records, **fields)
  arrays = fd.pack(enc, seq_len, max(len(r) for r in enc.seqs), fields.get("regression", False))
  return {k: jnp.asarray(v.astype(np.int32) if k == "tokens" else v) for k, v in arrays.items()}


def test_similarity_is_symmetric_in_its_two_inputs():
  m, fc, params = small_model("similarity")
  ab = batch_of("similarity", [{"text_a": "1 2 3", "text_b": "4 5"}, {"text_a": "7", "text_b": "8 9 10 11"}])
  ba = batch_of("similarity", [{"text_a": "4 5", "text_b": "1 2 3"}, {"text_a": "8 9 10 11", "text_b": "7"}])
  forward = jit_forward(m, fc)
  np.testing.assert_allclose(forward(params, ab, False)[0], forward(params, ba, False)[0], atol=1e-5)
  # The same two texts as an entailment pair are not symmetric: the check can fail.
  forward = jit_forward(m, ft_config("entailment").finetune)
  one = batch_of("entailment", [{"premise": "1 2 3", "hypothesis": "4 5"}])
  two = batch_of("entailment", [{"premise": "4 5", "hypothesis": "1 2 3"}])
  assert np.abs(forward(params, one, False)[0] - forward(params, two, False)[0]).max() > 1e-3


def reference_losses(m, task, params, batch):
  """(task loss, LM loss) of each example, from the GPT's own logits and hidden states, by hand."""
  tokens = np.asarray(batch["tokens"])
  B, C, T = tokens.shape
  apply = jax.jit(lambda p, t: model.GPT(m).apply({"params": p}, t, return_hidden=True))
  logits, hidden = apply(params["gpt"], jnp.asarray(tokens.reshape(B * C, T)))
  logp = np.asarray(jax.nn.log_softmax(logits, -1)).reshape(B, C, T, -1)
  hidden = np.asarray(hidden).reshape(B, C, T, -1)
  kernel, bias = np.asarray(params["head"]["kernel"]), np.asarray(params["head"]["bias"])
  task_losses, lm_losses = [], []
  for b in range(B):
    seqs = [c for c in range(C) if batch["lengths"][b, c] > 0]
    ends = [int(batch["lengths"][b, c]) - 1 for c in seqs]  # The extract token of each sequence.
    if task == "multiple_choice":
      out = np.array([hidden[b, c, e] @ kernel[:, 0] + bias[0] for c, e in zip(seqs, ends)])
    else:
      out = hidden[b, 0, ends[0]] @ kernel + bias
    label = int(batch["label"][b])
    task_losses.append(np.log(np.sum(np.exp(out - out.max()))) + out.max() - out[label])
    lm_losses.append(
      np.mean([-np.mean([logp[b, c, t, tokens[b, c, t + 1]] for t in range(e)]) for c, e in zip(seqs, ends)])
    )
  return np.array(task_losses), np.array(lm_losses)


@pytest.mark.parametrize("task", ["classification", "multiple_choice"])
def test_loss_is_task_loss_plus_lm_coef_times_lm_loss(task):
  rows = {
    "classification": [{"text": "1 2 3 4", "label": 1}, {"text": "5 6", "label": 0}],
    "multiple_choice": [{"context": "1 2", "choices": ["3", "4 5"], "label": 1}],
  }[task]
  m, fc, params = small_model(task)
  batch = batch_of(task, rows)
  batch["label"] = jnp.asarray([r["label"] for r in rows], jnp.int32)
  task_loss, lm = (float(np.mean(x)) for x in reference_losses(m, task, params, batch))
  for coef in (0.0, 0.5):
    with fc.unlocked():
      fc.lm_coef = coef
    loss_fn = jax.jit(heads.make_loss_fn(m, fc), static_argnums=3)
    loss_sum, weight, aux = loss_fn(params, batch, jax.random.key(0), True)
    assert float(weight) == len(rows)
    assert float(loss_sum / weight) == pytest.approx(task_loss + coef * lm, rel=1e-5)
    assert ("lm_loss" in aux) == (coef > 0)
  assert lm > 1.0 and task_loss > 0.01  # Neither term is negligible: the comparison above can fail.


def test_regression_head_uses_squared_error():
  m, fc, params = small_model("similarity", regression=True)
  batch = batch_of("similarity", [{"text_a": "1", "text_b": "2", "label": 2.5}], regression=True)
  batch["label"] = jnp.asarray([2.5], jnp.float32)
  with fc.unlocked():
    fc.lm_coef = 0.0
  out = jit_forward(m, fc)(params, batch, False)[0]
  assert out.shape == (1, 1)
  loss_sum, weight, _ = jax.jit(heads.make_loss_fn(m, fc), static_argnums=3)(
    params, batch, jax.random.key(0), True
  )
  assert float(loss_sum / weight) == pytest.approx(float((out[0, 0] - 2.5) ** 2), rel=1e-5)


def test_special_token_resize_keeps_pretrained_rows_and_draws_new_ones():
  c = debug.get_config()
  old_params = numpy_params(lambda: model.init_params(c.model, jax.random.key(1)), 1)
  m = c.model.copy_and_resolve_references()
  m.update(vocab_size=c.model.vocab_size + 3, init_std=0.5)
  resize = jax.jit(lambda p, k: heads.resize_embeddings(p, c.model.vocab_size, m, k))
  new = resize(old_params, jax.random.key(2))
  old_wte, wte = np.asarray(old_params["wte"]), np.asarray(new["wte"])
  assert wte.shape == (c.model.vocab_size + 3, c.model.d_model)
  np.testing.assert_array_equal(wte[: c.model.vocab_size], old_wte)
  rows = wte[c.model.vocab_size :]
  assert 0.3 < rows.std() < 0.7  # N(0, init_std), not zeros nor copies.
  rest = lambda p: jax.tree.leaves({k: v for k, v in p.items() if k != "wte"})
  assert all(np.array_equal(a, b) for a, b in zip(rest(new), rest(old_params), strict=True))
  # With a padded table, rows past the old vocabulary are redrawn too.
  m.vocab_pad_multiple = 64
  padded = jax.jit(lambda p, k: heads.resize_embeddings(p, c.model.vocab_size, m, k))(
    old_params, jax.random.key(2)
  )
  padded = padded["wte"]
  assert padded.shape[0] == 384 and np.array_equal(padded[: c.model.vocab_size], old_wte)


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
    pretrained, "entail", "entailment", train_rows, eval_rows, epochs=5.0, **MATCHING
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

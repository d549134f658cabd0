"""GPT-1 fine-tuning heads: symmetric similarity, L3 = L2 + lambda L1, regression, vocabulary growth
for the special tokens, and the validation metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_finetune_data import encode, ft_config

from configs import debug
from gpt_jax import finetune_data as fd
from gpt_jax import finetune_heads as heads
from gpt_jax import model


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


def test_outputs_and_best_metric_per_task():
  assert heads.num_outputs(ft_config("classification", num_classes=3).finetune) == 3
  assert heads.num_outputs(ft_config("entailment").finetune) == 2
  assert heads.num_outputs(ft_config("multiple_choice").finetune) == 1  # One score per choice.
  assert heads.num_outputs(ft_config("similarity", regression=True).finetune) == 1
  assert heads.best_metric_name(ft_config("classification").finetune) == "accuracy"
  assert heads.best_metric_name(ft_config("similarity", regression=True).finetune) == "pearson"
  assert heads.best_metric_name(ft_config("classification", best_metric="f1").finetune) == "f1"


def test_scores_come_back_in_example_order_without_padding():
  """eval_batches' layout: the outputs of every global batch, concatenated, cut to the examples."""
  arrays = {"tokens": np.arange(5 * 1 * 2).reshape(5, 1, 2), "lengths": np.full((5, 1), 2)}
  batches = fd.eval_batches(arrays, batch_size=4, process_index=0, process_count=1)
  first_token = lambda params, inputs: np.asarray(inputs["tokens"])[:, 0, :1] + params
  got = heads.score_batches(first_token, 100, batches, num_examples=5)
  np.testing.assert_array_equal(got[:, 0], [100, 102, 104, 106, 108])

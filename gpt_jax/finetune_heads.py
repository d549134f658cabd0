"""Fine-tuning heads (GPT-1 §3.2-3.3): the model side of gpt_jax/finetune.py.

The parameters are {"gpt": GPT params with the three special-token rows added
to wte, "head": a linear layer}; `forward` reads the final hidden state at
each sequence's extract token, `make_loss_fn` gives train.Task its
L3 = L2 + λ·L1, and `metrics` scores a validation split.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec

from gpt_jax import model, sharding

# ----------------------------------------------------------- parameters


def num_outputs(fc) -> int:
  """Width of the linear head: classes, or 1 (a regression score / one choice's score)."""
  if fc.task == "multiple_choice" or fc.regression:
    return 1
  return int(fc.num_classes)


def head_params(model_cfg, fc, rng) -> dict:
  """The linear head: kernel [D, O] ~ N(0, init_std), bias [O] = 0."""
  dtype = model.DTYPES[model_cfg.param_dtype]
  kernel_DO = jax.random.normal(rng, (model_cfg.d_model, num_outputs(fc)), dtype) * model_cfg.init_std
  return {"kernel": kernel_DO, "bias": jnp.zeros((num_outputs(fc),), dtype)}


def init_params(model_cfg, fc, rng):
  """{"gpt": GPT params, "head": head_params}, all randomly initialised."""
  k_gpt, k_head = jax.random.split(rng)
  return {"gpt": model.init_params(model_cfg, k_gpt), "head": head_params(model_cfg, fc, k_head)}


def param_specs(model_cfg):
  """Logical specs: the GPT's own (wte keeps ("vocab", "embed") as it grows); the head replicated."""
  return {"gpt": model.logical_specs(model_cfg), "head": {"kernel": PartitionSpec(), "bias": PartitionSpec()}}


def resize_embeddings(gpt_params, base_vocab: int, model_cfg, rng):
  """GPT params whose wte has the rows of model_cfg: rows < base_vocab copied, the others N(0, init_std)."""
  old_VD = gpt_params["wte"]
  rows = model.padded_vocab_size(model_cfg)
  fresh_VD = jax.random.normal(rng, (rows, old_VD.shape[1]), old_VD.dtype) * model_cfg.init_std
  return {**gpt_params, "wte": fresh_VD.at[:base_vocab].set(old_VD[:base_vocab])}


# ---------------------------------------------------------- forward, loss


def forward(model_cfg, fc, params, batch, *, deterministic: bool, rng, with_lm: bool):
  """(head outputs, per-example LM loss or None).

  Outputs: [B, classes] logits; [B, 1] regression scores; [B, C] choice
  logits (choices absent from an example at -1e9). Inputs: batch["tokens"]
  [B, C, T] (C = 1, 2 orders, or choices), batch["lengths"] [B, C].
  """
  tokens_BCT, lengths_BC = batch["tokens"], batch["lengths"]
  B, C, T = tokens_BCT.shape
  rng_model, rng_head = jax.random.split(rng)
  logits_NTV, hidden_NTD = model.GPT(model_cfg).apply(
    {"params": params["gpt"]},
    tokens_BCT.reshape(B * C, T),
    deterministic=deterministic,
    rngs={"dropout": rng_model},
    return_hidden=True,
  )
  # The extract token is the last real token of each sequence.
  extract_N = jnp.maximum(lengths_BC.reshape(B * C) - 1, 0)
  h_BCD = hidden_NTD[jnp.arange(B * C), extract_N].reshape(B, C, -1).astype(jnp.float32)
  valid_BC = lengths_BC > 0
  if fc.task == "similarity":
    h_BCD = h_BCD.sum(axis=1, keepdims=True)  # §3.3: the two orders' states added elementwise.
  if not deterministic and fc.head_dropout > 0:
    keep = jax.random.bernoulli(rng_head, 1.0 - fc.head_dropout, h_BCD.shape)
    h_BCD = jnp.where(keep, h_BCD / (1.0 - fc.head_dropout), 0.0)
  kernel_DO = params["head"]["kernel"].astype(jnp.float32)
  out_BCO = (
    jnp.einsum("BCD,DO->BCO", h_BCD, kernel_DO) + params["head"]["bias"].astype(jnp.float32)[None, None]
  )
  if fc.task == "multiple_choice":
    out = jnp.where(valid_BC, out_BCO[:, :, 0], -1e9)
  else:
    out = out_BCO[:, 0]
  if not with_lm:
    return out, None
  # L1 (§3.2): next-token loss over each sequence's real tokens.
  nll_NT = optax.softmax_cross_entropy_with_integer_labels(
    logits_NTV[:, :-1], tokens_BCT.reshape(B * C, T)[:, 1:]
  ).reshape(B, C, T - 1)
  mask_BCT = jnp.arange(T - 1)[None, None, :] < (lengths_BC - 1)[:, :, None]
  per_seq_BC = (nll_NT * mask_BCT).sum(-1) / jnp.maximum(mask_BCT.sum(-1), 1)
  lm_B = (per_seq_BC * valid_BC).sum(-1) / jnp.maximum(valid_BC.sum(-1), 1)
  return out, lm_B


def task_loss(fc, out, label_B):
  """(L2 per example, 1.0 where the prediction is right / 0.0; None for regression)."""
  if fc.regression:
    return jnp.square(out[:, 0] - label_B), None
  loss_B = optax.softmax_cross_entropy_with_integer_labels(out, label_B)
  return loss_B, (jnp.argmax(out, axis=-1) == label_B).astype(jnp.float32)


def make_loss_fn(model_cfg, fc):
  """train.Task.loss_fn: sums over examples of L3 = L2 + λ·L1, weight = examples."""
  lm_coef = float(fc.lm_coef)

  def loss_fn(params, batch, rng, deterministic):
    out, lm_B = forward(
      model_cfg, fc, params, batch, deterministic=deterministic, rng=rng, with_lm=lm_coef > 0
    )
    clf_B, correct_B = task_loss(fc, out, batch["label"])
    w_B = batch.get("weight", jnp.ones(clf_B.shape, jnp.float32))
    total_B = clf_B if lm_B is None else clf_B + lm_coef * lm_B
    aux = {"task_loss": (clf_B * w_B).sum()}
    if lm_B is not None:
      aux["lm_loss"] = (lm_B * w_B).sum()
    if correct_B is not None:
      aux["accuracy"] = (correct_B * w_B).sum()
    return (total_B * w_B).sum(), w_B.sum(), aux

  return loss_fn


# --------------------------------------------------------------- metrics


def _ranks(x):
  """Ranks 1..n with ties given their average rank (for Spearman's rho)."""
  order = np.argsort(x, kind="stable")
  ranks = np.empty(len(x), np.float64)
  sorted_x = x[order]
  i = 0
  while i < len(x):
    j = i
    while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
      j += 1
    ranks[order[i : j + 1]] = (i + j) / 2 + 1
    i = j + 1
  return ranks


def _pearson(a, b) -> float:
  a, b = a - a.mean(), b - b.mean()
  den = math.sqrt(float((a * a).sum() * (b * b).sum()))
  return float((a * b).sum() / den) if den > 0 else 0.0


def metrics(fc, out, labels) -> dict:
  """Validation metrics from head outputs [N, ...] and labels [N] (numpy)."""
  out = np.asarray(out, np.float64)
  if fc.regression:
    pred, y = out[:, 0], np.asarray(labels, np.float64)
    return {
      "mse": float(np.mean((pred - y) ** 2)),
      "pearson": _pearson(pred, y),
      "spearman": _pearson(_ranks(pred), _ranks(y)),
    }
  y = np.asarray(labels, np.int64)
  logp = out - out.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  pred = out.argmax(-1)
  result = {"accuracy": float(np.mean(pred == y)), "loss": float(-np.mean(logp[np.arange(len(y)), y]))}
  if fc.task != "multiple_choice" and out.shape[-1] == 2:
    tp = int(np.sum((pred == 1) & (y == 1)))
    wrong = int(np.sum(pred != y))
    result["f1"] = 2 * tp / (2 * tp + wrong) if tp + wrong else 0.0
  return result


def best_metric_name(fc) -> str:
  return fc.best_metric or ("pearson" if fc.regression else "accuracy")


def scores_program(model_cfg, fc, mesh=None):
  """jit(params, batch) -> head outputs (replicated on the mesh, if any)."""

  def fn(params, batch):
    return forward(model_cfg, fc, params, batch, deterministic=True, rng=jax.random.key(0), with_lm=False)[0]

  if mesh is None:
    return jax.jit(fn)
  return jax.jit(fn, out_shardings=sharding.replicated(mesh))


def score_batches(program, params, batches, num_examples: int, mesh=None) -> np.ndarray:
  """Head outputs of the first num_examples rows of `batches` (finetune_data.eval_batches layout).

  Global batch b holds examples [b * E, (b + 1) * E) with process p's rows in
  its p-th slice, so the replicated outputs concatenate in example order.
  """
  outs = []
  for b in batches:
    inputs = {k: v for k, v in b.items() if k in ("tokens", "lengths")}
    inputs = sharding.global_batch(inputs, mesh) if mesh is not None else inputs
    outs.append(np.asarray(program(params, inputs)))
  return np.concatenate(outs)[:num_examples]

"""The chunked cross-entropy over the tied head (gpt_jax/loss.py) against the plain loss."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gpt_jax import loss, model, pretrain, sharding

B, T, D, VOCAB, ROWS = 4, 37, 16, 50, 64  # 14 padded embedding rows (model.vocab_pad_multiple).


def _inputs(dtype=jnp.float32):
  r = np.random.default_rng(0)
  h_BTD = jnp.asarray(r.normal(size=(B, T, D)), dtype)
  wte_VD = jnp.asarray(r.normal(size=(ROWS, D)) * 0.5, jnp.float32)  # Parameters stay float32.
  labels_BT = jnp.asarray(r.integers(0, VOCAB, size=(B, T)), jnp.int32)
  mask_BT = jnp.asarray(r.random((B, T)) < 0.8, jnp.float32)
  return h_BTD, wte_VD, labels_BT, mask_BT


def plain(h_BTD, wte_VD, labels_BT, mask_BT):
  """What pretrain.lm_loss_fn computes: full float32 logits cut to the vocabulary, optax's loss."""
  logits_BTV = jnp.einsum(
    "BTD,VD->BTV", h_BTD, wte_VD.astype(h_BTD.dtype), preferred_element_type=jnp.float32
  )
  nll_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV[..., :VOCAB], labels_BT)
  return (nll_BT * mask_BT).sum()


def chunked(h_BTD, wte_VD, labels_BT, mask_BT, chunk=8):
  return loss.chunked_cross_entropy(h_BTD, wte_VD, labels_BT, mask_BT, chunk=chunk, vocab_size=VOCAB)


@pytest.mark.parametrize("chunk", [8, 37, 64])  # Padded last chunk, one chunk, a chunk longer than T.
def test_equals_the_plain_loss_and_gradients_in_float32(chunk):
  args = _inputs()
  value, grads = jax.value_and_grad(lambda h, w: chunked(h, w, *args[2:], chunk=chunk), argnums=(0, 1))(
    *args[:2]
  )
  want, want_grads = jax.value_and_grad(plain, argnums=(0, 1))(*args)
  np.testing.assert_allclose(value, want, rtol=1e-6)
  for g, w in zip(grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(jnp.abs(w).max()))
  # Padded rows are outside the softmax: no gradient reaches them.
  assert not np.any(np.asarray(grads[1][VOCAB:]))


def test_bfloat16_compute_matches_the_plain_bfloat16_loss():
  args = _inputs(jnp.bfloat16)
  value, grads = jax.value_and_grad(chunked, argnums=(0, 1))(*args)
  want, want_grads = jax.value_and_grad(plain, argnums=(0, 1))(*args)
  # Same bfloat16 products accumulated in float32: equal but for summation order.
  np.testing.assert_allclose(value, want, rtol=1e-6)
  assert grads[0].dtype == jnp.bfloat16 and grads[1].dtype == jnp.float32
  # The gradients pass through bfloat16 matmuls and are rounded at other points (per chunk, and
  # the softmax and label terms apart): as close to the float32 truth as the plain loss's are.
  f32 = [args[0].astype(jnp.float32), args[1].astype(jnp.bfloat16).astype(jnp.float32), *args[2:]]
  truths = jax.grad(plain, argnums=(0, 1))(*f32)
  for g, w, truth in zip(grads, want_grads, truths):
    error = lambda g, truth=truth: float(jnp.abs(g.astype(jnp.float32) - truth).max())
    assert error(g) <= 2 * error(w) and error(g) < 2**-7 * float(jnp.abs(truth).max())


def _shapes(jaxpr) -> set:
  """Shapes of every value in a jaxpr and the jaxprs it holds (scan bodies, remat)."""
  out = set()
  for eqn in jaxpr.eqns:
    out |= {tuple(v.aval.shape) for v in eqn.outvars}
    for p in eqn.params.values():
      for sub in p if isinstance(p, (list, tuple)) else [p]:
        sub = getattr(sub, "jaxpr", sub)  # A ClosedJaxpr holds a Jaxpr.
        if hasattr(sub, "eqns"):
          out |= _shapes(sub)
  return out


def test_no_full_logits_exist_forward_or_backward():
  args = _inputs()
  grad_fn = jax.grad(lambda h, w: chunked(h, w, *args[2:]), argnums=(0, 1))
  shapes = _shapes(jax.make_jaxpr(grad_fn)(*args[:2]).jaxpr)
  assert (B, 8, ROWS) in shapes  # One chunk's logits.
  # Nothing vocab-wide as large as all the logits: neither [B, T, V] nor stacked chunk residuals.
  vocab_wide = [s for s in shapes if ROWS in s or VOCAB in s]
  assert all(np.prod(s) < B * T * VOCAB for s in vocab_wide), sorted(vocab_wide)
  # The plain loss, by the same test, does hold them.
  assert (B, T, ROWS) in _shapes(jax.make_jaxpr(jax.grad(plain, argnums=(0, 1)))(*args).jaxpr)


def test_sharded_over_batch_and_vocab():
  args = _inputs()
  mesh = jax.make_mesh((2, 2, 2), sharding.AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  rules = (("batch", ("data", "fsdp")), ("length", None), ("act_vocab", "tensor"))
  spec = lambda *axes: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*axes))
  placed = jax.device_put(
    args, (spec(("data", "fsdp")), spec("tensor"), spec(("data", "fsdp")), spec(("data", "fsdp")))
  )
  with sharding.activate(mesh, rules):
    value = jax.jit(chunked)(*placed)
    hlo = jax.jit(chunked).lower(*placed).as_text()
  assert "act_vocab" not in hlo and "sharding" in hlo
  np.testing.assert_allclose(value, plain(*args), rtol=1e-6)
  assert nn.logical_to_mesh_axes(loss.LOGITS_AXES, rules) == jax.sharding.PartitionSpec(
    ("data", "fsdp"), None, "tensor"
  )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lm_loss_with_loss_chunk_equals_the_plain_lm_loss(debug_config, dtype):
  m = debug_config.model
  m.update(vocab_pad_multiple=128, dtype=dtype, scan_layers=True)  # 320 -> 384 rows.
  params = model.init_params(m, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (4, m.block_size + 1), 0, m.vocab_size)
  batch = {"tokens": tokens, "mask": (jnp.arange(m.block_size) < 27).astype(jnp.float32)[None].repeat(4, 0)}
  plain_fn = pretrain.lm_loss_fn(m)
  m.loss_chunk = 12  # 32 positions: chunks of 12, 12 and 8 (padded).
  chunked_fn = pretrain.lm_loss_fn(m)
  value_and_grad = lambda f: jax.value_and_grad(lambda p: f(p, batch, jax.random.key(2), True)[0])(params)
  (value, grads), (want, want_grads) = value_and_grad(chunked_fn), value_and_grad(plain_fn)
  assert chunked_fn(params, batch, jax.random.key(2), True)[1] == 4 * 27
  np.testing.assert_allclose(value, want, rtol=1e-6)
  tol = 1e-5 if dtype == "float32" else 2e-2  # bfloat16: rounded at other points (see above).
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    w = dict(jax.tree_util.tree_leaves_with_path(want_grads))[path]
    np.testing.assert_allclose(g, w, rtol=tol, atol=tol * float(jnp.abs(w).max()), err_msg=str(path))
  # The hidden states the chunked loss reads are those return_hidden gives beside the logits.
  h = model.GPT(m).apply({"params": params}, tokens[:, :-1], lm_head=False)
  np.testing.assert_array_equal(
    h, model.GPT(m).apply({"params": params}, tokens[:, :-1], return_hidden=True)[1]
  )

"""Properties of gpt_jax/model.py on the tiny configs/debug.py model (L=2, D=32, H=4, T=32, window 8).

Parameters are randomised well away from their init (LayerNorm gains and
biases included) so that a swapped or ignored tensor changes the logits.
Everything is jitted: eager Flax dispatch compiles every small op and costs
far more on this CPU than one compilation.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy.special import erf

from gpt_jax import layout, model, model_config
from gpt_jax.errors import ConfigError


def _cfg(config, **changes) -> ml_collections.ConfigDict:
  """A copy of a full config's model section (or of a model config) with `changes`."""
  if isinstance(config, model_config.ModelConfig):
    config = config.to_dict()
  elif "model" in config:
    config = config.model.to_dict()
  m = ml_collections.ConfigDict(dict(config.items()) if hasattr(config, "items") else config)
  m.update(**changes)
  return m


def _unchecked(m, **fields) -> model_config.ModelConfig:
  """`m` with `fields` set past ModelConfig's validation: attention_impl="cudnn" in float32,
  which cuDNN refuses but jax's XLA stand-in for it (and the decoding einsums) run exactly."""
  m = model_config.of(m)
  for k, v in fields.items():
    object.__setattr__(m, k, v)
  return m


def _random_params(m, seed=0, std=0.2):
  """Random params of config `m` from shapes alone (no init compile); gains around 1."""
  rng = np.random.default_rng(seed)
  shapes = nn.unbox(model.abstract_params(m))

  def draw(path, s):
    x = std * rng.standard_normal(s.shape)
    if jax.tree_util.keystr(path).endswith("['scale']"):
      x = 1.0 + x
    return jnp.asarray(x, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


_FORWARD_FNS = {}


def _forward(m, params, tokens_BT):
  """(logits, hidden) of a jitted full forward; one compilation per distinct config in the session."""
  key = m = model_config.of(m)  # Frozen: later edits of a test's ConfigDict cannot leak in.
  if key not in _FORWARD_FNS:
    _FORWARD_FNS[key] = jax.jit(lambda p, t: model.GPT(m).apply({"params": p}, t, return_hidden=True))
  return _FORWARD_FNS[key](params, tokens_BT)


def _logits(m, params, tokens_BT):
  return _forward(m, params, tokens_BT)[0]


def _tokens(m, batch=2, length=None, seed=0):
  return jnp.asarray(
    np.random.default_rng(seed).integers(0, m.vocab_size, (batch, length or m.block_size)), jnp.int32
  )


# ---------------------------------------------------------------- reference


def _reference_logits(m, params, tokens_BT):
  """A float64 NumPy GPT written from the papers, independent of model.py's code.

  GPT-1 (post-LN): x = LN(x + attn(x)); x = LN(x + mlp(x)). GPT-2 (pre-LN):
  x = x + attn(LN(x)); x = x + mlp(LN(x)); final LN. A local layer's query t
  sees keys t - window < s <= t; tied output embedding.
  """
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), layout.unstack_blocks(params))
  tokens_BT = np.asarray(tokens_BT)
  T = tokens_BT.shape[1]
  K = m.d_model // m.num_heads

  def ln(x, q):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + m.layer_norm_epsilon) * q["ln"]["scale"] + q["ln"]["bias"]

  def gelu(x):
    if m.activation == "gelu":
      return 0.5 * x * (1 + erf(x / np.sqrt(2)))
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

  def attn(x, a, window):
    qkv = np.einsum("btd,dchk->cbthk", x, a["c_attn"]["kernel"]) + a["c_attn"]["bias"][:, None, None]
    scores = np.einsum("bthk,bshk->bhts", qkv[0], qkv[1]) / np.sqrt(K)
    t, s = np.arange(T)[:, None], np.arange(T)[None, :]
    visible = (s <= t) & (t - s < (window or T + 1))
    scores = np.where(visible, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bhts,bshk->bthk", probs, qkv[2])
    return np.einsum("bthk,hkd->btd", out, a["c_proj"]["kernel"]) + a["c_proj"]["bias"]

  def mlp(x, f):
    h = gelu(x @ f["c_fc"]["kernel"] + f["c_fc"]["bias"])
    return h @ f["c_proj"]["kernel"] + f["c_proj"]["bias"]

  x = p["wte"][tokens_BT] + p["wpe"][:T]
  for i, window in enumerate(model.layer_windows(m)):
    b = p[f"block_{i}"]
    if m.norm_position == "pre":
      x = x + attn(ln(x, b["ln_1"]), b["attn"], window)
      x = x + mlp(ln(x, b["ln_2"]), b["mlp"])
    else:
      x = ln(x + attn(x, b["attn"], window), b["ln_1"])
      x = ln(x + mlp(x, b["mlp"]), b["ln_2"])
  if m.norm_position == "pre":
    x = ln(x, p["ln_f"])
  return x @ p["wte"][: m.vocab_size].T


@pytest.mark.parametrize(
  "changes",
  [
    {},
    {"norm_position": "post", "scale_residual_init": False, "activation": "gelu"},
    {"attention_pattern": ("dense", "local"), "scan_layers": True},
  ],
  ids=["gpt2", "gpt1_post_ln", "gpt3_local_scan"],
)
def test_matches_numpy_reference(debug_config, changes):
  m = _cfg(debug_config, **changes)
  params = _random_params(m)
  tokens_BT = _tokens(m)
  ref = _reference_logits(m, params, tokens_BT)
  got = _logits(m, params, tokens_BT)
  assert got.dtype == jnp.float32 and got.shape == (2, m.block_size, m.vocab_size)
  np.testing.assert_allclose(np.asarray(got), ref, atol=2e-4 * np.abs(ref).max())
  assert np.abs(ref).max() > 1.0


def test_post_ln_and_pre_ln_structure(debug_config):
  pre = nn.unbox(model.abstract_params(_cfg(debug_config)))
  post = nn.unbox(model.abstract_params(_cfg(debug_config, norm_position="post")))
  assert "ln_f" in pre and "ln_f" not in post
  assert set(pre) - {"ln_f"} == set(post) == {"wte", "wpe", "block_0", "block_1"}
  assert set(post["block_0"]) == set(pre["block_0"]) == {"ln_1", "attn", "ln_2", "mlp"}


# --------------------------------------------------------------- causality


def _input_jacobian_norms(m, params, tokens_BT):
  """|d logits[0, t] . r / d wpe[s]| as a [T, S] matrix.

  Each position s reads only row s of the position table, so its gradient is
  the gradient with respect to the input embedding at position s.
  """
  r_V = jnp.asarray(np.random.default_rng(1).standard_normal(m.vocab_size), jnp.float32)

  def f(wpe_PD):
    logits_BTV = model.GPT(m).apply({"params": {**params, "wpe": wpe_PD}}, tokens_BT)
    return logits_BTV[0] @ r_V

  jac_TPD = jax.jit(jax.jacrev(f))(params["wpe"])
  return np.abs(np.asarray(jac_TPD)).sum(-1)


def test_causality_by_gradients_dense_and_local_window(debug_config):
  # One local layer: position t sees exactly t - window < s <= t (itself included), nothing later.
  m = _cfg(debug_config, attention_pattern=("local",), num_layers=1)
  T, window = m.block_size, m.local_window
  t, s = np.arange(T)[:, None], np.arange(T)[None, :]
  expected = (s <= t) & (t - s < window)
  norms_TS = _input_jacobian_norms(m, _random_params(m), _tokens(m))
  assert np.all(norms_TS[~expected] == 0.0)
  assert np.all(norms_TS[expected] > 0.0)
  # Dense layers (the debug model's 2): every earlier position matters, no later one.
  m = _cfg(debug_config, attention_pattern=("dense",))
  norms_TS = _input_jacobian_norms(m, _random_params(m), _tokens(m))
  assert np.all(norms_TS[s > t] == 0.0) and np.all(norms_TS[s <= t] > 0.0)


@pytest.mark.parametrize("pattern", [("dense",), ("dense", "local")])
def test_causality_by_changing_later_tokens(debug_config, pattern):
  m = _cfg(debug_config, attention_pattern=pattern)
  params = _random_params(m)
  tokens_BT = _tokens(m)
  base_BTV = np.asarray(_logits(m, params, tokens_BT))
  cut = 13
  changed_BT = tokens_BT.at[:, cut:].set((tokens_BT[:, cut:] + 1) % m.vocab_size)
  other_BTV = np.asarray(_logits(m, params, changed_BT))
  np.testing.assert_array_equal(other_BTV[:, :cut], base_BTV[:, :cut])
  assert np.all(np.abs(other_BTV[:, cut:] - base_BTV[:, cut:]).max(-1) > 0)


# ------------------------------------------------------- document masking


def _segment_jacobian_norms(m, params, tokens_BT, segment_BT):
  """|d logits[0, t] . r / d wpe[s]| [T, S] with segment ids (see _input_jacobian_norms)."""
  r_V = jnp.asarray(np.random.default_rng(1).standard_normal(m.vocab_size), jnp.float32)

  def f(wpe_PD):
    logits_BTV = model.GPT(m).apply(
      {"params": {**params, "wpe": wpe_PD}}, tokens_BT, segment_ids_BT=segment_BT
    )
    return logits_BTV[0] @ r_V

  return np.abs(np.asarray(jax.jit(jax.jacrev(f))(params["wpe"]))).sum(-1)


@pytest.mark.parametrize(
  "changes",
  [
    {"attention_pattern": ("dense", "local")},
    {"attention_pattern": ("dense", "local"), "attention_impl": "dot_product_attention"},
    {"attention_pattern": ("dense",), "attention_impl": "dot_product_attention", "scan_layers": True},
  ],
  ids=["einsum_dense_local", "dot_product_attention", "dot_product_attention_scan"],
)
def test_no_attention_crosses_a_segment_boundary(debug_config, changes):
  m = _cfg(debug_config, **changes)
  T = m.block_size
  cuts = [5, 6, 19]  # segments [0, 5), [5, 6) (one token), [6, 19), [19, T)
  segment_T = np.searchsorted(cuts, np.arange(T), side="right")
  segment_BT = jnp.asarray(np.stack([segment_T, np.zeros(T, int)]), jnp.int32)
  norms_TS = _segment_jacobian_norms(m, _random_params(m), _tokens(m), segment_BT)
  t, s = np.arange(T)[:, None], np.arange(T)[None, :]
  same = segment_T[:, None] == segment_T[None, :]
  # Two layers, one dense: every earlier position of its own segment reaches t, nothing else.
  expected = (s <= t) & same
  assert np.all(norms_TS[~expected] == 0.0)
  assert np.all(norms_TS[expected] > 0.0)


def test_cudnn_with_segments_takes_the_einsums(debug_config, monkeypatch):
  """jax's public cuDNN call has no packed segments: masking must not reach it, and must match the einsums."""
  m = _cfg(debug_config)
  params, tokens_BT = _random_params(m), _tokens(m)
  segment_BT = jnp.asarray(np.repeat([[0, 1, 2, 3]], 2, 0).repeat(m.block_size // 4, 1), jnp.int32)

  def refuse(*args, **kwargs):
    raise AssertionError("dot_product_attention called with segments")

  monkeypatch.setattr(jax.nn, "dot_product_attention", refuse)
  cudnn = _unchecked(m, attention_impl="cudnn")
  forward = lambda cfg: jax.jit(lambda p, t, g: model.GPT(cfg).apply({"params": p}, t, segment_ids_BT=g))
  got = forward(cudnn)(params, tokens_BT, segment_BT)
  np.testing.assert_allclose(got, forward(m)(params, tokens_BT, segment_BT), rtol=1e-6, atol=1e-6)
  # Each quarter is then exactly the model run on that quarter alone.
  q = m.block_size // 4
  alone = forward(m)(params, tokens_BT[:, q : 2 * q], jnp.zeros((2, q), jnp.int32))
  positions = jnp.broadcast_to(jnp.arange(q, 2 * q), (2, q))
  shifted = jax.jit(lambda p, t: model.GPT(m).apply({"params": p}, t, positions_BT=positions))(
    params, tokens_BT[:, q : 2 * q]
  )
  np.testing.assert_allclose(got[:, q : 2 * q], shifted, rtol=1e-5, atol=1e-5)
  assert not np.allclose(alone, shifted)  # positions matter: the piece keeps its window positions


# ------------------------------------------------- equivalent computations


def _loss_and_grads(m, params, tokens_BT):
  def loss(p):
    logits_BTV = model.GPT(m).apply({"params": p}, tokens_BT[:, :-1])
    logp_BTV = jax.nn.log_softmax(logits_BTV)
    return -jnp.take_along_axis(logp_BTV, tokens_BT[:, 1:, None], axis=-1).mean()

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  return float(value), grads


def test_remat_matches_no_remat(debug_config):
  m = _cfg(debug_config, attention_pattern=("dense", "local"))
  params = _random_params(m)
  tokens_BT = _tokens(m)
  want_loss, want_grads = _loss_and_grads(m, params, tokens_BT)
  # Remat inside nn.scan (prevent_cse=False there) is what the large rungs run: check that pairing too.
  remats = [{"remat": "full"}, {"remat": "dots_saveable", "scan_layers": True}]
  remats += [{"remat": "attention_saveable", "scan_layers": True}, {"remat": "dots_offloaded"}]
  for changes in remats:
    got_params = layout.stack_blocks(params, m.num_layers) if changes.get("scan_layers") else params
    got_loss, got_grads = _loss_and_grads(_cfg(m, **changes), got_params, tokens_BT)
    assert got_loss == pytest.approx(want_loss, rel=1e-6), changes
    got_grads = layout.unstack_blocks(got_grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got_grads, want_grads)


@pytest.mark.parametrize("pattern", [("dense",), ("dense", "local")])
def test_scan_matches_unrolled(debug_config, pattern):
  m = _cfg(debug_config, attention_pattern=pattern)
  params = _random_params(m)
  tokens_BT = _tokens(m)
  scanned = _cfg(m, scan_layers=True)
  stacked = layout.stack_blocks(params, m.num_layers)
  want_shapes = jax.tree.map(lambda s: s.shape, nn.unbox(model.abstract_params(scanned)))
  assert jax.tree.map(lambda x: x.shape, stacked) == want_shapes
  np.testing.assert_allclose(
    _logits(scanned, stacked, tokens_BT), _logits(m, params, tokens_BT), rtol=1e-5, atol=1e-5
  )


def test_dot_product_attention_matches_xla(debug_config):
  # Unrolled dense + local: layer 0 takes dot_product_attention's is_causal path, layer 1 its mask path.
  m = _cfg(debug_config, attention_pattern=("dense", "local"))
  params = _random_params(m)
  tokens_BT = _tokens(m)
  dpa = _cfg(m, attention_impl="dot_product_attention")
  np.testing.assert_allclose(
    _logits(dpa, params, tokens_BT), _logits(m, params, tokens_BT), rtol=1e-5, atol=1e-5
  )


@pytest.mark.parametrize(
  "changes, windows",
  [
    ({"attention_pattern": ("dense", "local")}, {None, 7}),  # Unrolled: dense, then banded.
    ({"attention_pattern": ("local",), "scan_layers": True}, {7}),  # Scanned, one static window.
    ({"attention_pattern": ("dense", "local"), "scan_layers": True}, set()),  # Traced windows: einsums.
  ],
  ids=["unrolled_dense_local", "scan_local", "scan_mixed_falls_back"],
)
def test_cudnn_attention_is_called_as_the_masks_say(debug_config, monkeypatch, changes, windows):
  """attention_impl="cudnn" with jax's XLA kernel in place of cuDNN's (no GPU here): the causal
  flag and the band (window 8 keys = 7 to the left) must reproduce the einsum model's logits."""
  m = _cfg(debug_config, **changes)
  params = _random_params(m)
  tokens_BT = _tokens(m)
  calls, real = [], jax.nn.dot_product_attention

  def recording(*args, **kwargs):
    assert kwargs["is_causal"] and kwargs["implementation"] == "xla"
    left = kwargs["local_window_size"]
    calls.append(None if left is None else left[0])
    assert left is None or left[1] == 0
    return real(*args, **kwargs)

  monkeypatch.setattr(model, "CUDNN_IMPLEMENTATION", "xla")
  monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
  cudnn = _unchecked(m, attention_impl="cudnn")
  got = jax.jit(lambda p, t: model.GPT(cudnn).apply({"params": p}, t))(params, tokens_BT)
  assert set(calls) == windows  # (nn.scan may trace its body more than once.)
  np.testing.assert_allclose(got, _logits(m, params, tokens_BT), rtol=1e-5, atol=1e-5)


def test_cudnn_attention_without_a_gpu_is_a_config_error(debug_config):
  m = _cfg(debug_config, attention_impl="cudnn", dtype="bfloat16")
  params = model.abstract_params(m)  # Initialisation traces einsums: it needs no cuDNN.
  assert params["wte"].value.shape == (m.vocab_size, m.d_model)
  with pytest.raises(ConfigError, match=r"attention_impl='cudnn' needs an NVIDIA GPU"):
    jax.eval_shape(lambda p, t: model.GPT(m).apply({"params": p}, t), nn.unbox(params), _tokens(m))


def test_bfloat16_compute_is_close_to_float32(debug_config):
  m = _cfg(debug_config)
  params = _random_params(m, std=0.1)
  tokens_BT = _tokens(m)
  want = np.asarray(_logits(m, params, tokens_BT))
  got = _logits(_cfg(m, dtype="bfloat16"), params, tokens_BT)
  assert got.dtype == jnp.float32  # Logits accumulate in float32 whatever the compute dtype.
  err = np.abs(np.asarray(got) - want)
  # bfloat16 keeps 8 significant bits (~0.4% per rounding); a few roundings per layer.
  assert err.max() < 0.05 * np.abs(want).max() and err.mean() < 0.01 * np.abs(want).mean()
  assert err.max() > 0  # The compute dtype is really bfloat16.


def test_vocab_padding_pads_the_table_not_the_logits(debug_config):
  m = _cfg(debug_config)
  padded = _cfg(m, vocab_pad_multiple=128)
  assert model.padded_vocab_size(padded) == 384
  params = _random_params(padded)
  assert params["wte"].shape == (384, 32)
  tokens_BT = _tokens(m)
  got = _logits(padded, params, tokens_BT)
  assert got.shape == (2, 32, 320)
  # The 64 padding rows never reach the logits: the same model without them agrees.
  unpadded = {**params, "wte": params["wte"][:320]}
  np.testing.assert_allclose(got, _logits(m, unpadded, tokens_BT), rtol=1e-6, atol=1e-6)


def test_return_hidden_gives_the_states_the_tied_head_reads(debug_config):
  m = _cfg(debug_config)
  params = _random_params(m)
  tokens_BT = _tokens(m)
  logits_BTV, hidden_BTD = _forward(m, params, tokens_BT)
  assert hidden_BTD.shape == (2, 32, 32)
  np.testing.assert_allclose(logits_BTV, hidden_BTD @ params["wte"].T, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------- dropout


def test_dropout(debug_config):
  m = _cfg(debug_config, embd_dropout=0.1, attn_dropout=0.1, resid_dropout=0.1)
  params = _random_params(m)
  tokens_BT = _tokens(m)

  @jax.jit
  def train_logits(key):
    return model.GPT(m).apply({"params": params}, tokens_BT, deterministic=False, rngs={"dropout": key})

  off = np.asarray(_logits(m, params, tokens_BT))
  # Dropout off: identical to a model without dropout.
  np.testing.assert_array_equal(off, _logits(_cfg(debug_config), params, tokens_BT))
  # Dropout on: a function of the rng only.
  a, b = np.asarray(train_logits(jax.random.key(1))), np.asarray(train_logits(jax.random.key(2)))
  np.testing.assert_array_equal(a, train_logits(jax.random.key(1)))
  assert np.abs(a - b).mean() > 0.01 * np.abs(off).mean()
  assert np.abs(a - off).mean() > 0.01 * np.abs(off).mean()


# -------------------------------------------------------------------- init


@pytest.mark.parametrize("scale_residual_init", [True, False])
def test_init_distribution(debug_config, scale_residual_init):
  # Wide enough that each matrix has >= 65k samples: the sample std is within ~1% of the true one.
  m = _cfg(
    debug_config,
    d_model=256,
    num_heads=4,
    num_layers=4,
    vocab_size=256,
    block_size=256,
    scale_residual_init=scale_residual_init,
    scan_layers=True,
  )
  # An "rbg" key compiles in half the time of the default threefry; the distributions are the same.
  params = jax.jit(functools.partial(model.init_params, m))(jax.random.key(0, impl="rbg"))
  blocks = params["blocks"]
  # GPT-2 §2.3: residual output projections scaled by 1/sqrt(N), N = 2 per block.
  resid_std = 0.02 / np.sqrt(2 * 4) if scale_residual_init else 0.02
  for name, x, std in (
    ("wte", params["wte"], 0.02),
    ("wpe", params["wpe"], 0.02),
    ("attn.c_attn", blocks["attn"]["c_attn"]["kernel"], 0.02),
    ("mlp.c_fc", blocks["mlp"]["c_fc"]["kernel"], 0.02),
    ("attn.c_proj", blocks["attn"]["c_proj"]["kernel"], resid_std),
    ("mlp.c_proj", blocks["mlp"]["c_proj"]["kernel"], resid_std),
  ):
    x = np.asarray(x)
    assert abs(x.std() / std - 1) < 0.02, (name, x.std(), std)
    assert abs(x.mean()) < 0.02 * std, name
  # Layers of the scan get different draws.
  assert not np.allclose(blocks["mlp"]["c_fc"]["kernel"][0], blocks["mlp"]["c_fc"]["kernel"][1])
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    key = jax.tree_util.keystr(path)
    if key.endswith("['bias']"):
      assert np.all(np.asarray(x) == 0), key
    elif key.endswith("['scale']"):
      assert np.all(np.asarray(x) == 1), key


# ---------------------------------------------------------------- KV cache


@pytest.mark.parametrize(
  "changes",
  [{}, {"scan_layers": True, "attention_impl": "dot_product_attention"}, {"attention_impl": "cudnn"}],
  ids=["unrolled_xla", "scan_dot_product_attention", "cudnn_decodes_with_einsums"],
)
def test_kv_cache_decode_matches_full_forward(debug_config, changes):
  """A 3-token prefill, a 3-token chunk, then single tokens; row 1 is left-padded by 3 slots.

  Layers alternate dense / local (window 8 < 32 slots), so the band is
  exercised in the cache too. Row 1's reference is its unpadded sequence.
  """
  unchecked = {k: v for k, v in changes.items() if v == "cudnn"}
  m = _cfg(
    debug_config,
    attention_pattern=("dense", "local"),
    **{k: changes[k] for k in changes if k not in unchecked},
  )
  m = _unchecked(m, **unchecked)
  params = _random_params(m)
  S, pad = m.block_size, 3
  seq_BS = np.asarray(_tokens(m, length=S))
  pad_B = np.array([0, pad])
  padded_BS = seq_BS.copy()
  padded_BS[1] = np.concatenate([np.zeros(pad, np.int32), seq_BS[1, : S - pad]])
  slots_BS = np.broadcast_to(np.arange(S), (2, S))
  positions_BS = np.maximum(slots_BS - pad_B[:, None], 0).astype(np.int32)
  key_valid_BS = jnp.asarray(slots_BS >= pad_B[:, None])

  @jax.jit
  def step(cache, tokens_BT, positions_BT):
    return model.GPT(m).apply(
      {"params": params}, tokens_BT, positions_BT=positions_BT, cache=cache, key_valid_BS=key_valid_BS
    )

  cache = model.init_cache(m, 2, S)
  assert [k.shape for k in cache["k"]] == [(2, 4, S, 8)] * 2  # L x [B, H, S, K]
  chunks, start = [], 0
  for length in [3, 3] + [1] * (S - 6):
    sl = slice(start, start + length)
    out_BTV, cache = step(cache, jnp.asarray(padded_BS[:, sl]), jnp.asarray(positions_BS[:, sl]))
    chunks.append(np.asarray(out_BTV))
    start += length
  assert int(cache["end"]) == S
  decoded_BSV = np.concatenate(chunks, axis=1)

  # Reference: the unrolled "xla" model (checked against NumPy, scan and dot_product_attention above).
  reference = _cfg(m, scan_layers=False, attention_impl="xla")
  full_BSV = np.asarray(_logits(reference, layout.unstack_blocks(params), jnp.asarray(seq_BS)))
  np.testing.assert_allclose(decoded_BSV[0], full_BSV[0], rtol=1e-5, atol=1e-5)
  # Row 1's slot j holds its position j - pad; a causal model ignores the unused tail of seq_BS[1].
  np.testing.assert_allclose(decoded_BSV[1, pad:], full_BSV[1, : S - pad], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  "changes", [{}, {"scan_layers": True}, {"norm_position": "post"}, {"remat": "full", "scan_layers": True}]
)
def test_every_parameter_carries_logical_axis_names(debug_config, changes):
  m = _cfg(debug_config, **changes)
  boxed = model.abstract_params(m)
  leaves = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
  known = {name for name, _ in debug_config.mesh.rules}  # Every name has a sharding rule.
  for path, leaf in leaves:
    where = jax.tree_util.keystr(path)
    assert isinstance(leaf, nn.LogicallyPartitioned), where
    assert len(leaf.names) == leaf.value.ndim and all(n is not None for n in leaf.names), (where, leaf.names)
  names = {n for _, leaf in leaves for n in leaf.names}
  assert names <= known, names - known
  assert ("layers" in names) == bool(m.scan_layers)

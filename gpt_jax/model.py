"""Decoder-only GPT transformers as Flax Linen modules.

One `GPT` module serves GPT-1 (post-LN), GPT-2 (pre-LN, depth-scaled init)
and GPT-3-style alternating dense / locally banded attention, for training,
evaluation, KV-cache sampling and fine-tuning. Its hyper-parameters are a
`model_config.ModelConfig` (a `config.model` section is converted on the way
in).

Shape suffixes: B batch, T query positions, S key positions (cache slots),
D d_model, H heads, K head dim, F MLP width, V vocab, L layers.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from gpt_jax import model_config, tpu_attention
from gpt_jax.errors import ConfigError
from gpt_jax.model_config import ModelConfig, layer_windows, padded_vocab_size

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_policies = jax.checkpoint_policies
# Names of values a remat policy can keep (jax.ad_checkpoint.checkpoint_name): each block's
# q / k / v projection, and the splash kernel's output and logsumexp (tpu_attention).
QKV_NAME, ATTENTION_NAME = "qkv", tpu_attention.CHECKPOINT_NAME
_offload_dots = _policies.offload_dot_with_no_batch_dims("device", "pinned_host")
_offload_attention = _policies.save_and_offload_only_these_names(
  names_which_can_be_saved=(), names_which_can_be_offloaded=(ATTENTION_NAME,),
  offload_src="device", offload_dst="pinned_host",
)  # fmt: skip


def _dots_offloaded(prim, *args, **params):
  """dots_saveable's values, kept in host memory (pinned_host) instead of HBM."""
  out = _offload_dots(prim, *args, **params)
  return out if isinstance(out, tuple) else _offload_attention(prim, *args, **params)  # Offloadable


REMAT_POLICIES = {
  "none": None,
  "full": _policies.nothing_saveable,
  # Matmul outputs without batch dimensions (the projections and the MLP), and the splash
  # kernel's residuals (its output is attention's last matmul): the backward pass recomputes
  # the einsum attention's scores and the elementwise ops, never a projection or the kernel.
  "dots_saveable": _policies.save_from_both_policies(
    _policies.dots_with_no_batch_dims_saveable, _policies.save_only_these_names(ATTENTION_NAME)
  ),
  # The same recomputation, the saved values in host memory: HBM holds one layer's at a time.
  "dots_offloaded": _dots_offloaded,
  # Between dots_saveable and full: keep q / k / v and the splash kernel's residuals, recompute
  # the attention output projection and the MLP (8 of a layer's 12 D^2 matmul FLOPs per token).
  "attention_saveable": _policies.save_only_these_names(QKV_NAME, ATTENTION_NAME),
}
# A window no sequence reaches: what a dense layer gets when windows are traced.
_NO_WINDOW = 2**30
# jax.nn.dot_product_attention's implementation for attention_impl="cudnn".
CUDNN_IMPLEMENTATION = "cudnn"


def residual_init_std(cfg) -> float:
  """Init std of the two residual output projections of each block.

  GPT-2 §2.3 scales them by 1/sqrt(N) with N = 2 residual layers per block
  (attention and MLP), so the residual stream's variance at init does not
  grow with depth.
  """
  if cfg.scale_residual_init:
    return cfg.init_std / np.sqrt(2 * cfg.num_layers)
  return cfg.init_std


def check_platform(cfg, platform: str, where: str) -> None:
  """Refuses, in one line, an attention kernel that `platform` (a jax Device.platform or a
  planner target's) cannot run: "cudnn" needs NVIDIA GPUs, "splash" TPUs (or Pallas'
  interpreter, tpu_attention.INTERPRET, which the CPU tests use)."""
  need = {"cudnn": (("cuda", "gpu"), "NVIDIA GPUs"), "splash": (("tpu",), "TPUs")}.get(cfg.attention_impl)
  if need is None or platform in need[0] or (cfg.attention_impl == "splash" and tpu_attention.INTERPRET):
    return
  raise ConfigError(
    f"config.model.attention_impl={cfg.attention_impl!r} runs on {need[1]} only, not {where}; "
    "use 'xla' or 'dot_product_attention'"
  )


def attention_mask(q_slot_BT, k_slot_S, window, key_valid_BS=None, segment_BT=None):
  """[B, 1, T, S] bool: key s visible to query t (causal, banded, valid, same segment).

  segment_BT: segment ids of the T positions, which are also the keys (S = T,
  no cache): a query sees only keys of its own segment (document masking).
  """
  diff_BTS = q_slot_BT[:, :, None] - k_slot_S[None, None, :]
  mask_BTS = diff_BTS >= 0
  if window is not None:
    mask_BTS = mask_BTS & (diff_BTS < window)
  if key_valid_BS is not None:
    mask_BTS = mask_BTS & key_valid_BS[:, None, :]
  if segment_BT is not None:
    mask_BTS = mask_BTS & (segment_BT[:, :, None] == segment_BT[:, None, :])
  return mask_BTS[:, None]


def init_cache(cfg, batch_size: int, max_len: int, dtype=None) -> dict:
  """An empty KV cache for `max_len` slots (prompt + generated tokens).

  `k`/`v`: per layer [B, H, S, K] in the compute dtype (head-major, so
  decoding reads each layer's keys in place), stacked into one [L, B, H, S, K]
  array for `scan_layers` models and a tuple of L arrays otherwise (each
  layer's buffer is then updated in place, never sliced out and restacked);
  `end`: slots filled so far
  (shared by the batch: ragged prompts are left-padded and their pad slots
  masked through `key_valid_BS`; an int32 [B] of per-row ends instead makes
  each row write at its own slot, as speculative decoding needs).
  """
  if max_len > cfg.block_size:
    raise ValueError(f"cache of {max_len} slots exceeds model.block_size={cfg.block_size}")
  dtype = dtype or DTYPES[cfg.dtype]
  shape = (batch_size, cfg.num_heads, max_len, cfg.d_model // cfg.num_heads)
  if cfg.scan_layers:
    k, v = (jnp.zeros((cfg.num_layers, *shape), dtype) for _ in "kv")
  else:
    k, v = (tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)) for _ in "kv")
  return {"k": k, "v": v, "end": jnp.zeros((), jnp.int32)}


# Up to this many rows (decoding), few-row products are computed transposed
# ([N, K] weights by [K, M] activations) when the config asks for it: see
# _lm_head (few_row_head) and Projection (kernel_layout="out_in").
_FEW_ROWS = 64


def _normal(std, axes):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), axes)


def _zeros(axes):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


class LayerNorm(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD):
    # Flax computes the mean and variance in (at least) float32.
    return nn.LayerNorm(
      epsilon=self.cfg.layer_norm_epsilon,
      dtype=DTYPES[self.cfg.dtype],
      param_dtype=DTYPES[self.cfg.param_dtype],
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
      bias_init=_zeros(("embed",)),
      name="ln",
    )(x_BTD)


class Projection(nn.Module):
  """x @ kernel + bias, contracting the last `num_in` axes of x.

  The kernel is created at its full logical shape (e.g. [D, 3, H, K]) so each
  axis carries its logical name; flax's DenseGeneral builds a flat kernel and
  reshapes it, which logical sharding constraints cannot follow.
  """

  cfg: ModelConfig
  features: tuple[int, ...]
  axes: tuple[str, ...]  # Logical names of the kernel: input axes, then output axes.
  std: float
  num_in: int = 1

  @nn.compact
  def __call__(self, x):
    dtype, param_dtype = DTYPES[self.cfg.dtype], DTYPES[self.cfg.param_dtype]
    in_shape = x.shape[x.ndim - self.num_in :]
    ins, outs = "abcd"[: self.num_in], "efgh"[: len(self.features)]
    bias = self.param("bias", _zeros(self.axes[self.num_in :]), self.features, param_dtype)
    bias = bias.astype(dtype).reshape((1,) * (x.ndim - self.num_in) + bias.shape)
    # int8 kernels (gpt_jax.quantize) come with one scale per output: the
    # product is scaled after the contraction, activations stay in `dtype`.
    scale = self.get_variable("params", "kernel_scale")

    def scaled(y):
      if scale is None:
        return y
      return y * scale.astype(dtype).reshape((1,) * (y.ndim - scale.ndim) + scale.shape)

    if self.cfg.kernel_layout == "in_out":
      kernel = self.param("kernel", _normal(self.std, self.axes), (*in_shape, *self.features), param_dtype)
      y = jnp.einsum(f"...{ins},{ins}{outs}->...{outs}", x.astype(dtype), kernel.astype(dtype))
      return scaled(y) + bias
    # Kernels stored [outputs..., inputs...] (layout.transpose_kernels): decoding on CPU.
    axes = (*self.axes[self.num_in :], *self.axes[: self.num_in])
    kernel = self.param("kernel", _normal(self.std, axes), (*self.features, *in_shape), param_dtype)
    lead = x.shape[: x.ndim - self.num_in]
    rows, n_in, n_out = int(np.prod(lead)), int(np.prod(in_shape)), int(np.prod(self.features))
    if rows > _FEW_ROWS:
      y = jnp.einsum(f"...{ins},{outs}{ins}->...{outs}", x.astype(dtype), kernel.astype(dtype))
      return scaled(y) + bias
    kernel_NK = kernel.reshape(n_out, n_in).astype(dtype)
    y_NM = jnp.einsum("NK,MK->NM", kernel_NK, x.reshape(rows, n_in).astype(dtype))
    return scaled(jax.lax.optimization_barrier(y_NM).T.reshape(*lead, *self.features)) + bias


def _attend(q_BTHK, k, v, mask, scores_spec, out_spec, dtype, dropout_rate):
  """Softmax attention, scores and softmax in float32; `k`/`v` layouts are named by the einsum specs."""
  scale = 1.0 / np.sqrt(q_BTHK.shape[-1])
  logits_BHTS = jnp.einsum(scores_spec, q_BTHK, k, preferred_element_type=jnp.float32) * scale
  logits_BHTS = jnp.where(mask, logits_BHTS, jnp.finfo(jnp.float32).min)
  probs_BHTS = jax.nn.softmax(logits_BHTS, axis=-1).astype(dtype)
  probs_BHTS = nn.Dropout(dropout_rate)(probs_BHTS, deterministic=dropout_rate == 0.0)
  return jnp.einsum(out_spec, probs_BHTS, v)


def _cudnn_attend(q_BTHK, k_BTHK, v_BTHK, window):
  """cuDNN flash attention over T == S positions: causal, banded to `window` keys if given."""
  try:
    return jax.nn.dot_product_attention(
      q_BTHK,
      k_BTHK,
      v_BTHK,
      is_causal=True,
      local_window_size=None if window is None else (int(window) - 1, 0),
      implementation=CUDNN_IMPLEMENTATION,
    )
  except RuntimeError as e:
    if "cudnn" not in str(e).lower():
      raise
    raise ConfigError(
      f"config.model.attention_impl='cudnn' needs an NVIDIA GPU with cuDNN and jax's CUDA plugin "
      f"(pip install 'jax[cuda12]'); JAX says: {str(e).strip()} Use 'xla' or 'dot_product_attention' here"
    ) from None


class CausalSelfAttention(nn.Module):
  cfg: ModelConfig
  deterministic: bool

  @nn.compact
  def __call__(self, x_BTD, window, ctx, kv):
    cfg = self.cfg
    dtype = DTYPES[cfg.dtype]
    H, K = cfg.num_heads, cfg.d_model // cfg.num_heads
    qkv_BT3HK = Projection(cfg, (3, H, K), ("embed", "qkv", "heads", "kv"), cfg.init_std, name="c_attn")(
      x_BTD
    )
    qkv_BT3HK = checkpoint_name(qkv_BT3HK, QKV_NAME)
    q_BTHK, k_BTHK, v_BTHK = (qkv_BT3HK[:, :, i] for i in range(3))
    q_BTHK = nn.with_logical_constraint(q_BTHK, ("batch", "length", "act_heads", "kv"))

    dropout_rate = 0.0 if self.deterministic else cfg.attn_dropout
    if kv is None:  # Training / full forward: keys are the queries' positions.
      k_BSHK, v_BSHK, new_kv = k_BTHK, v_BTHK, None
    else:  # Decoding: write this chunk into the head-major cache at slot `end`.
      end = ctx["end"]
      to_cache = lambda x_BTHK, c: x_BTHK.astype(c.dtype).transpose(0, 2, 1, 3)
      write = functools.partial(jax.lax.dynamic_update_slice_in_dim, axis=2)
      if end.ndim == 1:  # Per-row ends (speculative decoding): each row writes at its own slot.
        write = jax.vmap(functools.partial(jax.lax.dynamic_update_slice_in_dim, axis=1))
      k_BHSK = write(kv[0], to_cache(k_BTHK, kv[0]), end)
      v_BHSK = write(kv[1], to_cache(v_BTHK, kv[1]), end)
      new_kv = (k_BHSK, v_BHSK)
      if cfg.attention_impl in ("xla", "cudnn"):  # cuDNN's kernels are for training-length queries.
        # Scores straight from the [B, H, S, K] cache: a batched matmul over
        # (B, H) that reads the cache in place. A [B, S, H, K] cache would be
        # transposed (copied whole) at every decoding step.
        out_BTHK = _attend(
          q_BTHK, k_BHSK.astype(dtype), v_BHSK.astype(dtype), self._mask(ctx, window, k_BHSK.shape[2]),
          "BTHK,BHSK->BHTS", "BHTS,BHSK->BTHK", dtype, dropout_rate,
        )  # fmt: skip
        return self._project(out_BTHK), new_kv
      k_BSHK, v_BSHK = k_BHSK.transpose(0, 2, 1, 3), v_BHSK.transpose(0, 2, 1, 3)

    plain = ctx["key_valid_BS"] is None and ctx["segment_BT"] is None
    full_causal = kv is None and window is None and plain
    static_window = window is None or isinstance(window, (int, np.integer))
    # Parameters do not depend on the kernel: init traces einsums, so shapes and
    # initial values come out on machines without cuDNN (planner, CPU loading).
    cudnn = cfg.attention_impl == "cudnn" and not self.is_initializing()
    # Document masking takes the einsums: jax's public cuDNN call takes segments
    # only as a dense [B, 1, T, S] bias (the packed q/kv offsets are private API).
    if cudnn and kv is None and static_window and plain:
      out_BTHK = _cudnn_attend(q_BTHK, k_BSHK.astype(dtype), v_BSHK.astype(dtype), window)
    elif self._splash(kv, ctx, q_BTHK.shape[1]):
      out_BTHK = tpu_attention.attention(
        q_BTHK, k_BSHK.astype(dtype), v_BSHK.astype(dtype), window,
        local_window=cfg.local_window, segment_ids_BT=ctx["segment_BT"],
      )  # fmt: skip
    elif cfg.attention_impl == "dot_product_attention":
      out_BTHK = jax.nn.dot_product_attention(
        q_BTHK,
        k_BSHK.astype(dtype),
        v_BSHK.astype(dtype),
        mask=None if full_causal else self._mask(ctx, window, k_BSHK.shape[1]),
        is_causal=full_causal,
      )
    else:
      out_BTHK = _attend(
        q_BTHK, k_BSHK.astype(dtype), v_BSHK.astype(dtype), self._mask(ctx, window, k_BSHK.shape[1]),
        "BTHK,BSHK->BHTS", "BHTS,BSHK->BTHK", dtype, dropout_rate,
      )  # fmt: skip
    return self._project(out_BTHK), new_kv

  def _splash(self, kv, ctx, num_queries: int) -> bool:
    """attention_impl="splash" (the TPU Pallas kernel) for training-length forwards whose
    length the kernel tiles (a multiple of 128), documents in a window kept apart by the
    kernel's segment ids; decoding, left padding and other lengths take the einsums."""
    return (
      self.cfg.attention_impl == "splash"
      and not self.is_initializing()
      and kv is None
      and ctx["key_valid_BS"] is None
      and num_queries % tpu_attention.LANES == 0
    )

  def _project(self, out_BTHK):
    cfg = self.cfg
    out_BTHK = nn.with_logical_constraint(out_BTHK, ("batch", "length", "act_heads", "kv"))
    return Projection(
      cfg, (cfg.d_model,), ("heads", "kv", "embed"), residual_init_std(cfg), num_in=2, name="c_proj"
    )(out_BTHK)

  def _mask(self, ctx, window, num_keys):
    return attention_mask(
      ctx["q_slot_BT"], jnp.arange(num_keys), window, ctx["key_valid_BS"], ctx["segment_BT"]
    )


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD):
    cfg = self.cfg
    h_BTF = Projection(cfg, (cfg.mlp_ratio * cfg.d_model,), ("embed", "mlp"), cfg.init_std, name="c_fc")(
      x_BTD
    )
    h_BTF = nn.with_logical_constraint(h_BTF, ("batch", "length", "act_mlp"))
    h_BTF = jax.nn.gelu(h_BTF, approximate=cfg.activation == "gelu_tanh")
    return Projection(cfg, (cfg.d_model,), ("mlp", "embed"), residual_init_std(cfg), name="c_proj")(h_BTF)


class Block(nn.Module):
  """One transformer block. `window` (static) is overridden by `xs[0]` when traced.

  Call signature `(x, xs, ctx) -> (x, ys)` is nn.scan's: `xs` = (window or
  None, this layer's (k, v) cache or None) is scanned over layers, `ctx`
  (query slots, key validity, cache end) is shared by all layers.
  """

  cfg: ModelConfig
  deterministic: bool
  window: int | None = None

  @nn.compact
  def __call__(self, x_BTD, xs, ctx):
    cfg = self.cfg
    window_dyn, kv = xs
    window = self.window if window_dyn is None else window_dyn
    drop = functools.partial(nn.Dropout(cfg.resid_dropout), deterministic=self.deterministic)
    attn = CausalSelfAttention(cfg, self.deterministic, name="attn")
    mlp = MLP(cfg, name="mlp")
    if cfg.norm_position == "pre":  # GPT-2
      h_BTD, new_kv = attn(LayerNorm(cfg, name="ln_1")(x_BTD), window, ctx, kv)
      x_BTD = x_BTD + drop(h_BTD)
      x_BTD = x_BTD + drop(mlp(LayerNorm(cfg, name="ln_2")(x_BTD)))
    else:  # GPT-1: LayerNorm after each residual add.
      h_BTD, new_kv = attn(x_BTD, window, ctx, kv)
      x_BTD = LayerNorm(cfg, name="ln_1")(x_BTD + drop(h_BTD))
      x_BTD = LayerNorm(cfg, name="ln_2")(x_BTD + drop(mlp(x_BTD)))
    x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "length", "act_embed"))
    return x_BTD, new_kv


def _lm_head(x_BTD, wte_VD, few_row_head: bool):
  """Tied LM head (GPT-1/2): logits = h @ wte^T, accumulated in float32."""
  B, T, D = x_BTD.shape
  if few_row_head and B * T <= _FEW_ROWS:
    # Measured on XLA:CPU for the 50k x 768 table: [M, D] x [D, V] with 2-32
    # rows runs 1.5-2x slower than the transposed product [V, D] x [D, M]
    # (which streams the table once); the barrier stops XLA from folding the
    # final (small) transpose back into the matmul.
    logits_VM = jnp.einsum("VD,MD->VM", wte_VD, x_BTD.reshape(B * T, D), preferred_element_type=jnp.float32)
    return jax.lax.optimization_barrier(logits_VM).T.reshape(B, T, -1)
  return jnp.einsum("BTD,VD->BTV", x_BTD, wte_VD, preferred_element_type=jnp.float32)


class GPT(nn.Module):
  """GPT language model. `cfg`: a ModelConfig, or a `config.model` section (converted)."""

  cfg: ModelConfig

  def __post_init__(self):
    object.__setattr__(self, "cfg", model_config.of(self.cfg))
    super().__post_init__()

  @nn.compact
  def __call__(
    self,
    tokens_BT,
    *,
    deterministic: bool = True,
    positions_BT=None,
    cache: dict | None = None,
    key_valid_BS=None,
    segment_ids_BT=None,
    return_hidden: bool = False,
    lm_head: bool = True,
  ):
    """Logits [B, T, V] in float32 for `tokens_BT` (int32 [B, T]).

    Args:
      deterministic: False enables dropout (needs a "dropout" rng).
      positions_BT: position ids; default arange(T) (+ cache end).
      cache: from `init_cache`; the tokens are written at its `end` slot and
        attend to every filled slot. Returns (logits, new_cache) when given.
      key_valid_BS: bool [B, S]; False marks key slots (e.g. left padding)
        that no query may attend to. S = T without cache, cache slots with.
      segment_ids_BT: int [B, T] (no cache): attention stays within runs of
        equal ids, e.g. the documents packed in a window (data.segments).
      return_hidden: also return the final hidden states [B, T, D] (after the
        final LayerNorm for pre-LN), e.g. for classification heads.
      lm_head: False returns those hidden states instead of the logits, which
        are then never computed (loss.chunked_cross_entropy applies the head).
    """
    cfg = self.cfg
    dtype, param_dtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
    B, T = tokens_BT.shape
    start = jnp.zeros((), jnp.int32) if cache is None else cache["end"]
    if cache is None and T > cfg.block_size:
      raise ValueError(f"sequence of {T} tokens exceeds model.block_size={cfg.block_size}")
    if cache is not None and segment_ids_BT is not None:
      raise ValueError("segment_ids_BT is for full forwards; decoding with a cache has no segments")
    # `end` is shared by the batch, or one per row ([B]: speculative decoding).
    q_slot_BT = jnp.broadcast_to(jnp.reshape(start, (-1, 1)) + jnp.arange(T, dtype=jnp.int32)[None], (B, T))
    if positions_BT is None:
      positions_BT = q_slot_BT

    wte_VD = self.param(
      "wte", _normal(cfg.init_std, ("vocab", "embed")), (padded_vocab_size(cfg), cfg.d_model), param_dtype
    )
    # An int8 table (gpt_jax.quantize) has one scale per token row, for the lookup and the tied head.
    wte_scale_V = self.get_variable("params", "wte_scale")
    tok_BTD = jnp.take(wte_VD, tokens_BT, axis=0)
    if wte_scale_V is not None:
      tok_BTD = tok_BTD.astype(param_dtype) * jnp.take(wte_scale_V, tokens_BT, axis=0)[..., None]
    x_BTD = (tok_BTD + self._positions(positions_BT)).astype(dtype)
    x_BTD = nn.Dropout(cfg.embd_dropout)(x_BTD, deterministic=deterministic)
    x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "length", "act_embed"))

    ctx = {"q_slot_BT": q_slot_BT, "key_valid_BS": key_valid_BS, "segment_BT": segment_ids_BT, "end": start}
    windows = layer_windows(cfg)
    block_cls = Block
    if cfg.remat != "none":
      block_cls = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    kv_L = None if cache is None else (cache["k"], cache["v"])

    if cfg.scan_layers:
      uniform = len(set(windows)) == 1
      window_L = None if uniform else jnp.array([w or _NO_WINDOW for w in windows], jnp.int32)
      stack = nn.scan(
        block_cls,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(0, nn.broadcast),
        length=cfg.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )(cfg, deterministic, windows[0] if uniform else None, name="blocks")
      x_BTD, new_kv_L = stack(x_BTD, (window_L, kv_L), ctx)
    else:
      new_kv = []
      for i, window in enumerate(windows):
        kv = None if kv_L is None else (kv_L[0][i], kv_L[1][i])
        x_BTD, layer_kv = block_cls(cfg, deterministic, window, name=f"block_{i}")(x_BTD, (None, kv), ctx)
        new_kv.append(layer_kv)
      new_kv_L = None if cache is None else tuple(zip(*new_kv))

    if cfg.norm_position == "pre":
      x_BTD = LayerNorm(cfg, name="ln_f")(x_BTD)
    if lm_head:
      logits_BTV = _lm_head(x_BTD, wte_VD.astype(dtype), cfg.few_row_head)
      if wte_scale_V is not None:
        logits_BTV = logits_BTV * wte_scale_V[None, None]
      logits_BTV = logits_BTV[..., : cfg.vocab_size]
      logits_BTV = nn.with_logical_constraint(logits_BTV, ("batch", "length", "act_vocab"))
      out = (logits_BTV, x_BTD) if return_hidden else logits_BTV
    else:
      out = x_BTD
    if cache is None:
      return out
    new_cache = {"k": new_kv_L[0], "v": new_kv_L[1], "end": start + T}
    return out, new_cache

  def _positions(self, positions_BT):
    """Position embeddings [B, T, D]: rows of the learned table `wpe` (see position_tables)."""
    cfg = self.cfg
    ((name, shape),) = position_tables(cfg).items()
    table_PD = self.param(name, _normal(cfg.init_std, ("positions", "embed")), shape, DTYPES[cfg.param_dtype])
    return jnp.take(table_PD, positions_BT, axis=0)


def position_tables(cfg) -> dict[str, tuple[int, ...]]:
  """The position-embedding parameters, {name: shape}: tables looked up by
  position and never multiplied. GPT-1/2/3 learn one, `wpe` [block_size, D].

  Everything that must tell them apart from matmul weights asks here: the
  non-embedding parameter count and FLOPs per token (Kaplan et al. 2020 and
  the PaLM formula count N without them), the weight-decay mask, Hugging
  Face conversion and the planner.
  """
  return {"wpe": (cfg.block_size, cfg.d_model)}


def param_count(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def abstract_params(cfg, batch_size: int = 1):
  """Parameter shapes (boxed with logical axes) via jax.eval_shape: no memory."""
  cfg = model_config.of(cfg)
  tokens = jax.ShapeDtypeStruct((batch_size, min(cfg.block_size, 8)), jnp.int32)
  return jax.eval_shape(lambda t: GPT(cfg).init(jax.random.key(0), t)["params"], tokens)


def init_params(cfg, rng):
  """Randomly initialised parameters (plain arrays, logical boxes removed)."""
  cfg = model_config.of(cfg)
  tokens = jnp.zeros((1, min(cfg.block_size, 8)), jnp.int32)
  return nn.unbox(GPT(cfg).init(rng, tokens)["params"])


def logical_specs(cfg):
  """PartitionSpecs of logical axis names, one per parameter (no memory)."""
  return nn.get_partition_spec(abstract_params(cfg))

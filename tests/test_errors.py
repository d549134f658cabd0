"""The shared field checks: what they accept, and the one-line message of each refusal."""

import re

import pytest

from gpt_jax import errors


def _message(check, config, *args, **kwargs) -> str:
  with pytest.raises(errors.ConfigError) as e:
    check(config, *args, **kwargs)
  assert "\n" not in str(e.value)
  return str(e.value)


def test_a_config_error_is_a_user_error_naming_field_value_and_rule():
  assert issubclass(errors.ConfigError, errors.UserError)
  with pytest.raises(errors.ConfigError) as e:
    errors.fail("train.batch_size", "8", "must be a positive integer")
  # repr() of the value: the string "8" is told apart from the number 8.
  assert str(e.value) == "config.train.batch_size='8' is invalid: must be a positive integer"


def test_fields_are_found_by_their_dotted_path():
  assert errors.get({"a": {"b": {"c": 3}}}, "a.b.c") == 3
  with pytest.raises(KeyError):
    errors.get({"a": {}}, "a.b")


@pytest.mark.parametrize("value", [0, -3, 2.0, True, "4", None])
def test_positive_int(value):
  msg = _message(errors.positive_int, {"t": {"n": value}}, "t.n")
  assert msg == f"config.t.n={value!r} is invalid: must be a positive integer"


@pytest.mark.parametrize("value", [-0.001, 0, 0.0])
def test_positive_refuses_zero_and_negatives_alike(value):
  msg = _message(errors.positive, {"optim": {"lr": value}}, "optim.lr")
  assert msg == f"config.optim.lr={value!r} is invalid: must be a number > 0"


@pytest.mark.parametrize("value", [-1, -1e-9, "1", True, None, float("nan")])
def test_non_negative(value):
  msg = _message(errors.non_negative, {"o": {"eps": value}}, "o.eps")
  assert msg.startswith(f"config.o.eps={value!r} is invalid: must be a number >= 0"), msg


def test_numbers_that_pass():
  config = {"o": {"n": 3, "x": 0.5, "z": 0, "flag": False}}
  errors.positive_int(config, "o.n")
  errors.positive(config, "o.n", "o.x")
  errors.non_negative(config, "o.n", "o.x", "o.z")
  errors.boolean(config, "o.flag")


def test_several_fields_are_checked_in_order_and_the_first_bad_one_named():
  config = {"o": {"a": 1, "b": -1, "c": -2}}
  assert _message(errors.positive_int, config, "o.a", "o.b", "o.c").startswith("config.o.b=-1 ")


@pytest.mark.parametrize("value", [0, 1, "True", None])
def test_boolean_takes_only_true_or_false(value):
  msg = _message(errors.boolean, {"m": {"scan": value}}, "m.scan")
  assert msg == f"config.m.scan={value!r} is invalid: must be True or False"


def test_one_of_lists_the_allowed_values():
  config = {"optim": {"schedule": "step"}}
  msg = _message(errors.one_of, config, "optim.schedule", ("cosine", "linear"))
  assert msg == "config.optim.schedule='step' is invalid: allowed values are 'cosine', 'linear'"
  config["optim"]["schedule"] = "linear"
  errors.one_of(config, "optim.schedule", ("cosine", "linear"))


@pytest.mark.parametrize(
  "kwargs, brackets, inside, outside",
  [
    ({}, "[0.0, 1.0)", [0.0, 0.5], [1.0, -0.1]),
    ({"hi_inclusive": True}, "[0.0, 1.0]", [0.0, 1.0], [1.01, -0.1]),
    ({"lo_inclusive": False}, "(0.0, 1.0)", [0.5, 1e-9], [0.0, 1.0]),
    ({"lo_inclusive": False, "hi_inclusive": True}, "(0.0, 1.0]", [1.0], [0.0, 2.0]),
  ],
)
def test_in_range_brackets_say_which_ends_are_included(kwargs, brackets, inside, outside):
  for v in inside:
    errors.in_range({"d": {"p": v}}, "d.p", 0.0, 1.0, **kwargs)
  for v in (*outside, "0.5", None, True):
    msg = _message(errors.in_range, {"d": {"p": v}}, "d.p", 0.0, 1.0, **kwargs)
    assert msg == f"config.d.p={v!r} is invalid: must be in {brackets}", msg
  assert re.fullmatch(r"[\[(]0\.0, 1\.0[\])]", brackets)

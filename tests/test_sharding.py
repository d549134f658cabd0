"""The device mesh, logical-axis rules, uneven dimensions, global batches and config.mesh."""

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from gpt_jax import errors, sharding
from gpt_jax.errors import ConfigError


def _mesh_cfg(data, fsdp, tensor):
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


@pytest.mark.parametrize(
  "axes, devices, shape",
  [
    ((-1, 1, 1), 8, (8, 1, 1)),
    ((-1, 2, 2), 8, (2, 2, 2)),
    ((2, -1, 1), 8, (2, 4, 1)),
    ((1, 1, -1), 4, (1, 1, 4)),
  ],
)
def test_mesh_shape_gives_the_rest_to_the_minus_one_axis(axes, devices, shape):
  assert sharding.mesh_shape(_mesh_cfg(*axes), devices) == shape


def test_mesh_shape_refuses_what_does_not_cover_the_devices():
  with pytest.raises(ConfigError) as e:
    sharding.mesh_shape(_mesh_cfg(2, 2, 1), 8)
  assert str(e.value) == (
    "config.mesh data*fsdp*tensor = 2*2*1 = 4 must equal the number of devices (8); "
    "set one axis to -1 to take the rest"
  )
  with pytest.raises(ConfigError) as e:
    sharding.mesh_shape(_mesh_cfg(-1, 3, 1), 8)
  assert str(e.value) == (
    "config.mesh={'data': -1, 'fsdp': 3, 'tensor': 1} cannot cover 8 devices: 8 is not divisible by 3"
  )


def test_mesh_must_cover_devices(debug_config):
  debug_config.mesh.update(data=3, fsdp=1, tensor=1)
  with pytest.raises(ConfigError, match="mesh"):
    sharding.make_mesh(debug_config.mesh)


def test_make_mesh_and_describe():
  mesh = sharding.make_mesh(_mesh_cfg(-1, 2, 2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert sharding.describe(mesh) == "data=2 x fsdp=2 x tensor=2 (8 devices)"
  small = sharding.make_mesh(_mesh_cfg(1, 1, 1), jax.devices()[:1])
  assert sharding.describe(small) == "data=1 x fsdp=1 x tensor=1 (1 devices)"


def test_axes_that_do_not_divide_a_dimension_are_dropped():
  mesh = sharding.make_mesh(_mesh_cfg(2, 2, 2))
  spec = sharding._divisible_spec
  # GPT-2's vocabulary, 50257 rows, is odd: over tensor=2 it stays whole; D=768 splits.
  assert spec(PartitionSpec("tensor", "fsdp"), (50257, 768), mesh) == PartitionSpec(None, "fsdp")
  assert spec(PartitionSpec("tensor", "fsdp"), (50304, 768), mesh) == PartitionSpec("tensor", "fsdp")
  # Several mesh axes on one dimension divide it together (2 x 2 = 4).
  assert spec(PartitionSpec(("data", "fsdp")), (6, 3), mesh) == PartitionSpec(None, None)
  assert spec(PartitionSpec(("data", "fsdp")), (8, 3), mesh) == PartitionSpec(("data", "fsdp"), None)
  assert spec(PartitionSpec(), (5,), mesh) == PartitionSpec(None)


def test_logical_specs_become_shardings_and_undivided_dims_are_reported():
  mesh = sharding.make_mesh(_mesh_cfg(2, 2, 2))
  rules = (("vocab", "tensor"), ("embed", "fsdp"), ("mlp", "tensor"))
  specs = {"wte": PartitionSpec("vocab", "embed"), "w": PartitionSpec("embed", "mlp")}
  shapes = {
    "wte": jax.ShapeDtypeStruct((321, 32), np.float32),
    "w": jax.ShapeDtypeStruct((32, 128), np.float32),
  }
  got = sharding.logical_to_shardings(specs, shapes, mesh, rules)
  assert got["wte"].spec == PartitionSpec(None, "fsdp") and got["w"].spec == PartitionSpec("fsdp", "tensor")
  assert all(s.mesh is mesh for s in got.values())
  assert sharding.undivided_dims(specs, shapes, mesh, rules) == [
    "['wte'] dim 0 (321) not divisible by tensor"
  ]


def test_rules_come_back_as_tuples(debug_config):
  with debug_config.mesh.ignore_type():
    debug_config.mesh.rules = [["batch", ["data", "fsdp"]], ["embed", "fsdp"], ["kv", None]]
  assert sharding.rules(debug_config) == (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("kv", None))


def test_params_mesh():
  mesh = sharding.make_mesh(_mesh_cfg(-1, 1, 1))
  x = np.arange(16.0).reshape(8, 2)
  sharded = {"a": np.zeros(3), "b": jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))}
  assert sharding.params_mesh(sharded) is mesh
  assert sharding.params_mesh({"a": np.zeros(3)}) is None
  assert sharding.params_mesh({"a": jax.device_put(x, jax.devices()[0])}) is None


def test_global_batch_splits_rows_over_data_and_fsdp():
  mesh = sharding.make_mesh(_mesh_cfg(4, 2, 1))
  tokens = np.arange(8 * 5, dtype=np.int32).reshape(8, 5)
  batch = sharding.global_batch({"tokens": tokens, "mask": np.ones((8,), np.float32)}, mesh)
  assert batch["tokens"].shape == (8, 5) and batch["mask"].shape == (8,)
  assert batch["tokens"].sharding.spec == PartitionSpec(("data", "fsdp"))
  assert {s.data.shape for s in batch["tokens"].addressable_shards} == {(1, 5)}  # One row per device.
  np.testing.assert_array_equal(np.asarray(batch["tokens"]), tokens)
  assert sharding.replicated(mesh).spec == PartitionSpec()


@pytest.mark.parametrize(
  "mesh, message",
  [
    ((0, 1, 1), "config.mesh.data=0 is invalid: must be a positive integer or -1 (all remaining devices)"),
    ((1, -2, 1), "config.mesh.fsdp=-2 is invalid: must be a positive integer or -1 (all remaining devices)"),
    ((1, 1, True), "config.mesh.tensor=True is invalid: must be a positive integer or -1"),
    ((1, 1, 2.0), "config.mesh.tensor=2.0 is invalid: must be a positive integer or -1"),
    (
      (-1, -1, 1),
      "config.mesh={'data': -1, 'fsdp': -1, 'tensor': 1} is invalid: at most one of data/fsdp/tensor",
    ),
    ((1, 1, 0), "config.mesh.tensor=0 is invalid: must be a positive integer or -1"),
    ((-1, 1, 3), "config.mesh.tensor=3 is invalid: must divide model.num_heads=4"),
  ],
)
def test_validate_names_the_field(debug_config, mesh, message):
  with debug_config.mesh.ignore_type():
    debug_config.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  with pytest.raises(errors.ConfigError) as e:
    sharding.validate(debug_config)
  assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


def test_validate_accepts_one_minus_one_and_whole_heads(debug_config):
  debug_config.mesh.update(data=-1, fsdp=2, tensor=4)
  sharding.validate(debug_config)


# ------------------------------------------------------------ multi-slice


def test_slices_are_laid_out_along_data_and_fsdp():
  def cfg(**dcn):
    c = _mesh_cfg(1, -1, 1)
    c.update(dcn)
    return c

  # Default: data parallelism over all the slices; one slice (or none: CPU, GPU) resolves to 1.
  assert sharding.dcn_shape(_mesh_cfg(1, -1, 1), 4) == (4, 1, 1)  # A config without the fields.
  assert sharding.dcn_shape(cfg(dcn_data=-1, dcn_fsdp=1), 1) == (1, 1, 1)
  assert sharding.dcn_shape(cfg(dcn_data=2, dcn_fsdp=-1), 8) == (2, 4, 1)
  with pytest.raises(ConfigError) as e:
    sharding.dcn_shape(cfg(dcn_data=2, dcn_fsdp=1), 1)
  assert str(e.value) == (
    "config.mesh dcn_data*dcn_fsdp = 2*1 = 2 must equal the number of slices (1); "
    "set one axis to -1 to take the rest"
  )
  assert sharding.num_slices(jax.devices()) == 1


@pytest.mark.parametrize(
  "dcn, message",
  [
    ((0, 1), "config.mesh.dcn_data=0 is invalid: must be a positive integer or -1 (all remaining slices)"),
    (
      (1, 1.5),
      "config.mesh.dcn_fsdp=1.5 is invalid: must be a positive integer or -1 (all remaining slices)",
    ),
    ((-1, -1), "config.mesh={'dcn_data': -1, 'dcn_fsdp': -1} is invalid: at most one of dcn_data/dcn_fsdp"),
  ],
)
def test_validate_names_the_dcn_field(debug_config, dcn, message):
  with debug_config.mesh.ignore_type():
    debug_config.mesh.update(dcn_data=dcn[0], dcn_fsdp=dcn[1])
  with pytest.raises(errors.ConfigError) as e:
    sharding.validate(debug_config)
  assert str(e.value).startswith(message)

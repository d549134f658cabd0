"""Device mesh, logical-axis rules and the helpers that place arrays on them.

Parameters carry logical axis names (model.py); `config.mesh.rules` maps them
to the mesh axes `data`, `fsdp`, `tensor`. Changing FSDP / tensor-parallel
layouts is a config change, not a code change.

Multi-slice TPU jobs (devices with several `slice_index` values) get a hybrid
mesh (jax.experimental.mesh_utils.create_hybrid_device_mesh): `mesh.data`,
`mesh.fsdp` and `mesh.tensor` lay out the chips of one slice over its ICI,
and `mesh.dcn_data` x `mesh.dcn_fsdp` the slices over the data-centre
network, so the mesh's data axis is data x dcn_data and its fsdp axis fsdp x
dcn_fsdp. Data parallelism then crosses slices (one gradient reduction per
step over DCN) while FSDP's gathers and tensor parallelism stay inside a
slice. The axes, and so the logical rules, are the same as on one slice.
"""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import NamedSharding, PartitionSpec

from gpt_jax import errors
from gpt_jax.errors import ConfigError

AXES = ("data", "fsdp", "tensor")
# Slices along the data and fsdp axes (multi-slice TPU jobs); -1 = all remaining slices.
DCN_AXES = ("dcn_data", "dcn_fsdp")
_DCN_DEFAULTS = {"dcn_data": -1, "dcn_fsdp": 1}


def validate(config) -> None:
  """config.mesh: axis sizes (one may be -1) and tensor parallelism that splits whole heads."""
  for a in AXES:
    v = config.mesh[a]
    if isinstance(v, bool) or not isinstance(v, int) or (v <= 0 and v != -1):
      errors.fail(f"mesh.{a}", v, "must be a positive integer or -1 (all remaining devices)")
  if sum(config.mesh[a] == -1 for a in AXES) > 1:
    errors.fail("mesh", {a: config.mesh[a] for a in AXES}, "at most one of data/fsdp/tensor may be -1")
  dcn = _dcn(config.mesh)
  for a, v in zip(DCN_AXES, dcn):
    if isinstance(v, bool) or not isinstance(v, int) or (v <= 0 and v != -1):
      errors.fail(f"mesh.{a}", v, "must be a positive integer or -1 (all remaining slices)")
  if dcn.count(-1) > 1:
    errors.fail("mesh", dict(zip(DCN_AXES, dcn)), "at most one of dcn_data/dcn_fsdp may be -1")
  if config.model.num_heads % max(config.mesh.tensor, 1):
    errors.fail("mesh.tensor", config.mesh.tensor, f"must divide model.num_heads={config.model.num_heads}")


def _dcn(mesh_cfg) -> list:
  """[dcn_data, dcn_fsdp]; a config.json written before multi-slice meshes has neither."""
  return [mesh_cfg.get(a, _DCN_DEFAULTS[a]) for a in DCN_AXES]


def _resolve(sizes: list[int], total: int, names: tuple[str, ...], what: str) -> tuple[int, ...]:
  """Gives the -1 entry what the others leave of `total`; their product must equal it."""
  sizes = list(sizes)
  fixed = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if total % fixed:
      raise ConfigError(
        f"config.mesh={dict(zip(names, sizes))} cannot cover {total} {what}: "
        f"{total} is not divisible by {fixed}"
      )
    sizes[sizes.index(-1)] = total // fixed
  if int(np.prod(sizes)) != total:
    raise ConfigError(
      f"config.mesh {'*'.join(names)} = {'*'.join(map(str, sizes))} = {int(np.prod(sizes))} "
      f"must equal the number of {what} ({total}); set one axis to -1 to take the rest"
    )
  return tuple(sizes)


def mesh_shape(mesh_cfg, num_devices: int, what: str = "devices") -> tuple[int, int, int]:
  """Resolves the -1 axis of data/fsdp/tensor; the product must equal the device count."""
  names = ("data", "fsdp", "tensor")
  return _resolve([mesh_cfg[a] for a in AXES], num_devices, names, what)


def dcn_shape(mesh_cfg, num_slices: int) -> tuple[int, int, int]:
  """Slices along (data, fsdp, tensor): dcn_data x dcn_fsdp must be the slice count."""
  dcn = _resolve(_dcn(mesh_cfg), num_slices, DCN_AXES, "slices")
  return (*dcn, 1)


def num_slices(devices) -> int:
  """TPU slices among `devices` (1 where devices have no slice_index: CPU, GPU)."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  devices = list(jax.devices() if devices is None else devices)
  slices = num_slices(devices)
  dcn = dcn_shape(mesh_cfg, slices)
  what = "devices" if slices == 1 else f"devices in each of the {slices} slices"
  ici = mesh_shape(mesh_cfg, len(devices) // slices, what)
  # Auto axes: sharding is propagated by XLA from our logical constraints
  # (jax.make_mesh defaults to Explicit axes, which logical rules don't drive).
  auto = (jax.sharding.AxisType.Auto,) * len(AXES)
  if slices == 1:
    return jax.make_mesh(ici, AXES, axis_types=auto, devices=devices)
  # Each slice laid out over its ICI torus, the slices stacked along data / fsdp.
  array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
  return jax.sharding.Mesh(array, AXES, axis_types=auto)


def rules(config) -> tuple:
  return tuple((name, tuple(ax) if isinstance(ax, list) else ax) for name, ax in config.mesh.rules)


def _divisible_spec(spec: PartitionSpec, shape, mesh) -> PartitionSpec:
  """Drops mesh axes that do not divide a dimension (e.g. vocab 50257 over 2).

  jit refuses uneven shardings of its inputs/outputs; such a dimension is
  replicated instead, which the planner reports.
  """
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
    out.append(axes if dim % size == 0 else None)
  return PartitionSpec(*out)


def logical_to_shardings(logical_specs, abstract_tree, mesh, axis_rules):
  """NamedShardings for a tree of logical PartitionSpecs and matching shapes."""
  mesh_specs = nn.logical_to_mesh(logical_specs, axis_rules)
  return jax.tree.map(
    lambda spec, x: NamedSharding(mesh, _divisible_spec(spec, x.shape, mesh)),
    mesh_specs,
    abstract_tree,
    is_leaf=lambda x: isinstance(x, PartitionSpec),
  )


def undivided_dims(logical_specs, abstract_tree, mesh, axis_rules) -> list[str]:
  """Human-readable list of parameter dims left replicated by `_divisible_spec`."""
  mesh_specs = nn.logical_to_mesh(logical_specs, axis_rules)
  notes = []
  flat_specs = jax.tree_util.tree_leaves_with_path(mesh_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
  for (path, spec), x in zip(flat_specs, jax.tree.leaves(abstract_tree)):
    kept = _divisible_spec(spec, x.shape, mesh)
    for dim, (want, got) in enumerate(zip(tuple(spec) + (None,) * 8, tuple(kept) + (None,) * 8)):
      if want is not None and got is None and dim < len(x.shape):
        notes.append(f"{jax.tree_util.keystr(path)} dim {dim} ({x.shape[dim]}) not divisible by {want}")
  return notes


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) dimension split over data x fsdp; the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def global_batch(local_batch: dict, mesh) -> dict:
  """Assembles per-process numpy batches into global jax.Arrays (multi-host safe)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


@contextlib.contextmanager
def activate(mesh, axis_rules):
  """Mesh + logical rules for tracing: with_logical_constraint needs both."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules):
    yield


def params_mesh(params):
  """The mesh a params tree is sharded over, or None (unsharded / single device)."""
  for leaf in jax.tree.leaves(params):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding):
      return sharding.mesh
  return None


def describe(mesh) -> str:
  slices = num_slices(mesh.devices.flat)
  where = f"{mesh.devices.size} devices" + (f" in {slices} slices" if slices > 1 else "")
  return " x ".join(f"{a}={mesh.shape[a]}" for a in AXES) + f" ({where})"


def log_undivided(logical_specs, abstract_tree, mesh, axis_rules) -> None:
  for note in undivided_dims(logical_specs, abstract_tree, mesh, axis_rules):
    logging.warning("replicated instead of sharded: %s", note)

"""Device mesh, logical-axis rules and host-local <-> global array helpers.

This is the only module that knows how logical axis names (used by models)
map onto mesh axes. One rule set serves data parallelism, FSDP and tensor
parallelism: the mesh shape decides which of them is active.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("embed_out", None),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("classes", None),
    # activations
    ("act_batch", BATCH_AXES),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Fills a -1 entry so that the product equals `num_devices`.

  The sizes themselves (positive or a single -1) are `jaxfm.config.validate_mesh`'s rule.
  """
  shape = tuple(int(s) for s in shape)
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if known < 1 or num_devices % known:
      raise ValueError(f"mesh shape {shape}: {num_devices} devices are not divisible by {known}")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh shape {shape} needs {math.prod(shape)} devices, "
                     f"but {num_devices} are available")
  return shape


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all devices)."""
  devices = list(jax.devices() if devices is None else devices)
  resolved = resolve_mesh_shape(shape, len(devices))
  # Auto axes: XLA's sharding propagation (GSPMD) fills in what the rules leave open.
  return jax.make_mesh(resolved, MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def _mesh_spec(shape: Sequence[int], names: Sequence[str | None], mesh: Mesh,
               rules: Sequence[tuple[str, Any]]) -> PartitionSpec:
  """Maps logical names to mesh axes, replicating dimensions the mesh doesn't divide."""
  spec = nn.logical_to_mesh_axes(tuple(names), rules)
  axes = []
  for dim, mesh_axes in zip(shape, spec):
    group = () if mesh_axes is None else (
        (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes))
    size = math.prod(mesh.shape[a] for a in group)
    axes.append(mesh_axes if size == 1 or dim % size == 0 else None)
  return PartitionSpec(*axes)


def logical_shardings(abstract_tree: Any, mesh: Mesh,
                      rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> Any:
  """NamedShardings for a (boxed, abstract) tree from `jax.eval_shape(model.init, ...)`.

  Leaves without logical names (step counters, RNG keys, optimizer scalars) are
  replicated. A dimension that the mapped mesh axes do not divide is replicated
  rather than failing (e.g. vocab 30,522 over tensor=4).
  """
  def to_sharding(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      return NamedSharding(mesh, _mesh_spec(leaf.value.shape, leaf.names, mesh, rules))
    return NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(to_sharding, abstract_tree,
                      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


@contextlib.contextmanager
def activation_sharding(mesh: Mesh,
                        rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> Iterator[None]:
  """Context under which models' logical activation constraints bind to `mesh`."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data-parallel axes."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles per-process numpy slices into global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """This process's share of a global batch, after checking that it splits evenly over the
  data-parallel shards of `mesh` and over the processes.

  Raises:
    ValueError: saying what it does not split over (the caller names the batch).
  """
  shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
  if global_batch_size % shards:
    raise ValueError(f"does not split over the {shards} data-parallel shards "
                     "(mesh.data x mesh.fsdp)")
  if global_batch_size % jax.process_count():
    raise ValueError(f"is not divisible by the {jax.process_count()} processes")
  return global_batch_size // jax.process_count()


def describe(mesh: Mesh) -> str:
  """One line on the topology, for the start-of-run log."""
  return (f"{jax.process_count()} process(es), {jax.local_device_count()} local / "
          f"{jax.device_count()} global {jax.devices()[0].platform} devices, "
          f"mesh {dict(mesh.shape)}")


def unbox(tree: Any) -> Any:
  """Strips logical-partitioning metadata boxes."""
  return nn.meta.unbox(tree)



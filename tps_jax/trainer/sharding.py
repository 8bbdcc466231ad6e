"""A (data, fsdp) device mesh and the shardings of the batch, parameters and optimizer state.

Rules: the batch is split over every device (data x fsdp); an array of at least
`min_size` elements is split over `fsdp` along its largest dimension that
divides evenly; everything else (biases, norms, small arrays, scalars) is
replicated. Optimizer moments have their parameters' shapes and get the same
layouts.
"""

from __future__ import annotations

from absl import logging
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp")
BATCH = P(AXES)


def make_mesh(data: int = -1, fsdp: int = 1, devices=None,
              num_devices: int = 0) -> jax.sharding.Mesh:
  """A (data, fsdp) mesh over all devices (or the first `num_devices`); data=-1 takes what
  fsdp leaves."""
  devices = list(devices if devices is not None else jax.devices())
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(f"mesh asks for {num_devices} devices, only {len(devices)} exist.")
    devices = devices[:num_devices]
  n = len(devices)
  if fsdp < 1 or n % fsdp:
    raise ValueError(f"mesh fsdp={fsdp} does not divide the {n} devices.")
  data = n // fsdp if data == -1 else data
  if data * fsdp != n:
    raise ValueError(f"mesh data={data} x fsdp={fsdp} = {data * fsdp} devices, but there "
                     f"are {n}.")
  return jax.make_mesh((data, fsdp), AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, BATCH)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def spec_for(shape: tuple[int, ...], fsdp: int, min_size: int = 2**14) -> P:
  """The rule for one array shape."""
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      return P(*([None] * dim + ["fsdp"]))
  logging.warning("fsdp: no dimension of shape %s divides over %d devices; this array of "
                  "%d elements is replicated on every device.", shape, fsdp,
                  int(np.prod(shape, dtype=np.int64)))
  return P()


def tree_shardings(tree, mesh, min_size: int = 2**14):
  """NamedShardings for every leaf of a tree of arrays or ShapeDtypeStructs."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, spec_for(tuple(x.shape), fsdp, min_size)),
                      tree)

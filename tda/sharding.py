"""Sharding, declared in one place: the mesh from the config and the logical axes.

Every jitted kernel takes its shardings from here. Axis names:
  DATA  — examples (passages, queries, table rows) are split over it;
  MODEL — parameters of large models (FSDP-style on their largest axis).
On CPU, `--xla_force_host_platform_device_count=N` gives N devices, so the same
sharded code runs in tests.
"""

from __future__ import annotations

from typing import Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"
MODEL = "model"


def mesh_shape(axes: Sequence[tuple[str, int]], n_devices: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """Resolves one -1 entry and checks the mesh divides the device count."""
  names = tuple(a for a, _ in axes)
  sizes = [int(s) for _, s in axes]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh.axes {tuple(axes)} has more than one -1 entry")
  fixed = int(np.prod([s for s in sizes if s != -1]))
  if fixed <= 0 or n_devices % fixed:
    raise ValueError(
        f"mesh.axes {tuple(axes)} does not divide the {n_devices} available devices")
  sizes = [n_devices // fixed if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != n_devices:
    raise ValueError(
        f"mesh.axes {tuple(axes)} resolves to {sizes} = {int(np.prod(sizes))} devices, "
        f"but {n_devices} are available")
  return names, tuple(sizes)


def make_mesh(config: ml_collections.ConfigDict | None = None, *,
              axes: Sequence[tuple[str, int]] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The device mesh declared by `config.mesh.axes` (or `axes`)."""
  if axes is None:
    axes = config.mesh.axes if config is not None else ((DATA, -1), (MODEL, 1))
  devices = list(jax.devices() if devices is None else devices)
  names, sizes = mesh_shape(axes, len(devices))
  return Mesh(np.asarray(devices).reshape(sizes), names,
              axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (example) axis over DATA, the rest replicated."""
  return NamedSharding(mesh, P(DATA, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_spec(shape: tuple[int, ...], mesh: Mesh) -> P:
  """FSDP-style: shard a parameter's largest divisible axis over MODEL."""
  size = mesh.shape.get(MODEL, 1)
  if size == 1 or not shape:
    return P()
  for ax in np.argsort(shape)[::-1]:
    if shape[ax] % size == 0:
      spec = [None] * len(shape)
      spec[ax] = MODEL
      return P(*spec)
  return P()


def param_shardings(params_shape, mesh: Mesh):
  return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(x.shape, mesh)), params_shape)


def pad_to_multiple(n: int, mesh: Mesh) -> int:
  """Smallest batch >= n that divides evenly over the DATA axis."""
  m = mesh.shape.get(DATA, 1)
  return -(-n // m) * m

"""Sharding, declared in one place: the mesh from the config and the logical axes.

Every jitted kernel takes its shardings from here. Axis names:
  DATA  — examples (passages, queries, table rows) are split over it;
  MODEL — parameters of large models, tensor-parallel (`PARAM_RULES`); their
          other axis is FSDP-split over DATA for storage and gathered to compute.
On CPU, `--xla_force_host_platform_device_count=N` gives N devices, so the same
sharded code runs in tests.
"""

from __future__ import annotations

import collections
import logging
import re
from typing import Mapping, Sequence

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


def process_mesh(config: ml_collections.ConfigDict) -> Mesh:
  """The config's mesh over this process's own devices: where a restored checkpoint
  lives and where featurisation runs (each process featurises its own rows)."""
  return make_mesh(config, devices=jax.local_devices())


def strict(config: ml_collections.ConfigDict) -> bool:
  """`mesh.strict_param_sharding`: a mesh axis that does not divide a parameter
  dimension is an error (else that dimension is replicated)."""
  return bool(config.mesh.get("strict_param_sharding", False))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (example) axis over DATA, the rest replicated."""
  return NamedSharding(mesh, P(DATA, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def r_sharding(mesh: Mesh) -> NamedSharding:
  """The Gauss-Newton R [d, d] (`tda.hessian.r_accumulate`): rows over DATA, columns
  over MODEL (65,536² float32 = 16 GiB in all; on `r_mesh` over v5e-256, 64 × 4, a
  1,024 × 16,384 tile, 64 MiB, per chip)."""
  return NamedSharding(mesh, P(DATA, MODEL))


def r_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh R (`tda.hessian.r_accumulate`) is accumulated on: `devices` (default
  every device of every process) as DATA × MODEL with MODEL = one process's devices.

  Each process's devices are then whole MODEL rows, so the DATA shards a process
  holds are its own: every process adds its own φ rows (a MODEL axis spanning
  processes would make processes sharing a DATA shard supply the same rows). 65,536²
  on v5e-256 (64 hosts × 4 chips): 64 × 4, a 1,024 × 16,384 float32 tile (64 MiB)
  per chip.
  """
  devices = sorted(jax.devices() if devices is None else devices,
                   key=lambda d: (d.process_index, d.id))
  per_process = collections.Counter(d.process_index for d in devices)
  if len(set(per_process.values())) != 1:
    raise ValueError(f"processes hold different numbers of devices: {dict(per_process)}")
  local = next(iter(per_process.values()))
  return make_mesh(axes=((DATA, -1), (MODEL, local)), devices=devices)


def r_side_multiple(mesh_shape: Mapping[str, int]) -> int:
  """What R's side is padded to so that `r_sharding` splits it evenly on a mesh of
  this shape (`mesh.shape`)."""
  return int(np.lcm(mesh_shape.get(DATA, 1), mesh_shape.get(MODEL, 1)))


# --- Parameter sharding rules ---------------------------------------------------
#
# One rule per parameter kind: a pattern over the parameter's '/'-joined path and,
# per axis of the parameter, the mesh axis it is split over (None: replicated).
# Tensor parallelism (Megatron-style) over MODEL: the vocabulary (of the embedding
# and of an untied head), the output features of the column-parallel projections
# (q, k, v, gate, up) and the input features of the row-parallel ones (o, down).
# FSDP over DATA: the other (d_model) axis of every matrix; the kernels all-gather
# it before computing (`gathered`), so DATA only divides what each device *stores*. Norm scales are
# small and replicated. The first matching rule wins; a parameter no rule matches
# is an error (add a rule here).
#
#   parameter                         shape                 axes
#   embed/embedding                   [vocab, d_model]      (MODEL, DATA)
#   lm_head/kernel (untied head)      [d_model, vocab]      (DATA, MODEL)
#   attn/{q,k,v}/kernel               [d_model, heads*hd]   (DATA, MODEL)
#   attn/o/kernel                     [heads*hd, d_model]   (MODEL, DATA)
#   mlp/{gate,up}/kernel              [d_model, d_ff]       (DATA, MODEL)
#   mlp/down/kernel                   [d_ff, d_model]       (MODEL, DATA)
#   */scale (RMSNorm)                 [d_model]             (None,)
PARAM_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"(^|/)embedding$", (MODEL, DATA)),
    (r"(^|/)lm_head/kernel$", (DATA, MODEL)),
    (r"(^|/)attn/(q|k|v)/kernel$", (DATA, MODEL)),
    (r"(^|/)attn/o/kernel$", (MODEL, DATA)),
    (r"(^|/)mlp/(gate|up)/kernel$", (DATA, MODEL)),
    (r"(^|/)mlp/down/kernel$", (MODEL, DATA)),
    (r"(^|/)scale$", (None,)),
)


def _dict_keys(key_path) -> tuple[str, ...]:
  """The dict keys of a pytree key path (attribute and sequence steps dropped)."""
  return tuple(str(k.key) for k in key_path if isinstance(k, jax.tree_util.DictKey))


def _last_attr(key_path) -> str | None:
  names = [k.name for k in key_path if isinstance(k, jax.tree_util.GetAttrKey)]
  return names[-1] if names else None


def param_spec(path: str, shape: Sequence[int], mesh: Mesh, *, strict: bool = False) -> P:
  """The PartitionSpec of the parameter at `path` ('layer_0/attn/q/kernel').

  The axes come from the first rule of `PARAM_RULES` whose pattern matches `path`.
  A mesh axis of size 1 (or absent from the mesh) is dropped. A mesh axis that does
  not divide its dimension is an error naming the parameter, the dimension and the
  axis when `strict` (config `mesh.strict_param_sharding`); otherwise that axis
  alone falls back to replication, with a warning.

  Raises:
    ValueError: no rule matches, the rule's rank differs from the parameter's, or
      (strict) a mesh axis does not divide a dimension.
  """
  for pattern, axes in PARAM_RULES:
    if re.search(pattern, path):
      break
  else:
    raise ValueError(f"no sharding rule for parameter {path!r} {tuple(shape)}; add one "
                     "to tda.sharding.PARAM_RULES")
  if len(axes) != len(shape):
    raise ValueError(f"sharding rule {pattern!r} gives {len(axes)} axes {axes} but "
                     f"parameter {path!r} has shape {tuple(shape)}")
  spec = []
  for dim, (n, axis) in enumerate(zip(shape, axes)):
    size = mesh.shape.get(axis, 1) if axis is not None else 1
    if size == 1:
      spec.append(None)
    elif n % size:
      msg = (f"mesh axis {axis!r} (size {size}) does not divide dimension {dim} "
             f"(size {n}) of parameter {path!r} {tuple(shape)}")
      if strict:
        raise ValueError(msg + "; change mesh.axes or set mesh.strict_param_sharding=False "
                         "to replicate that dimension")
      logging.warning("%s: replicating that dimension", msg)
      spec.append(None)
    else:
      spec.append(axis)
  return P(*spec)


def param_shardings(abstract_tree, mesh: Mesh, *, params=None, strict: bool = False):
  """NamedShardings, by `PARAM_RULES`, for a parameter tree or any tree that holds
  per-parameter statistics (an optimizer state, a `TrainState`, {'params': ...,
  'opt_state': ...}).

  `params` is the parameter tree (shapes suffice); by default `abstract_tree`
  itself. Each leaf is matched to the parameter whose dict-key path is the longest
  suffix of the leaf's dict-key path (so `opt_state[1][0].v_row['layer_0']['mlp']
  ['up']['kernel']` belongs to `layer_0/mlp/up/kernel`), then:
    * same shape as its parameter (the parameter itself, Adam's mu and nu,
      Adafactor's unfactored v): the parameter's spec;
    * Adafactor's factored statistics (`tda.correction.factored_axes`: d0 the
      largest axis, d1 the second): `v_row` (d0 reduced away) takes the parameter's
      spec without axis d0, `v_col` without axis d1;
    * anything else (step counts, Adafactor's (1,) placeholders, leaves of no
      parameter): replicated.
  A leaf's mesh axes are always its parameter's, so divisibility is checked once,
  on the parameter (see `param_spec`).
  """
  params = abstract_tree if params is None else params
  specs = {}
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = _dict_keys(key_path)
    specs[keys] = (tuple(leaf.shape), param_spec("/".join(keys), leaf.shape, mesh,
                                                 strict=strict))
  rep = P()

  def one(key_path, leaf):
    keys = _dict_keys(key_path)
    shape = tuple(getattr(leaf, "shape", ()))
    for i in range(len(keys)):
      if keys[i:] in specs:
        p_shape, spec = specs[keys[i:]]
        break
    else:
      return NamedSharding(mesh, rep)
    if shape == p_shape:
      return NamedSharding(mesh, spec)
    attr = _last_attr(key_path)
    if attr in ("v_row", "v_col") and len(p_shape) >= 2:
      order = np.argsort(p_shape)   # As optax's Adafactor (and factored_axes).
      d1, d0 = int(order[-2]), int(order[-1])
      drop = d0 if attr == "v_row" else d1
      if shape == p_shape[:drop] + p_shape[drop + 1:]:
        return NamedSharding(mesh, P(*(a for j, a in enumerate(_padded(spec, p_shape))
                                       if j != drop)))
    return NamedSharding(mesh, rep)

  return jax.tree_util.tree_map_with_path(one, abstract_tree)


def _padded(spec: P, shape) -> tuple:
  return tuple(spec) + (None,) * (len(shape) - len(spec))


def gathered(s: NamedSharding) -> NamedSharding:
  """`s` with DATA dropped: the layout a kernel computes with (FSDP all-gathers the
  DATA-split axis; MODEL stays split)."""
  spec = tuple(None if a == DATA else a for a in s.spec)
  return NamedSharding(s.mesh, P(*spec))


def gather(tree):
  """Each NamedSharding'd jax.Array of `tree` moved to `gathered(its sharding)` (the
  compute layout: DATA all-gathered, MODEL kept); other leaves unchanged.

  For computations outside the sharded kernels (model evaluation, the optimizer
  corrections): on a mesh without a MODEL split they then run replicated, with the
  same reduction order as on one device whatever the DATA split (XLA:CPU may still
  round a replicated program and a one-device program differently: up to 1e-7
  relative seen in the corrections). The copy costs a 1/MODEL share of the tree per
  device.
  """
  def one(x):
    s = getattr(x, "sharding", None)
    return jax.device_put(x, gathered(s)) if isinstance(s, NamedSharding) else x
  return jax.tree.map(one, tree)


def addressable_bytes(tree) -> dict[jax.Device, int]:
  """Bytes of a tree of jax.Arrays held on each addressable device."""
  out: dict[jax.Device, int] = {}
  for x in jax.tree.leaves(tree):
    for shard in x.addressable_shards:
      out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
  return out


def pad_to_multiple(n: int, mesh: Mesh) -> int:
  """Smallest batch >= n that divides evenly over the DATA axis."""
  m = mesh.shape.get(DATA, 1)
  return -(-n // m) * m

"""The TPU slices we plan and compile for: chips, HBM and peak FLOP/s per chip.

Names are Cloud's (v4/v5p count TensorCores, two per megacore chip; v5e counts
chips). `tda.compile_check` compiles for them on compile-only devices;
`tda.plan` estimates chip-hours on them.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Topology:
  """A TPU slice, as `jax.experimental.topologies.get_topology_desc` names it."""
  topology_name: str          # e.g. 'v5e:16x16'.
  chip_config_name: str       # 'default' (one core per chip) or 'megacore'.
  wrap: tuple[bool, bool, bool]
  accelerator_type: str       # TPU_ACCELERATOR_TYPE for libtpu.
  hbm_gib: float              # Per chip.
  peak_bf16_tflops: float     # Per chip.
  chips: int


def _v5e(x, y, wrap=False):
  return Topology(f"v5e:{x}x{y}", "default", (wrap, wrap, False), f"v5litepod-{x * y}",
                  16.0, 197.0, x * y)


def _cube(gen, cores_name, x, y, z, hbm, tflops, wrap=False):
  return Topology(f"{gen}:{x}x{y}x{z}", "megacore", (wrap, wrap, wrap),
                  f"{cores_name}-{2 * x * y * z}", hbm, tflops, x * y * z)


TOPOLOGIES: dict[str, Topology] = {
    "v5e-4": _v5e(2, 2), "v5e-8": _v5e(2, 4), "v5e-16": _v5e(4, 4),
    "v5e-64": _v5e(8, 8), "v5e-256": _v5e(16, 16, wrap=True),
    "v4-8": _cube("v4", "v4", 2, 2, 1, 32.0, 275.0),
    "v4-32": _cube("v4", "v4", 2, 2, 4, 32.0, 275.0),
    "v4-128": _cube("v4", "v4", 4, 4, 4, 32.0, 275.0, wrap=True),
    "v4-512": _cube("v4", "v4", 4, 4, 16, 32.0, 275.0, wrap=True),
    "v5p-8": _cube("v5", "v5p", 2, 2, 1, 95.0, 459.0),
    "v5p-32": _cube("v5", "v5p", 2, 2, 4, 95.0, 459.0),
    "v5p-128": _cube("v5", "v5p", 4, 4, 4, 95.0, 459.0, wrap=True),
    "v5p-512": _cube("v5", "v5p", 4, 4, 16, 95.0, 459.0, wrap=True),
}
CPU = "cpu"  # Host devices: mesh-shape checks only.

# The slices that are one host (one TPU VM): v5e-4/8 are single hosts; the larger
# v5e slices and every v4/v5p slice are built of 4-chip hosts.
_ONE_HOST = {"v5e": ("v5e-4", "v5e-8"), "v4": ("v4-8",), "v5p": ("v5p-8",)}


def host_slice(name: str) -> str:
  """The one-host slice with the chips of one host of slice `name`: where a
  per-process program (featurisation, search) is compiled, since libtpu compiles a
  v5e program only for a whole slice's devices."""
  get(name)
  one = _ONE_HOST[name.split("-")[0]]
  return name if name in one else one[0]


def get(name: str) -> Topology:
  """The slice called `name` (a key of TOPOLOGIES)."""
  if name not in TOPOLOGIES:
    raise ValueError(f"unknown topology {name!r}; known: {', '.join(TOPOLOGIES)} "
                     f"(or {CPU!r} for the host's CPU devices)")
  return TOPOLOGIES[name]

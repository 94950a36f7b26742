"""One process of `test_multihost.test_r_train_is_summed_on_the_global_mesh`: this
process's share of φ rows, R accumulated on a mesh over every process's devices."""

import os
import sys

import numpy as np


def rows(process: int) -> np.ndarray:
  """Process p's share: unequal counts, heavy-tailed scales, d = 70 (padded)."""
  rng = np.random.default_rng(100 + process)
  n = (301, 170)[process]
  return (rng.standard_t(3, size=(n, 70)) * np.geomspace(30, 0.01, 70)).astype(np.float32)


def main(out: str, axes: str) -> None:
  import jax
  from tda import distributed, hessian, sharding
  distributed.initialize(None)
  mesh = (sharding.r_mesh() if axes == "r_mesh" else
          sharding.make_mesh(axes=tuple((a, int(s)) for a, s in
                                        (x.split("=") for x in axes.split(",")))))
  r, n = hessian.autocorrelation(vectors_nd=rows(jax.process_index()), chunk=64, mesh=mesh)
  # A mesh whose MODEL axis crosses processes would need processes sharing a DATA
  # shard to supply the same rows: refused with the reason.
  crossing = sharding.make_mesh(axes=(("data", 1), ("model", 4)))
  try:
    hessian.autocorrelation(vectors_nd=rows(jax.process_index()), mesh=crossing)
    refused = ""
  except ValueError as e:
    refused = str(e)
  np.savez(out, r=r, n=n, devices=len(mesh.devices.flat), mesh=str(dict(mesh.shape)),
           refused=refused)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])

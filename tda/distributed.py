"""Multi-host set-up and the few cross-process operations the pipeline needs.

Single-process runs (the default) need nothing. A multi-process run either sets
`TDA_COORDINATOR=host:port`, `TDA_NUM_PROCESSES`, `TDA_PROCESS_ID` (e.g. several
processes on one machine, as the tests do), or `TDA_DISTRIBUTED=auto` on a TPU pod,
where `jax.distributed.initialize()` discovers everything itself.

Work split: featurisation is per process (each process owns table shards
s % num_processes == process_index and runs the kernel on its local devices); R_train
is summed on the global mesh (`tda.hessian.autocorrelation`), small statistics here; the small stages (world, vocab, train,
model_eval) and the final ones (retrieval, evaluation, viewer) run on process 0
while the others wait at a barrier.
"""

from __future__ import annotations

import os

import jax
import numpy as np


def initialize(config) -> None:
  """Initialises jax.distributed when the environment asks for it."""
  del config
  if os.environ.get("TDA_DISTRIBUTED") == "auto":
    jax.distributed.initialize()
    return
  coord = os.environ.get("TDA_COORDINATOR")
  if not coord:
    return
  try:
    n = int(os.environ["TDA_NUM_PROCESSES"])
    pid = int(os.environ["TDA_PROCESS_ID"])
  except (KeyError, ValueError) as e:
    raise ValueError("TDA_COORDINATOR is set, so TDA_NUM_PROCESSES and TDA_PROCESS_ID "
                     "must be set to integers too") from e
  if not 0 <= pid < n:
    raise ValueError(f"TDA_PROCESS_ID={pid} is not in [0, TDA_NUM_PROCESSES={n})")
  # Cross-process collectives between CPU devices (ignored by accelerator backends).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coord, num_processes=n, process_id=pid)


def is_leader() -> bool:
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """All processes reach this point before any goes on (no-op for one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def sum_across_processes(x: np.ndarray) -> np.ndarray:
  """Σ over processes of a host array, added in process order (deterministic)."""
  if jax.process_count() == 1:
    return x
  from jax.experimental import multihost_utils
  x = np.asarray(x, np.float64)
  # JAX moves float32 (x64 is off): send float64 as a float32 head + tail pair.
  hi = x.astype(np.float32)
  lo = (x - hi).astype(np.float32)
  gathered = np.asarray(multihost_utils.process_allgather(np.stack([hi, lo]), tiled=False))
  out = np.zeros_like(x)
  for part in gathered:
    out = out + (part[0].astype(np.float64) + part[1].astype(np.float64))
  return out

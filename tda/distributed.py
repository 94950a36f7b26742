"""Multi-host set-up: `jax.distributed.initialize` from the config or environment."""

from __future__ import annotations

import os

import jax


def initialize(config) -> None:
  """Initialises jax.distributed when the config or environment asks for it.

  Single-process runs (the default) do nothing. A multi-process run sets
  `TDA_COORDINATOR=host:port`, `TDA_NUM_PROCESSES`, `TDA_PROCESS_ID` (or relies on
  a TPU pod's own discovery with `TDA_DISTRIBUTED=auto`).
  """
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
  jax.distributed.initialize(coordinator_address=coord, num_processes=n, process_id=pid)

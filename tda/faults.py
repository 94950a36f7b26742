"""Fault injection for the fault tests (tests/test_faults.py); inert otherwise.

`TDA_FAULT_AT=<stage>:<point>` in the environment makes the process SIGKILL
itself (no cleanup, no exception handlers: as a lost machine) when it reaches
that point. The points:

  <stage>:commit   every stage, in `tda.pipeline.run_stage`: its outputs are
                   written into `<stage>/` and the commit has not begun;
  train:checkpoint after the first checkpoint is saved (`tda.train`);
  tables:shard     after the first table shard is committed (`tda.tables`).
"""

import os
import signal

ENV = "TDA_FAULT_AT"


def point(stage: str, name: str) -> None:
  """Kills this process if `TDA_FAULT_AT` names `<stage>:<name>`."""
  if os.environ.get(ENV) == f"{stage}:{name}":
    os.kill(os.getpid(), signal.SIGKILL)

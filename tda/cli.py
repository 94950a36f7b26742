"""The command-line convention of every script and module entry point.

absl flags; `--json` prints exactly one JSON object on stdout, on one line, and
sends everything else (progress, logs, stray prints) to stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any, Callable, Iterator, TypeVar

from absl import flags

from tda import json_values

T = TypeVar("T")


def define_json_flag() -> flags.FlagHolder[bool]:
  """Defines the boolean `--json` switch."""
  return flags.DEFINE_bool(
      "json", False, "Print one JSON object, on one line, on stdout (progress and "
      "logs go to stderr).")


def print_json(obj: Any) -> None:
  """Writes `obj` as one line of JSON on stdout (NaN and inf as null)."""
  sys.stdout.write(json.dumps(json_values.to_jsonable(obj), sort_keys=True,
                              allow_nan=False, default=str) + "\n")
  sys.stdout.flush()


@contextlib.contextmanager
def stdout_to_stderr(enabled: bool = True) -> Iterator[None]:
  """Sends whatever is written to stdout, by Python or to fd 1, to stderr.

  Wrap the work of a `--json` run in it, so that only `print_json`'s line (after
  the block) reaches stdout.
  """
  if not enabled:
    yield
    return
  sys.stdout.flush()
  saved = os.dup(1)
  os.dup2(2, 1)
  try:
    with contextlib.redirect_stdout(sys.stderr):
      yield
  finally:
    sys.stdout.flush()
    os.dup2(saved, 1)
    os.close(saved)


def emit(*, as_json: bool, measure: Callable[[], T], report: Callable[[T], None]) -> T:
  """The `--json` convention in one call: runs `measure` (its stdout sent to stderr
  when `as_json`), then prints its result, as one JSON line (`print_json`) when
  `as_json`, else with `report`. Returns the result."""
  with stdout_to_stderr(as_json):
    out = measure()
  if as_json:
    print_json(out)
  else:
    report(out)
  return out

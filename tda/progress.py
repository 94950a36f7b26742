"""One progress line per long stage: count, rate and ETA.

    with progress.bar(total=n, desc="tables", unit="passage") as bar:
      for batch in batches:
        ...
        bar.update(len(batch))

    for x in progress.iterate(xs, desc="tail-patch", unit="query"): ...

On a terminal (stderr is a TTY) this is a live tqdm line. Elsewhere (logs, CI,
files) it is an absl log line now and then (every `interval_s`, at most) and one
at the end, each with the count, the rate and the ETA, so a log file holds a few
lines per stage rather than thousands. Only process 0 of a multi-process job
reports. `set_enabled(False)` turns every bar off (e.g. for `--json` tools).
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterable, Iterator, TypeVar

from absl import logging

T = TypeVar("T")
_STATE = {"enabled": True, "interval_s": 30.0}


def set_enabled(enabled: bool) -> None:
  _STATE["enabled"] = bool(enabled)


def set_interval(seconds: float) -> None:
  """Seconds between two log lines of one bar when stderr is not a terminal."""
  _STATE["interval_s"] = float(seconds)


def _leader() -> bool:
  if "jax" not in sys.modules:
    return True
  try:
    return sys.modules["jax"].process_index() == 0
  except Exception:  # Backend not initialised yet: a single process.
    return True


def _stderr_is_tty() -> bool:
  run_output = sys.modules.get("tda.run_output")  # fd 2 may be a log filter's pipe
  return run_output.stderr_is_tty() if run_output is not None else sys.stderr.isatty()


def _fmt_time(s: float) -> str:
  if s != s or s == float("inf"):
    return "?"
  s = int(round(s))
  h, rem = divmod(s, 3600)
  m, sec = divmod(rem, 60)
  return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


class _LogBar:
  """A progress bar that writes absl log lines at intervals."""

  def __init__(self, total: int | None, desc: str, unit: str):
    self.total, self.desc, self.unit = total, desc, unit
    self.n = 0
    self.postfix = ""
    self.t_first, self.n_first = None, 0
    self.n_logged = -1
    self.t0 = self.last = time.monotonic()

  def set_postfix(self, **kwargs) -> None:
    self.postfix = ", ".join(f"{k}={v}" for k, v in kwargs.items())

  def line(self) -> str:
    now = time.monotonic()
    dt = max(now - self.t0, 1e-9)
    # The rate leaves out the first update, which usually includes compilation.
    rate = ((self.n - self.n_first) / max(now - self.t_first, 1e-9)
            if self.t_first is not None and self.n > self.n_first else self.n / dt)
    if self.total:
      eta = (self.total - self.n) / rate if rate > 0 else float("inf")
      s = (f"{self.desc}: {self.n}/{self.total} {self.unit}s ({100 * self.n / self.total:.0f}%), "
           f"{rate:.3g} {self.unit}/s, elapsed {_fmt_time(dt)}, ETA {_fmt_time(eta)}")
    else:
      s = f"{self.desc}: {self.n} {self.unit}s, {rate:.3g} {self.unit}/s, elapsed {_fmt_time(dt)}"
    return f"{s} ({self.postfix})" if self.postfix else s

  def update(self, n: int = 1) -> None:
    self.n += n
    now = time.monotonic()
    if self.t_first is None:
      self.t_first, self.n_first = now, self.n
    if now - self.last >= _STATE["interval_s"]:
      self.last, self.n_logged = now, self.n
      logging.info("%s", self.line())

  def close(self) -> None:
    if self.n and self.n != self.n_logged:
      logging.info("%s", self.line())


class _NoBar:
  n = 0

  def update(self, n: int = 1) -> None:
    self.n += n

  def set_postfix(self, **kwargs) -> None:
    pass

  def close(self) -> None:
    pass


def start(*, total: int | None, desc: str, unit: str = "it", enabled: bool = True):
  """A started progress bar with `.update(n)`, `.set_postfix(**kw)` and `.close()`."""
  if not enabled or not _STATE["enabled"] or not _leader():
    return _NoBar()
  if _stderr_is_tty():
    import tqdm
    return tqdm.tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False,
                     file=sys.stderr)
  return _LogBar(total, desc, unit)


@contextlib.contextmanager
def bar(*, total: int | None, desc: str, unit: str = "it", enabled: bool = True) -> Iterator:
  """`start` as a context manager (closed on exit); see the module docstring."""
  b = start(total=total, desc=desc, unit=unit, enabled=enabled)
  try:
    yield b
  finally:
    b.close()


def iterate(items: Iterable[T], *, desc: str, total: int | None = None,
            unit: str = "it") -> Iterator[T]:
  """Yields `items` with a progress bar (total from len() when not given)."""
  if total is None and hasattr(items, "__len__"):
    total = len(items)  # type: ignore[arg-type]
  with bar(total=total, desc=desc, unit=unit) as b:
    for x in items:
      yield x
      b.update(1)

"""tda.progress off a terminal: a few log lines with count, rate and ETA."""

import logging

import pytest

from tda import progress


@pytest.fixture
def fast_interval():
  progress.set_interval(0.0)
  yield
  progress.set_interval(30.0)


def test_log_lines_have_count_rate_eta(caplog, fast_interval):
  caplog.set_level(logging.INFO)
  with progress.bar(total=4, desc="tables", unit="passage") as b:
    for i in range(4):
      if i == 3:
        b.set_postfix(loss="0.5")
      b.update(1)
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("tables:")]
  assert lines[0].startswith("tables: 1/4 passages (25%), ")
  assert lines[-1].startswith("tables: 4/4 passages (100%), ")
  assert all("passage/s" in l and "ETA" in l for l in lines)
  assert lines[-1].endswith("(loss=0.5)")


def test_interval_bounds_the_number_of_lines(caplog):
  caplog.set_level(logging.INFO)
  assert list(progress.iterate(range(1000), desc="retrieval", unit="query")) == list(range(1000))
  lines = [r for r in caplog.records if r.getMessage().startswith("retrieval:")]
  assert len(lines) == 1 and "1000/1000" in lines[0].getMessage()  # the closing line only


def test_disabled_bar_is_silent(caplog, fast_interval):
  caplog.set_level(logging.INFO)
  progress.set_enabled(False)
  try:
    for _ in progress.iterate(range(5), desc="quiet"):
      pass
  finally:
    progress.set_enabled(True)
  assert not [r for r in caplog.records if r.getMessage().startswith("quiet")]

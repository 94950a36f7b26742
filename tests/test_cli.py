"""Tests for tda.cli: one JSON line on stdout, everything else on stderr."""

import json
import os
import sys

import numpy as np

from tda import cli


def test_print_json_writes_one_line_with_nan_as_null(capsys):
  cli.print_json({"b": np.float32(0.5), "a": [float("nan"), np.int64(3)], "c": {"d": 1}})
  out = capsys.readouterr().out
  assert out.count("\n") == 1 and out.endswith("\n")
  assert json.loads(out) == {"a": [None, 3], "b": 0.5, "c": {"d": 1}}


def test_stdout_to_stderr_moves_python_and_fd_writes_off_stdout(capfd):
  with cli.stdout_to_stderr():
    print("from python")
    sys.stdout.flush()
    os.write(1, b"from fd 1\n")  # As a C library or a subprocess would write.
  cli.print_json({"ok": True})
  out, err = capfd.readouterr()
  assert out == '{"ok": true}\n'
  assert "from python" in err and "from fd 1" in err


def test_stdout_to_stderr_disabled_leaves_stdout_alone(capfd):
  with cli.stdout_to_stderr(enabled=False):
    print("table row")
  assert capfd.readouterr().out == "table row\n"


def test_emit_prints_one_json_line_or_the_report(capfd):
  def measure():
    print("progress")
    return {"x": 1.5}

  assert cli.emit(as_json=True, measure=measure, report=lambda r: print("table")) == {"x": 1.5}
  out, err = capfd.readouterr()
  assert out == '{"x": 1.5}\n' and "progress" in err and "table" not in out + err
  assert cli.emit(as_json=False, measure=measure, report=lambda r: print("table", r["x"])) == {
      "x": 1.5}
  out, err = capfd.readouterr()
  assert out == "progress\ntable 1.5\n" and err == ""

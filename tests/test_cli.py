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

"""Mistakes a user makes end `python -m tda.run` with one clear message and status 2.

Each case runs the real entry point in a subprocess (the three in parallel): a
mistyped config key, a bad data file, a workdir committed from another setup.
"""

import json
import os
import subprocess
import sys

import pytest

from tda import errors
from tda import workdir as wd

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "byo")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cmd(workdir, *overrides):
  return [sys.executable, "-m", "tda.run", "--config=configs/trackstar_tiny.py:runlocal",
          f"--workdir={workdir}", *overrides]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("user_errors")
  bad = tmp / "corpus.jsonl"
  bad.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "text": \n')
  other = tmp / "W_other"
  os.makedirs(other / "world")
  wd.write_json(str(other / "world" / wd.MARKER), {"fingerprint": {"seed": -1}})
  cases = {
      "typo": _cmd(tmp / "W_typo", "--config.hessian.lamda=0.5"),
      "bad_data": _cmd(tmp / "W_bad", "--config.stages=world", "--config.world.source=byo",
                       f"--config.world.byo_corpus={bad}",
                       f"--config.world.byo_facts={FIXTURES}/facts.jsonl",
                       f"--config.world.byo_sentences={FIXTURES}/sentences.jsonl"),
      "other_setup": _cmd(other, "--config.stages=world"),
      "typo_verbose": _cmd(tmp / "W_typo", "--config.hessian.lamda=0.5", "--verbosity=1"),
  }
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  procs = {k: subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for k, c in cases.items()}
  out = {}
  for k, p in procs.items():
    stdout, stderr = p.communicate(timeout=600)
    out[k] = (p.returncode, stdout + stderr)
  return out, bad, other


@pytest.mark.slow  # Three `python -m tda.run` subprocesses.
@pytest.mark.parametrize("case,expected", [
    ("typo", ['bad config override --config.hessian.lamda=0.5', 'Did you mean "lambda_"']),
    ("bad_data", ["corpus.jsonl:2: bad JSON"]),
    ("other_setup", ["stage 'world'", "was committed from a different setup",
                     "use a new --workdir or delete"]),
])
def test_user_error_is_one_message_and_status_2(results, case, expected):
  out, bad, other = results
  rc, text = out[case]
  assert rc == errors.EXIT_USER_ERROR, text
  assert "Traceback" not in text, text
  error_lines = [l for l in text.splitlines() if l.startswith("error: ")]
  assert len(error_lines) == 1, text
  for e in expected:
    assert e in error_lines[0], text
  if case == "bad_data":
    assert str(bad) in error_lines[0]
  if case == "other_setup":  # Nothing written over the other setup's stage.
    assert json.loads((other / "world" / wd.MARKER).read_text()) == {"fingerprint": {"seed": -1}}
    assert sorted(os.listdir(other / "world")) == [wd.MARKER]


@pytest.mark.slow
def test_verbosity_1_keeps_the_traceback(results):
  rc, text = results[0]["typo_verbose"]
  assert rc == errors.EXIT_USER_ERROR
  assert "Traceback" in text and "error: bad config override" in text


def test_user_error_types_keep_their_old_bases():
  assert issubclass(errors.UserError, ValueError)
  assert issubclass(wd.WorkdirConflict, errors.UserError)
  assert issubclass(wd.WorkdirConflict, RuntimeError)
  assert issubclass(errors.MissingInput, FileNotFoundError)

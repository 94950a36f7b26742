"""Resume at scale: the tables stage over a streamed corpus, SIGKILLed mid-stage in a
real subprocess and rerun, skips the committed shards and ends bit-identical to an
uninterrupted run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tda import tables as tables_lib

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "tests/stream_config.py"
ENV = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}


def _cmd(workdir, stages):
  return [sys.executable, "-m", "tda.run", f"--config={CONFIG}", f"--workdir={workdir}",
          f"--config.stages={stages}"]


def _run(workdir, stages):
  p = subprocess.run(_cmd(workdir, stages), cwd=ROOT, env=ENV, capture_output=True, text=True,
                     timeout=600)
  assert p.returncode == 0, p.stderr[-4000:]


def _table_files(path):
  """{relative path: bytes} of a table, commit times left out of its JSON records."""
  out = {}
  for r, _, fs in os.walk(path):
    for f in fs:
      full = os.path.join(r, f)
      rel = os.path.relpath(full, path)
      if f.endswith(".json"):
        strip = lambda x: ({k: strip(v) for k, v in x.items() if not k.endswith("_at")}
                           if isinstance(x, dict) else
                           [strip(v) for v in x] if isinstance(x, list) else x)
        out[rel] = strip(json.load(open(full)))
      else:
        out[rel] = open(full, "rb").read()
  return out


def test_kill_during_tables_then_resume_is_bit_identical(tmp_path):
  ref, killed = tmp_path / "ref", tmp_path / "killed"
  _run(ref, "world,vocab,train,gradients,tables")  # The uninterrupted run.
  shutil.copytree(ref, killed)
  shutil.rmtree(killed / "tables")  # The same workdir with 'tables' never run.

  shards = killed / "tables" / "trackstar" / "shards"  # Written in place, uncommitted.
  proc = subprocess.Popen(_cmd(killed, "tables"), cwd=ROOT, env=ENV,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline, done = time.time() + 900, []
  while time.time() < deadline and proc.poll() is None:
    done = (sorted(n for n in os.listdir(shards) if (shards / n / tables_lib.COMMIT).exists())
            if shards.exists() else [])
    if len(done) >= 2:
      break
    time.sleep(0.02)
  assert proc.poll() is None, "the stage finished (or died) before it could be killed"
  assert len(done) >= 2, "no two shards committed in time"
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait(timeout=30)
  assert proc.returncode == -signal.SIGKILL
  n_shards = -(-json.load(open(ref / "tables" / "summary.json"))["rows"] // 8)
  committed = sorted(n for n in os.listdir(shards) if (shards / n / tables_lib.COMMIT).exists())
  assert 2 <= len(committed) < n_shards       # Killed mid-stage, some shards committed.
  assert not (killed / "tables" / "COMMITTED.json").exists()
  before = {n: os.stat(shards / n / tables_lib.COMMIT).st_mtime_ns for n in committed}

  _run(killed, "tables")
  after_dir = killed / "tables" / "trackstar" / "shards"
  for n, mtime in before.items():  # Committed shards were not recomputed.
    assert os.stat(after_dir / n / tables_lib.COMMIT).st_mtime_ns == mtime, n
  a = _table_files(ref / "tables" / "trackstar")
  b = _table_files(killed / "tables" / "trackstar")
  assert sorted(a) == sorted(b)
  for rel in a:
    assert a[rel] == b[rel], rel
  sa, sb = (json.load(open(w / "tables" / "summary.json")) for w in (ref, killed))
  keep = lambda s: {k: v for k, v in s.items() if "wall" not in k and "per_s" not in k
                    and "this_run" not in k}
  assert keep(sa) == keep(sb)
  assert sa["n_truncated_passages"] > 0 and sa["corpus"]["source"] == "concat"
  assert sb["featurised_rows_this_run_process0"] < sa["featurised_rows_this_run_process0"]

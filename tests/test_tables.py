"""Tests for tda.tables: round trips, manifest checks, corruption, kill/resume."""

import json
import os
import signal
import subprocess
import sys
import time

import ml_dtypes
import numpy as np
import pytest

from tda import tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
META = {"config_hash": "abc123", "checkpoint_step": 1500, "model_hash": "m0",
        "projection_seed": 7, "d": 16, "method": "trackstar"}


def _rows(n, d, seed=0):
  x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _write(path, x, dtype="float32", rps=8, chunk=5, meta=META, **kw):
  w = tables.TableWriter(path=path, d=x.shape[1], dtype=dtype, rows_per_shard=rps,
                         meta=meta, **kw)
  for lo in range(0, len(x), chunk):
    w.write(x[lo:lo + chunk], [f"ex{i}" for i in range(lo, min(lo + chunk, len(x)))])
  w.close()
  return tables.Table.open(path)


def test_int8_round_trip_bound():
  x = np.random.default_rng(1).standard_normal((200, 64)).astype(np.float32) * 3
  x[0] = 0.0  # Zero row: scale 0, exact.
  q, s = tables.quantize_int8(x)
  err = np.abs(x - tables.dequantize_int8(q, s))
  assert np.all(err <= s[:, None] / 2 * (1 + 1e-5))
  # The bound is tight: some element sits near half a quantisation step.
  assert np.max(err / np.maximum(s[:, None], 1e-30)) > 0.45
  assert np.all(np.abs(q).max(axis=1)[1:] == 127) and np.all(q[0] == 0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_round_trip_all_dtypes(tmp_path, dtype):
  x = _rows(21, 16)
  t = _write(str(tmp_path / dtype), x, dtype=dtype)
  assert (len(t), t.d, t.dtype, t.manifest["num_shards"]) == (21, 16, dtype, 3)
  assert [s["rows"] for s in t.shard_infos] == [8, 8, 5]
  ids, y = t.read_all()
  assert ids == [f"ex{i}" for i in range(21)] and y.dtype == np.float32
  if dtype == "float32":
    np.testing.assert_array_equal(y, x)
  elif dtype == "bfloat16":
    np.testing.assert_array_equal(y, x.astype(ml_dtypes.bfloat16).astype(np.float32))
    assert np.all(np.abs(y - x) <= 2.0**-8 * np.abs(x))
  else:
    s = np.abs(x).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(y - x) <= s / 2 * (1 + 1e-5))
  assert t.nbytes == sum(s["stored_bytes"] for s in t.shard_infos) > 0
  t.verify()
  shard_ids, shard_x = next(iter(t.shards))
  assert shard_ids == ids[:8] and shard_x.shape == (8, 16)


def test_manifest_mismatch_refused(tmp_path):
  t = _write(str(tmp_path / "t"), _rows(10, 16))
  tables.Table.open(t.path, expect={"projection_seed": 7, "d": 16, "model_hash": "m0"})
  with pytest.raises(tables.TableError) as e:
    tables.Table.open(t.path, expect={"projection_seed": 8, "d": 16, "model_hash": "m1"})
  msg = str(e.value)
  assert "projection_seed" in msg and "model_hash" in msg and "; d:" not in msg and not msg.split("expected: ")[1].startswith("d:")
  # A writer with another setup refuses to add rows to the same table.
  with pytest.raises(tables.TableError, match="projection_seed"):
    tables.TableWriter(path=t.path, d=16, dtype="float32", rows_per_shard=8,
                       meta={**META, "projection_seed": 9})
  with pytest.raises(tables.TableError, match="rows_per_shard"):
    tables.TableWriter(path=t.path, d=16, dtype="float32", rows_per_shard=4, meta=META)


def test_corrupted_shard_detected(tmp_path):
  t = _write(str(tmp_path / "t"), _rows(20, 16))
  chunk = os.path.join(t.path, "shards", "000001", "vectors", "c", "0", "0")
  data = bytearray(open(chunk, "rb").read())
  data[len(data) // 2] ^= 0x01
  open(chunk, "wb").write(bytes(data))
  with pytest.raises(tables.TableCorrupted, match="shard 000001 ") as e:
    t.verify()
  assert "vectors/c/0/0 sha256 differs" in str(e.value)
  assert "shard 000000 " not in str(e.value) and "shard 000002 " not in str(e.value)
  with pytest.raises(tables.TableCorrupted, match="shard 000001 "):
    list(t.shards)  # The read path refuses it too, before decoding.


def test_bad_writes(tmp_path):
  w = tables.TableWriter(path=str(tmp_path / "t"), d=4, dtype="int8", rows_per_shard=4,
                         meta={})
  with pytest.raises(ValueError, match=r"\[n, 4\]"):
    w.write(np.zeros((2, 5), np.float32), ["a", "b"])
  with pytest.raises(ValueError, match="floating"):
    w.write(np.zeros((2, 4), np.int32), ["a", "b"])
  with pytest.raises(ValueError, match="NaN"):
    w.write(np.full((2, 4), np.nan, np.float32), ["a", "b"])
  with pytest.raises(ValueError, match="2 ids for 1 rows"):
    w.write(np.zeros((1, 4), np.float32), ["a", "b"])
  with pytest.raises(ValueError, match="start at"):
    w.write(np.zeros((1, 4), np.float32), ["a"], start_row=2)
  with pytest.raises(ValueError, match="dtype"):
    tables.TableWriter(path=str(tmp_path / "u"), d=4, dtype="float16", rows_per_shard=4,
                       meta={})
  with pytest.raises(tables.TableError, match="no manifest"):
    tables.Table.open(str(tmp_path / "t"))


def test_multi_process_writers_then_finalize(tmp_path):
  x = _rows(22, 16)
  ids = [f"ex{i}" for i in range(22)]
  path = str(tmp_path / "t")
  rps, n_proc = 4, 3
  for p in (2, 0, 1):  # Any order: each process writes only its shards.
    w = tables.TableWriter(path=path, d=16, dtype="float32", rows_per_shard=rps,
                           meta=META, process_index=p, num_processes=n_proc)
    for s in range(p, 6, n_proc):  # Feed by global row ranges (start_row).
      lo, hi = s * rps, min((s + 1) * rps, 22)
      w.write(x[lo:hi], ids[lo:hi], start_row=lo)
    w.close()
    with pytest.raises(ValueError, match="belongs to process"):
      w2 = tables.TableWriter(path=path, d=16, dtype="float32", rows_per_shard=rps,
                              meta=META, process_index=p, num_processes=n_proc)
      w2.write(x[:1], ids[:1], start_row=((p + 1) % n_proc) * rps)
  assert not os.path.exists(os.path.join(path, tables.MANIFEST))
  tables.finalize_table(path=path, num_shards=6)
  t = tables.Table.open(path)
  got_ids, y = t.read_all()
  assert got_ids == ids and np.array_equal(y, x)
  assert [s["process_index"] for s in t.shard_infos] == [0, 1, 2, 0, 1, 2]
  with pytest.raises(tables.TableError, match="shard 6 of 7 is not committed"):
    tables.finalize_table(path=path, num_shards=7)


# --- Kill / resume in a real subprocess ------------------------------------------

_CHILD = r"""
import os, sys, time, numpy as np
sys.path.insert(0, {root!r})
from tda import tables
path, progress, pause_kind, pause_shard, pause_rows = sys.argv[1:6]
x = np.random.default_rng(3).standard_normal((45, 64)).astype(np.float32)
ids = [f"ex{{i}}" for i in range(45)]

def on_event(kind, shard, rows):
  with open(progress, "a") as f:
    f.write(f"{{kind}} {{shard}} {{rows}}\n")
  if (kind, shard, rows) == (pause_kind, int(pause_shard), int(pause_rows)):
    with open(progress, "a") as f:
      f.write("PAUSED\n")
    time.sleep(600)  # The parent kills us here.

w = tables.TableWriter(path=path, d=64, dtype="int8", rows_per_shard=16,
                       meta={{"seed": 1}}, chunk_rows=4,
                       _on_event=on_event)
start = w.resume_row  # Skip what is committed (no recompute).
for lo in range(start, 45, 3):
  w.write(x[lo:lo + 3], ids[lo:lo + 3], start_row=lo)
w.close()
with open(progress, "a") as f:
  f.write("DONE\n")
"""


def _run_child(path, progress, pause=("none", -1, -1)):
  cmd = [sys.executable, "-c", _CHILD.format(root=ROOT), path, progress, *map(str, pause)]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  if pause[0] == "none":
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()[-2000:]
    return
  deadline = time.time() + 60
  while time.time() < deadline:
    if os.path.exists(progress) and "PAUSED" in open(progress).read():
      break
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    time.sleep(0.05)
  else:
    proc.kill()
    raise AssertionError("child never reached the pause point")
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait(timeout=10)
  assert proc.returncode == -signal.SIGKILL


def _snapshot(path):
  files = {}
  for r, _, fs in os.walk(path):
    for f in fs:
      rel = os.path.relpath(os.path.join(r, f), path)
      if f.endswith(".json"):
        obj = json.load(open(os.path.join(r, f)))
        drop = lambda d: {k: v for k, v in d.items() if not k.endswith("_at")}
        if isinstance(obj, dict):
          obj = drop(obj)
          if "shards" in obj:
            obj["shards"] = [drop(s) for s in obj["shards"]]
        files[rel] = obj
      else:
        files[rel] = open(os.path.join(r, f), "rb").read()
  return files


@pytest.fixture(scope="module")
def reference_table(tmp_path_factory):
  d = tmp_path_factory.mktemp("ref")
  _run_child(str(d / "t"), str(d / "progress"))
  return _snapshot(str(d / "t"))


@pytest.mark.parametrize("pause", [
    ("chunk", 1, 8),     # Mid-shard: shard 1 half written, no commit record yet.
    ("commit", 1, 16),   # Right after shard 1's commit record was written.
])
def test_kill_and_resume_is_bit_identical(tmp_path, reference_table, pause):
  path, progress = str(tmp_path / "t"), str(tmp_path / "progress")
  _run_child(path, progress, pause)
  shard_dir = os.path.join(path, "shards")
  names = sorted(os.listdir(shard_dir))
  assert names == ["000000", "000001"]
  committed_1 = os.path.exists(os.path.join(shard_dir, "000001", tables.COMMIT))
  assert committed_1 == (pause[0] == "commit")
  assert not os.path.exists(os.path.join(path, tables.MANIFEST))
  _run_child(path, progress)
  log = open(progress).read().split("PAUSED\n")[1]
  assert "commit 0 " not in log  # Shard 0 was skipped, not rewritten.
  assert ("commit 1 " in log) == (pause[0] == "chunk")
  assert log.endswith("DONE\n")
  snap = _snapshot(path)
  assert sorted(snap) == sorted(reference_table)
  for rel in snap:
    assert snap[rel] == reference_table[rel], rel
  t = tables.Table.open(path)
  t.verify()
  assert len(t) == 45 and t.manifest["num_shards"] == 3


def test_refeed_everything_skips_committed(tmp_path):
  x = _rows(20, 16)
  path = str(tmp_path / "t")
  w = tables.TableWriter(path=path, d=16, dtype="float32", rows_per_shard=8, meta=META)
  w.write(x[:10], [f"ex{i}" for i in range(10)])
  del w  # Dies with shard 1 incomplete.
  w = tables.TableWriter(path=path, d=16, dtype="float32", rows_per_shard=8, meta=META)
  assert w.resume_row == 8 and sorted(w.committed) == [0]
  with pytest.raises(ValueError, match="ids for committed shard 0 differ"):
    w.write(x[:2], ["zz", "ex1"])
  w.write(x, [f"ex{i}" for i in range(20)])  # Rows 0-7 silently skipped.
  w.close()
  ids, y = tables.Table.open(path).read_all()
  assert ids == [f"ex{i}" for i in range(20)] and np.array_equal(y, x)

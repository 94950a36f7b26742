"""Verified reads (tda.verify, tda.tables): what a stage or table commits is recorded,
and what is read is checked against the record; mismatches are refused by name."""

import os
import types

import numpy as np
import pytest

from tda import pipeline
from tda import tables
from tda import verify
from tda import workdir as wd
from tests import helpers

META = {"method": "trackstar", "d": 8}


def _unit(n, d, seed=0):
  x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _table(path, x, dtype="float32", rps=4):
  with tables.TableWriter(path=path, d=x.shape[1], dtype=dtype, rows_per_shard=rps,
                          meta=META) as w:
    w.write(x, [f"ex{i}" for i in range(len(x))])
  return path


def _stage_with_table(name="fake"):
  """A stage that writes a JSON file, an array and a table."""
  def run(ctx, out_dir):
    wd.write_json(os.path.join(out_dir, "out.json"), {"a": 1})
    np.save(os.path.join(out_dir, "q.npy"), np.arange(6.0))
    _table(os.path.join(out_dir, "t"), _unit(10, 8))
    return {"ok": True}
  return types.SimpleNamespace(STAGE=name, fingerprint=lambda ctx: {"k": 1}, run=run)


@pytest.fixture
def committed(tmp_path):
  ctx = helpers.context(helpers.tiny_config(), tmp_path)
  pipeline.run_stage(ctx, _stage_with_table())
  return str(tmp_path), str(tmp_path / "fake")


def test_commit_records_every_file_but_the_shards_which_carry_their_own(committed):
  _, folder = committed
  rec = wd.read_json(os.path.join(folder, wd.MARKER))[verify.FILES]
  assert sorted(rec) == ["out.json", "q.npy", "summary.json", "t/header.json",
                         "t/manifest.json"]
  assert rec["q.npy"]["sha256"] == wd.file_sha256(os.path.join(folder, "q.npy"))
  shard = wd.read_json(os.path.join(folder, "t", "shards", "000000", tables.COMMIT))
  assert sorted(shard["files"]) == ["ids.json", "vectors/c/0/0", "vectors/zarr.json"]
  assert verify.verify_stage(*committed[:1], "fake").status == "ok"


def test_reads_are_checked_and_a_change_is_refused_by_name(committed):
  workdir, folder = committed
  np.testing.assert_array_equal(verify.load_npy(folder, "q.npy"), np.arange(6.0))
  path = os.path.join(folder, "q.npy")
  data = bytearray(open(path, "rb").read())
  data[-1] ^= 1
  open(path, "wb").write(bytes(data))
  with pytest.raises(verify.ArtefactCorrupted, match=r"stage .fake.: q.npy sha256 .*same size"):
    verify.load_npy(folder, "q.npy")
  with pytest.raises(verify.ArtefactCorrupted, match="q.npy"):
    verify.check_stage(workdir, "fake")
  open(path, "wb").write(bytes(data[:-5]))
  with pytest.raises(verify.ArtefactCorrupted, match=r"q.npy has \d+ bytes.*truncated"):
    verify.check_stage(workdir, "fake")
  os.remove(path)
  with pytest.raises(verify.ArtefactCorrupted, match="q.npy is recorded at commit but missing"):
    verify.check_stage(workdir, "fake")


def test_an_added_file_is_refused(committed):
  workdir, folder = committed
  wd.write_json(os.path.join(folder, "extra.json"), [])
  with pytest.raises(verify.ArtefactCorrupted, match="extra.json was added after commit"):
    verify.check_stage(workdir, "fake")
  with pytest.raises(verify.ArtefactCorrupted, match="not committed with the stage"):
    verify.read_json(folder, "extra.json")


def test_context_refuses_a_changed_upstream_file(committed):
  workdir, folder = committed
  ctx = helpers.context(helpers.tiny_config(), workdir)
  assert ctx.summary("fake") == {"ok": True}
  wd.write_json(os.path.join(folder, "out.json"), {"a": 2})
  with pytest.raises(verify.ArtefactCorrupted, match="out.json"):
    helpers.context(helpers.tiny_config(), workdir).summary("fake")


@pytest.mark.parametrize("how,message", [
    ("flip", "vectors/c/0/0 sha256 differs"),
    ("truncate", "vectors/c/0/0 has .* bytes, .* recorded .*truncated"),
    ("extra file", "junk not recorded"),
    ("drop ids", "ids.json missing"),
])
def test_a_bad_shard_is_refused_naming_table_shard_and_difference(tmp_path, how, message):
  path = _table(str(tmp_path / "t"), _unit(10, 8))
  d = os.path.join(path, "shards", "000001")
  chunk = os.path.join(d, "vectors", "c", "0", "0")
  data = bytearray(open(chunk, "rb").read())
  if how == "flip":
    data[len(data) // 2] ^= 1
    open(chunk, "wb").write(bytes(data))
  elif how == "truncate":
    open(chunk, "wb").write(bytes(data[:-3]))
  elif how == "extra file":
    open(os.path.join(d, "junk"), "w").write("x")
  else:
    os.remove(os.path.join(d, "ids.json"))
  t = tables.Table.open(path)
  t.read_shard(0)
  with pytest.raises(tables.TableCorrupted, match=rf"table {path}: shard 000001 .*{message}"):
    t.read_shard(1)
  with pytest.raises(tables.TableCorrupted, match="shard 000001"):
    t.verify()


def test_missing_and_extra_shards_are_refused_at_open(tmp_path):
  path = _table(str(tmp_path / "t"), _unit(10, 8))
  shards = os.path.join(path, "shards")
  os.rename(os.path.join(shards, "000002"), os.path.join(shards, "000007"))
  with pytest.raises(tables.TableCorrupted) as e:
    tables.Table.open(path)
  assert "shard 000002 is missing" in str(e.value)
  assert "000007 is not a shard of the manifest (extra)" in str(e.value)


@pytest.mark.parametrize("dtype", tables.DTYPES)
def test_unit_rows_pass_the_norm_check_in_every_dtype_and_others_do_not(tmp_path, dtype):
  x = _unit(10, 8)
  x[3] = 0.0  # An excluded passage: written as zeros, allowed.
  t = tables.Table.open(_table(str(tmp_path / "u"), x, dtype=dtype), unit_norm=True)
  t.verify()
  y = x.copy()
  y[6] *= 1.1
  t = tables.Table.open(_table(str(tmp_path / "n"), y, dtype=dtype), unit_norm=True)
  t.read_shard(0)
  with pytest.raises(tables.TableCorrupted, match=r"shard 000001 has 1 row.*row 6, id 'ex6'"):
    t.read_shard(1)
  tables.Table.open(t.path).verify()  # Not unit tables: not checked.


def test_committed_without_records_is_unrecorded_not_ok(committed, caplog):
  workdir, folder = committed
  marker = os.path.join(folder, wd.MARKER)
  wd.write_json(marker, {"fingerprint": wd.read_json(marker)["fingerprint"]})
  v = verify.verify_stage(workdir, "fake")
  assert v.status == "PARTIAL" and "committed without file hashes" in v.detail, v.line()
  assert verify.read_json(folder, "out.json") == {"a": 1}
  assert "read unchecked" in caplog.text


def test_reopen_turns_a_committed_stage_back_into_an_interrupted_resumable_one(committed):
  workdir, folder = committed
  fp = wd.read_json(os.path.join(folder, wd.MARKER))["fingerprint"]
  assert verify.reopen(workdir, "fake") == folder
  assert wd.committed(workdir, "fake") is None
  assert wd.read_json(os.path.join(folder, wd.STARTED)) == {"fingerprint": fp}
  assert wd.begin(workdir, "fake", fp, resumable=True) == folder
  assert os.path.exists(os.path.join(folder, "q.npy"))  # Kept for the resume.


def test_a_gs_stage_folder_splits_into_its_workdir_and_stage():
  # os.path.normpath would fold gs://bucket into gs:/bucket, and every gs:// stage
  # would read as uncommitted to the stages after it.
  assert verify._split("gs://bucket/run/train/") == ("gs://bucket/run", "train")
  assert verify._split("/tmp/run//train") == ("/tmp/run", "train")

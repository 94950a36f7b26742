"""Remote workdirs: the filesystem layer, tables, checkpoints, indexes and the
commit protocol on a local path and on gs:// (a GCS emulator this module starts on
127.0.0.1 and stops, `tests/gcs_emulator.py`), and the pipeline end to end with
--workdir=gs://..., killed and resumed.
"""

import json
import os
import signal
import subprocess
import sys
import time
import types
import urllib.parse
import urllib.request
import uuid
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts

from tda import fs
from tda import index as index_lib
from tda import pipeline
from tda import tables as tables_lib
from tda import train as train_lib
from tda import workdir as wd
from tests import gcs_emulator
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNLOCAL = "configs/trackstar_tiny.py:runlocal"


@pytest.fixture(scope="module")
def emulator():
  """The emulator's client environment, set in this process while the module runs."""
  with gcs_emulator.running() as env, mock.patch.dict(os.environ, env):
    yield env


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path):
  """A fresh folder: local, or a fresh prefix in the emulator's bucket."""
  if request.param == "local":
    return str(tmp_path)
  request.getfixturevalue("emulator")
  return f"gs://{gcs_emulator.BUCKET}/{uuid.uuid4().hex[:12]}"


# --- The filesystem layer ---------------------------------------------------------

def test_files_folders_and_listing(root):
  a = os.path.join(root, "a")
  fs.makedirs(os.path.join(a, "b"))
  wd.write_json(os.path.join(a, "x.json"), {"k": [1, 2]})
  wd.write_jsonl(os.path.join(a, "b", "rows.jsonl"), [{"i": 0}, {"i": 1}])
  fs.write_text(os.path.join(a, "b", "t.txt"), "é\r\n")
  fs.save_npy(os.path.join(a, "v.npy"), np.arange(6, dtype=np.float32).reshape(2, 3))
  assert wd.read_json(os.path.join(a, "x.json")) == {"k": [1, 2]}
  assert wd.read_jsonl(os.path.join(a, "b", "rows.jsonl")) == [{"i": 0}, {"i": 1}]
  assert fs.read_bytes(os.path.join(a, "b", "t.txt")) == "é\r\n".encode()
  np.testing.assert_array_equal(fs.load_npy(os.path.join(a, "v.npy")),
                                np.arange(6, dtype=np.float32).reshape(2, 3))
  assert fs.listdir(a) == ["b", "v.npy", "x.json"]
  assert fs.walk_files(root) == ["a/b/rows.jsonl", "a/b/t.txt", "a/v.npy", "a/x.json"]
  assert fs.isdir(os.path.join(a, "b")) and fs.isfile(os.path.join(a, "x.json"))
  assert not fs.isfile(os.path.join(a, "b")) and not fs.exists(os.path.join(a, "nope"))
  assert fs.getsize(os.path.join(a, "b", "t.txt")) == 4
  assert fs.listdir(os.path.join(root, "missing")) == []
  fs.copy_tree(a, os.path.join(root, "copy"))
  assert fs.walk_files(os.path.join(root, "copy")) == ["b/rows.jsonl", "b/t.txt", "v.npy",
                                                      "x.json"]
  fs.remove(os.path.join(a, "x.json"))
  fs.rmtree(os.path.join(a, "b"))
  assert fs.listdir(a) == ["v.npy"]


def test_a_failed_write_leaves_the_old_file(root):
  path = os.path.join(root, "f.json")
  wd.write_json(path, {"v": 1})
  with pytest.raises(RuntimeError, match="mid-write"):
    with fs.atomic_open(path) as f:
      f.write('{"v": ')
      raise RuntimeError("mid-write")
  assert wd.read_json(path) == {"v": 1}
  assert fs.listdir(root) == ["f.json"]  # No temp file left behind.


def test_tensorstore_kvstore_of_a_path(root):
  fs.write_text(os.path.join(root, "arr", "note.txt"), "listed before tensorstore writes")
  assert fs.listdir(os.path.join(root, "arr")) == ["note.txt"]
  spec = {"driver": "zarr3", "kvstore": fs.kvstore(os.path.join(root, "arr")),
          "metadata": {"shape": [4, 3], "data_type": "float32"}}
  ts.open(spec, create=True).result()[1:3].write(np.ones([2, 3], np.float32)).result()
  # Written by another client: seen at once (no stale listing of the folder).
  assert fs.exists(os.path.join(root, "arr", "zarr.json"))
  assert fs.listdir(os.path.join(root, "arr")) == ["c", "note.txt", "zarr.json"]
  back = ts.open({"driver": "zarr3", "kvstore": fs.kvstore(os.path.join(root, "arr"))},
                 open=True).result().read().result()
  np.testing.assert_array_equal(back, np.array([[0] * 3, [1] * 3, [1] * 3, [0] * 3]))


def test_kvstore_spec_and_schemes():
  assert fs.kvstore("gs://b/run/t/") == {"driver": "gcs", "bucket": "b", "path": "run/t/"}
  assert fs.kvstore("rel")["path"] == os.path.abspath("rel")
  with pytest.raises(ValueError, match="unsupported path 's3://b/x'"):
    fs.kvstore("s3://b/x")
  assert fs.abspath("gs://b/x") == "gs://b/x"


# --- Tables, checkpoints, ScaNN indexes and the commit protocol on both -------------

def test_table_written_killed_resumed_and_verified(root):
  path = os.path.join(root, "t")
  x = np.random.default_rng(0).normal(size=(10, 8)).astype(np.float32)
  ids = [f"p{i}" for i in range(10)]
  w = tables_lib.TableWriter(path=path, d=8, dtype="bfloat16", rows_per_shard=4, meta={})
  w.write(x[:6], ids[:6])  # Shard 0 committed, shard 1 half written: then "killed".
  assert fs.exists(os.path.join(path, "shards", "000000", tables_lib.COMMIT))
  assert not fs.exists(os.path.join(path, "shards", "000001", tables_lib.COMMIT))
  w = tables_lib.TableWriter(path=path, d=8, dtype="bfloat16", rows_per_shard=4, meta={})
  assert sorted(w.committed) == [0] and w.resume_row == 4
  assert fs.listdir(os.path.join(path, "shards")) == ["000000"]  # The partial one cleared.
  w.write(x[4:], ids[4:], start_row=4)
  w.close()
  t = tables_lib.Table.open(path)
  t.verify()
  got_ids, got = t.read_all()
  assert got_ids == ids and len(t) == 10 and t.manifest["num_shards"] == 3
  np.testing.assert_allclose(got, x, rtol=2 ** -8)


def test_orbax_checkpoints_and_unfinalized_steps(root):
  ckpt = os.path.join(root, "ckpt")
  mngr = train_lib.checkpoint_manager(ckpt, max_to_keep=None)
  state = types.SimpleNamespace(step=3, params={"w": jnp.arange(4.0)},
                                opt_state={"m": jnp.ones(2)})
  train_lib.save(mngr, state, {"note": "x"})
  if fs.is_remote(ckpt):  # On GCS a killed save leaves its step folder, unfinalized.
    fs.write_text(os.path.join(ckpt, "7", "state", "junk"), "partial")
  assert train_lib.available_steps(ckpt) == [3]
  train_lib.checkpoint_manager(ckpt, cleanup_tmp=True)  # The trainer's: clears it.
  assert fs.listdir(ckpt) == ["3"]
  assert train_lib.read_step_meta(ckpt, 3)["note"] == "x"
  restored, meta = train_lib.restore(mngr, types.SimpleNamespace(
      params={"w": jnp.zeros(4)}, opt_state={"m": jnp.zeros(2)}), step=3)
  np.testing.assert_array_equal(restored.params["w"], np.arange(4.0))
  assert meta["step"] == 3


def test_scann_index_saved_and_loaded(root):
  x = np.random.default_rng(1).normal(size=(50, 16)).astype(np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  idx = index_lib.ScannIndex.build(vectors_nd=x)
  idx.save(os.path.join(root, "index"))
  back = index_lib.ScannIndex.load(os.path.join(root, "index"))
  assert (back.n, back.d, back.params) == (idx.n, idx.d, idx.params)
  for a, b in zip(idx.search(x[:5], 3), back.search(x[:5], 3)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(FileNotFoundError, match="no saved index"):
    index_lib.ScannIndex.load(os.path.join(root, "nothing"))


def test_standin_written_where_asked_and_nowhere_else(root, tmp_path, monkeypatch):
  # A gs:// folder given to a local-only mkdir becomes a local folder named 'gs:'.
  from tda import standin  # pylint: disable=g-import-not-at-top
  from tda import world as world_lib  # pylint: disable=g-import-not-at-top
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  world = world_lib.World(
      passages=[{"id": "p0", "text": "Ada Lovelace was born in London.", "kind": "fact",
                 "fact_ids": ["f0"]}],
      facts=[{"fact_id": "f0", "subject": "Ada Lovelace", "relation": "P19",
              "object": "London", "inputs_plaintext": "Ada Lovelace was born in",
              "frequency": 1}])
  globs = standin.build(os.path.join(root, "standin"), world=world, rows=6, c4_shards=2)
  assert list(cwd.iterdir()) == []
  assert [r["fact_id"] for r in wd.read_jsonl(globs["trex_facts"])] == ["f0"]
  shards = sorted(fs.listdir(os.path.join(root, "standin")))
  assert [s for s in shards if s.startswith(standin.C4_PREFIX)] == [
      "c4-train.jsonl-00000-of-00002", "c4-train.jsonl-00001-of-00002"]


def test_vocab_file_read_where_it_is(root, tmp_path):
  # data.vocab_path on gs:// is checked and fingerprinted through tda.fs (a local
  # isfile said "does not exist").
  from tda import data  # pylint: disable=g-import-not-at-top
  from tda.stages import vocab  # pylint: disable=g-import-not-at-top
  texts = [f"Ada Lovelace was born in the city of London, entry {i}." for i in range(200)]
  local = data.train_vocab(texts=texts, vocab_size=320, model_prefix=str(tmp_path / "sp"))
  fs.makedirs(os.path.join(root, "vocab"))
  path = os.path.join(root, "vocab", "spm.model")
  fs.copy_file(local, path)
  ctx = types.SimpleNamespace(config=helpers.tiny_config(**{"data.vocab_path": path}))
  fp = vocab.fingerprint(ctx)
  assert fp == {"vocab_path": path, "sha256": wd.file_sha256(local)}
  assert vocab._check(ctx, path) == data.check_vocab_file(local)  # pylint: disable=protected-access


def test_hf_folder_on_gs_is_refused_by_name():
  from tda import hf_checkpoint  # pylint: disable=g-import-not-at-top
  c = helpers.tiny_config(**{"model.checkpoint": "gs://b/llama",
                             "model.checkpoint_format": "hf_llama"})
  with pytest.raises(ValueError, match=r"model.checkpoint='gs://b/llama'.*local disk"):
    hf_checkpoint.pipeline_model_config(c)


def _fake_stage(calls, *, fail_after=None, resumable=False):
  def run(ctx, out_dir):
    calls.append(fs.listdir(out_dir))
    for i in range(3):
      if fs.exists(os.path.join(out_dir, f"part{i}")):
        continue
      if fail_after == i:
        raise RuntimeError("interrupted")
      fs.write_text(os.path.join(out_dir, f"part{i}"), str(i))
    fs.makedirs(os.path.join(out_dir, "results"))
    fs.write_text(os.path.join(out_dir, "results", "r.txt"), "published")
    return {"parts": 3}
  return types.SimpleNamespace(STAGE="fake", RESUMABLE=resumable, run=run,
                               fingerprint=lambda ctx: {"knob": 1})


@pytest.mark.parametrize("resumable", [False, True])
def test_commit_marker_last_and_rerun_of_an_uncommitted_stage(root, resumable):
  ctx, calls = helpers.context(helpers.tiny_config(), root), []
  with pytest.raises(RuntimeError):
    pipeline.run_stage(ctx, _fake_stage(calls, fail_after=2, resumable=resumable))
  folder = os.path.join(root, "fake")
  assert fs.listdir(folder) == ["STARTED.json", "part0", "part1"]
  assert wd.committed(root, "fake") is None
  with pytest.raises(FileNotFoundError, match="not committed"):
    ctx.stage_dir("fake")
  assert pipeline.run_stage(ctx, _fake_stage(calls, resumable=resumable))
  # Resumable: the partial parts are kept; otherwise cleared to STARTED.json only.
  assert calls[-1] == (["STARTED.json", "part0", "part1"] if resumable else ["STARTED.json"])
  assert fs.listdir(folder) == ["COMMITTED.json", "part0", "part1", "part2", "results",
                                "summary.json"]
  assert fs.read_text(os.path.join(root, "results", "r.txt")) == "published"
  assert not pipeline.run_stage(ctx, _fake_stage(calls, resumable=resumable))  # Skipped.


# --- The pipeline end to end on gs://, killed and resumed ---------------------------

# The runlocal pipeline, kept to what the storage paths need: TrackStar and BM25, no
# trend checkpoints, a few tail-patched queries, 10 table shards (so the kill lands
# inside the tables stage).
E2E_OVERRIDES = ("--config.eval.methods=('trackstar','bm25')", "--config.trend.sizes=()",
                 "--config.eval.tailpatch_queries=8", "--config.tables.rows_per_shard=16")
UPSTREAM_OF_TABLES = ("world", "vocab", "train", "second_moments", "model_eval", "gradients")
ALL_STAGES = UPSTREAM_OF_TABLES + ("tables", "retrieval", "evaluation", "viewer")


def _tda(workdir, env, log):
  """`tda.run` in a subprocess; its output goes to the file `log` (a pipe left unread
  would stall it)."""
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", **env}
  with open(log, "w") as f:
    return subprocess.Popen([sys.executable, "-m", "tda.run", f"--config={RUNLOCAL}",
                             f"--workdir={workdir}", *E2E_OVERRIDES], cwd=ROOT, env=env,
                            stdout=f, stderr=subprocess.STDOUT)


def _tail(log):
  with open(log) as f:
    return f.read()[-4000:]


def _objects(env, prefix):
  """Object names under `prefix` in the emulator's bucket (its JSON API); None when
  the emulator, busy serving the run, does not answer in time."""
  url = (f"{env['STORAGE_EMULATOR_HOST']}/storage/v1/b/{gcs_emulator.BUCKET}/o?"
         + urllib.parse.urlencode({"prefix": prefix}))
  try:
    with urllib.request.urlopen(url, timeout=30) as r:
      return [o["name"] for o in json.load(r).get("items", [])]
  except OSError:
    return None


def _scrub(obj):
  """`obj` without wall times (they differ between any two runs)."""
  if isinstance(obj, dict):
    return {k: _scrub(v) for k, v in obj.items() if k not in ("timings_s", "wall_s")}
  return obj


def _outputs(workdir):
  """What a run computed from its tables on: every table's ids and bytes, the
  rankings, the metrics."""
  out = {}
  for name in wd.read_json(os.path.join(workdir, "tables", wd.SUMMARY))["tables"]:
    ids, x = tables_lib.Table.open(os.path.join(workdir, "tables", name)).read_all()
    out[f"table {name}"] = (ids, x.tobytes())
  for m in wd.read_json(os.path.join(workdir, "retrieval", wd.SUMMARY))["methods"]:
    out[f"ranking {m}"] = wd.read_json(os.path.join(workdir, "retrieval", f"{m}.json"))
  out["metrics"] = _scrub(wd.read_json(os.path.join(workdir, "results", "metrics.json")))
  return out


@pytest.mark.slow
def test_pipeline_on_gs_killed_in_tables_and_resumed_equals_an_uninterrupted_run(
    emulator, tmp_path):
  run = f"gs://{gcs_emulator.BUCKET}/run"
  log = str(tmp_path / "run.log")
  p = _tda(run, emulator, log)
  deadline = time.time() + 1200
  while True:  # SIGKILL once the tables stage has committed its first shard.
    names = _objects(emulator, "run/tables/") or []
    if any(n.endswith("shards/000000/COMMIT.json") for n in names):
      break
    assert p.poll() is None, f"run ended before the kill:\n{_tail(log)}"
    assert time.time() < deadline, "no table shard within 1200 s"
    time.sleep(0.5)
  p.send_signal(signal.SIGKILL)
  assert p.wait() == -signal.SIGKILL
  assert wd.committed(run, "gradients") is not None and wd.committed(run, "tables") is None
  p = _tda(run, emulator, log)
  assert p.wait(timeout=1200) == 0, _tail(log)
  names = set(_objects(emulator, "run/"))
  for stage in ALL_STAGES:
    assert f"run/{stage}/COMMITTED.json" in names, stage
    assert f"run/{stage}/STARTED.json" not in names, stage
  assert "run/results/viewer.html" in names and "run/results/metrics.json" in names
  # The killed run wrote no timings; the resumed one skipped what was committed.
  assert len(wd.read_json(f"{run}/results/timings.json")["runs"]) == 1
  # Uninterrupted reference: the same committed upstream, copied to a local workdir,
  # and the tables stage onwards run there without a kill.
  local = str(tmp_path / "local")
  for stage in UPSTREAM_OF_TABLES:
    fs.copy_tree(f"{run}/{stage}", os.path.join(local, stage))
  ref = _tda(local, {}, log)
  assert ref.wait(timeout=1200) == 0, _tail(log)
  got, want = _outputs(run), _outputs(local)
  assert sorted(got) == sorted(want)
  assert {"ranking trackstar", "ranking bm25", "metrics"} < set(want) and len(want) == 4
  for key in want:
    assert got[key] == want[key], key


def test_external_checkpoint_on_gs_is_described_and_restored(emulator):
  from tests import test_own_checkpoint  # pylint: disable=g-import-not-at-top
  path = f"gs://{gcs_emulator.BUCKET}/external/checkpoints"
  saved = test_own_checkpoint._save_checkpoint(path, helpers.tiny_config(), steps=(2,))
  config = test_own_checkpoint._config(path)
  described = train_lib.describe_checkpoint(config)
  assert (described["path"], described["step"]) == (path, 2)
  _, state, _ = train_lib.load_trained(config, path)
  for a, b in zip(*(jax.tree.leaves(t) for t in (state.params, saved[2]))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

"""Faults: a run killed inside each stage resumes to the same outputs; one flipped
byte in any kind of committed artefact is refused, naming it; a full disk during
the tables stage stops with a clear error and commits nothing half-written; a bad
shard is repaired by recomputing only that shard.

The kills are real: `tda.faults` (TDA_FAULT_AT=<stage>:<point>) makes the run's
process SIGKILL itself there. One chain of runs shares the work: each run resumes
what the previous one was killed in and is killed at the next point; the last
run finishes, and every stage is compared with the uninterrupted `default_run`.
"""

import json
import os
import resource
import shutil
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tda import faults
from tda import tables as tables_lib
from tda import verify
from tda import workdir as wd
from tda.stages import NAMES
from tests import helpers

CONFIG = os.path.join(helpers.ROOT, "configs", "trackstar_tiny.py")
# In pipeline order; the resumable stages also inside their work.
POINTS = ("world:commit", "vocab:commit", "train:checkpoint", "train:commit",
          "second_moments:commit", "model_eval:commit", "gradients:commit",
          "tables:shard", "tables:commit", "retrieval:commit", "evaluation:commit",
          "viewer:commit")
# Summary fields that describe the run, not its outputs (a resumed run differs).
VOLATILE = {"wall_s", "timings_s", "tokens_per_s", "rows_per_s_process0",
            "featurised_rows_this_run_process0", "resumed_from", "written_at",
            "created_at", "host",
            # The loss of the steps this run took (NaN when it resumed at the last one);
            # the checkpoints' own metadata, compared, holds each step's loss.
            "final_loss",
            # The viewer page's size: it is titled with the workdir's name.
            "bytes"}


def _drop_volatile(x):
  if isinstance(x, dict):
    return {k: _drop_volatile(v) for k, v in x.items() if k not in VOLATILE}
  if isinstance(x, list):
    return [_drop_volatile(v) for v in x]
  return x


def _outputs(stage_dir):
  """What a stage computed: every file's content (JSON without run descriptions;
  orbax checkpoints as their arrays: their data files have random names; the
  workdir's name, which the viewer page shows, as W)."""
  out = {}
  name = os.path.basename(os.path.dirname(os.path.abspath(stage_dir))).encode()
  ckpt = os.path.join(stage_dir, "checkpoints")
  for root, dirs, files in os.walk(stage_dir):
    dirs.sort()
    if os.path.dirname(root) == ckpt:  # One orbax step: compare the restored tree.
      dirs[:] = []
      tree = ocp.PyTreeCheckpointer().restore(os.path.join(root, "state"))
      flat = {"/".join(str(k) for k in path): np.asarray(v) for path, v in
              jax.tree_util.tree_flatten_with_path(tree)[0]}
      out[os.path.relpath(root, stage_dir)] = {k: v.tobytes() for k, v in flat.items()}
      out[os.path.relpath(root, stage_dir) + "/meta"] = _drop_volatile(
          wd.read_json(os.path.join(root, "meta", "metadata")))
      continue
    for f in files:
      rel = os.path.relpath(os.path.join(root, f), stage_dir)
      if f in (wd.MARKER, wd.STARTED):
        continue
      with open(os.path.join(root, f), "rb") as fh:
        data = fh.read()
      out[rel] = (_drop_volatile(json.loads(data)) if f.endswith(".json") else
                  data.replace(name, b"W") if f.endswith(".html") else data)
  return out


def _assert_same_outputs(a, b, what):
  oa, ob = _outputs(a), _outputs(b)
  assert sorted(oa) == sorted(ob), what
  differ = [k for k in oa if oa[k] != ob[k]]
  assert not differ, f"{what}: {differ[:10]}"


@pytest.fixture(scope="module")
def killed_chain(default_run, tmp_path_factory):
  """Runs killed at each point in turn, then one that finishes: (workdir, {point: info})."""
  w = str(tmp_path_factory.mktemp("killed"))
  info = {}
  for point in POINTS:
    stage = point.split(":")[0]
    p = helpers.run_tda(w, check=False, env={faults.ENV: point})
    folder = wd.stage_dir(w, stage)  # Uncommitted after the kill: STARTED.json + partial.
    info[point] = {"rc": p.returncode, "stderr": p.stderr[-2000:],
                   "committed": wd.committed(w, stage) is not None,
                   "tmp": helpers.file_snapshot(folder) if os.path.isdir(folder) else None}
  helpers.run_tda(w)
  return w, info


@pytest.mark.slow
@pytest.mark.parametrize("point", POINTS)
def test_run_killed_inside_a_stage_resumes_to_the_same_outputs(point, killed_chain,
                                                                default_run):
  w, info = killed_chain
  stage, at = point.split(":")
  got = info[point]
  assert got["rc"] == -signal.SIGKILL, got["stderr"]
  assert not got["committed"] and got["tmp"], f"{point}: nothing left to resume"
  if at != "commit":  # Inside a resumable stage's work: what it had committed is kept.
    kept = {rel: m for rel, m in got["tmp"].items()
            if rel.startswith("checkpoints/10/") or "/shards/000000/" in rel}
    assert kept, sorted(got["tmp"])[:20]
    now = helpers.file_snapshot(wd.stage_dir(w, stage))
    assert {rel: now.get(rel) for rel in kept} == kept  # Not rewritten: resumed.
  _assert_same_outputs(wd.stage_dir(w, stage), wd.stage_dir(default_run, stage), point)
  assert verify.verify_stage(w, stage).status == "ok"


def _linked_copy(src, dst):
  """A copy of a workdir whose files are hard links (cheap); `_flip` breaks a link."""
  shutil.copytree(src, dst, copy_function=os.link)
  return str(dst)


def _flip(path, offset=None):
  with open(path, "rb") as f:
    data = bytearray(f.read())
  i = len(data) // 2 if offset is None else offset
  data[i] ^= 0x01
  os.remove(path)  # A new inode: the linked original is untouched.
  with open(path, "wb") as f:
    f.write(bytes(data))


def _first_file(d):
  return sorted(os.listdir(d))[0]


def _ctx(workdir):
  import importlib.util
  spec = importlib.util.spec_from_file_location("trackstar_tiny_config", CONFIG)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return helpers.context(mod.get_config("runlocal"), workdir)


# (kind, file in the workdir, what reads it, what the refusal must name).
ARTEFACTS = (
    ("table chunk", "tables/trackstar/shards/000001/vectors/c/0/0",
     lambda c: c.table("trackstar").read_shard(1), "shard 000001"),
    ("table shard ids", "tables/trackstar/shards/000000/ids.json",
     lambda c: c.table("trackstar").read_shard(0), "ids.json"),
    ("table manifest", "tables/trackstar/manifest.json",
     lambda c: c.table("trackstar"), "trackstar/manifest.json"),
    ("whitening matrix", "gradients/whitener_trackstar.npy",
     lambda c: c.gradients.whitener("trackstar"), "whitener_trackstar.npy"),
    ("R matrix", "gradients/r_train_corrected.npy",
     lambda c: c.gradients, "r_train_corrected.npy"),
    ("query vectors", "gradients/queries_final_trackstar.npy",
     lambda c: c.gradients.final_queries("trackstar"), "queries_final_trackstar.npy"),
    ("retrieval result", "retrieval/trackstar.json", lambda c: c.rankings, "trackstar.json"),
    ("stage summary", "model_eval/summary.json", lambda c: c.summary("model_eval"),
     "summary.json"),
    ("JSONL output", "model_eval/predictions.jsonl", lambda c: c.predictions,
     "predictions.jsonl"),
    ("world passages", "world/passages.jsonl", lambda c: c.world, "passages.jsonl"),
    ("vocabulary", "vocab/spm.model", lambda c: c.vocab_path, "spm.model"),
    ("checkpoint metadata", "train/checkpoints/20/_CHECKPOINT_METADATA",
     lambda c: c.checkpoint_dir, "_CHECKPOINT_METADATA"),
    ("checkpoint array data", "train/checkpoints/20/state/manifest.ocdbt",
     lambda c: c.checkpoint_dir, "manifest.ocdbt"),
    ("evaluation metrics", "evaluation/results/metrics.json", None, "metrics.json"),
)


@pytest.mark.slow
@pytest.mark.parametrize("kind,rel,read,name", ARTEFACTS, ids=[a[0] for a in ARTEFACTS])
def test_one_flipped_byte_is_refused_naming_the_artefact(kind, rel, read, name,
                                                         default_run, tmp_path):
  w = _linked_copy(default_run, tmp_path / "w")
  assert os.path.exists(os.path.join(w, rel)), rel
  _flip(os.path.join(w, rel))
  if read is not None:  # The pipeline's own reader refuses it before using it.
    with pytest.raises((verify.ArtefactCorrupted, tables_lib.TableCorrupted)) as e:
      read(_ctx(w))
    assert name in str(e.value), str(e.value)
  stage = rel.split("/")[0]
  v = verify.verify_stage(w, stage)
  assert v.status == "FAILED" and name in v.detail, v.line()
  others = [verify.verify_stage(w, s) for s in NAMES if s != stage]
  assert all(o.status == "ok" for o in others), [o.line() for o in others]


@pytest.mark.slow
def test_verify_command_passes_a_clean_workdir_and_names_a_bad_shard(default_run, tmp_path,
                                                                     capsys):
  assert verify.report(default_run) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == len(NAMES) + 1 and all(": ok: " in l for l in lines[:-1]), lines
  w = _linked_copy(default_run, tmp_path / "w")
  _flip(os.path.join(w, "tables/exp1/shards/000002/vectors/c/0/0"))
  assert verify.report(w, as_json=True) == 1
  out = capsys.readouterr().out
  got = json.loads(out)
  assert not got["ok"] and got["failed"] == ["tables"], got
  assert "shard 000002" in json.dumps(got) and "tables/exp1" in json.dumps(got)


@pytest.mark.slow
def test_workdir_committed_without_hashes_is_reported_not_passed(default_run, tmp_path,
                                                                 capsys):
  w = _linked_copy(default_run, tmp_path / "w")
  for stage in ("world", "tables"):  # As committed before file hashes were recorded.
    marker = os.path.join(w, stage, wd.MARKER)
    m = wd.read_json(marker)
    os.remove(marker)
    wd.write_json(marker, {"fingerprint": m["fingerprint"]})
  assert verify.report(w) == 0
  out = capsys.readouterr().out
  assert "world: UNRECORDED: committed without file hashes" in out
  assert "tables: PARTIAL:" in out and "NOT fully verified" in out
  assert verify.report(w, strict=True) == 1
  chunk = os.path.join(w, "tables/trackstar/shards/000000/vectors/c/0/0")
  _flip(chunk)
  assert verify.report(w) == 1  # Shards are checked against the manifest.
  assert "shard 000000" in capsys.readouterr().out
  assert verify.report(w, adopt_first=True) == 1  # A failing stage is not adopted...
  assert "tables: not adopted" in capsys.readouterr().out
  _flip(chunk)  # (flipped back)
  assert verify.report(w, adopt_first=True, strict=True) == 0  # ...a sound one is.
  assert wd.committed(w, "world")[verify.FILES]


@pytest.mark.slow
def test_naming_a_committed_stage_verifies_what_it_was_computed_from(default_run, tmp_path):
  # The bar: flip a table byte, rerun --config.stages=retrieval (committed).
  w = _linked_copy(default_run, tmp_path / "w")
  _flip(os.path.join(w, "tables", "trackstar", "shards", "000001", "vectors", "c", "0", "0"))
  stages = [s for s in os.listdir(w) if os.path.isdir(os.path.join(w, s))]
  before = {s: helpers.file_snapshot(os.path.join(w, s)) for s in stages}
  p = helpers.run_tda(w, "--config.stages=retrieval", check=False)
  assert p.returncode != 0, p.stderr[-2000:]
  assert "shard 000001" in p.stderr and "trackstar" in p.stderr, p.stderr[-2000:]
  assert {s: helpers.file_snapshot(os.path.join(w, s)) for s in stages} == before
  # The same on an intact copy: verified, then skipped.
  helpers.run_tda(_linked_copy(default_run, tmp_path / "ok"), "--config.stages=retrieval")


@pytest.mark.slow
def test_repair_recomputes_only_the_deleted_shard(default_run, tmp_path):
  w = _linked_copy(default_run, tmp_path / "w")
  bad = os.path.join(w, "tables", "trackstar", "shards", "000001")
  _flip(os.path.join(bad, "vectors", "c", "0", "0"))
  shutil.rmtree(os.path.join(w, "retrieval"))  # So that the rerun reads the tables.
  p = helpers.run_tda(w, "--config.stages=retrieval", check=False)
  assert p.returncode != 0 and "shard 000001" in p.stderr and "--repair" in p.stderr
  assert wd.committed(w, "retrieval") is None  # Nothing was committed.
  before = helpers.file_snapshot(os.path.join(w, "tables"))
  assert verify.report(w, repair_first=True) == 0
  assert not os.path.exists(bad) and wd.committed(w, "tables") is None
  assert os.path.exists(os.path.join(w, "tables", wd.STARTED))  # Reopened: resumes.
  helpers.run_tda(w, "--config.stages=tables,retrieval")
  s = wd.read_json(os.path.join(w, "tables", "summary.json"))
  assert s["featurised_rows_this_run_process0"] == 64  # One shard (rows_per_shard).
  after = helpers.file_snapshot(os.path.join(w, "tables"))
  untouched = [r for r in before if "/shards/" in r and
               not r.startswith("trackstar/shards/000001/")]
  assert untouched and all(after[r] == before[r] for r in untouched)
  _assert_same_outputs(os.path.join(w, "tables"), os.path.join(default_run, "tables"),
                       "tables after repair")
  _assert_same_outputs(os.path.join(w, "retrieval"), os.path.join(default_run, "retrieval"),
                       "retrieval after repair")


def _limit_file_size(limit):
  def pre():
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # A write past it fails (EFBIG).
  return pre


@pytest.mark.slow
def test_full_disk_during_tables_is_a_clear_error_and_commits_nothing_half_written(
    default_run, tmp_path):
  # A size-limited process (RLIMIT_FSIZE: no root needed): a table chunk write fails
  # as on a full disk (EFBIG here, ENOSPC there: both reach the same handler).
  w = str(tmp_path / "w")
  os.makedirs(w)
  for stage in ("world", "vocab", "train", "second_moments", "model_eval", "gradients"):
    shutil.copytree(os.path.join(default_run, stage), os.path.join(w, stage),
                    copy_function=os.link)
  p = helpers.run_tda(w, "--config.stages=tables", check=False,
                      preexec_fn=_limit_file_size(32 << 10))
  assert p.returncode != 0
  assert "error: table" in p.stderr and "writing shard 000000 failed" in p.stderr, (
      p.stderr[-3000:])
  assert "File too large" in p.stderr or "No space left" in p.stderr
  assert wd.committed(w, "tables") is None
  tmp = wd.stage_dir(w, "tables")
  for table in os.listdir(tmp):
    shards = os.path.join(tmp, table, "shards")
    if os.path.isdir(shards):  # No partial shard, and no shard without its record.
      for s in os.listdir(shards):
        assert os.path.exists(os.path.join(shards, s, "COMMIT.json")), s
  helpers.run_tda(w, "--config.stages=tables")  # Space again: the rerun finishes.
  _assert_same_outputs(wd.stage_dir(w, "tables"), wd.stage_dir(default_run, "tables"),
                       "tables after a full disk")

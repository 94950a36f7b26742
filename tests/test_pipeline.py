"""End to end: the default pipeline, shrunk (`:runlocal`), from an empty workdir;
resuming skips committed work; bad input stops early and overwrites nothing."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "byo")


def run_tda(workdir, *overrides, config="configs/trackstar_tiny.py:runlocal", check=True):
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  p = subprocess.run([sys.executable, "-m", "tda.run", f"--config={config}",
                      f"--workdir={workdir}", *overrides], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=900)
  if check and p.returncode != 0:
    raise AssertionError(f"tda.run failed:\n{p.stderr[-4000:]}")
  return p


def _snapshot(workdir):
  out = {}
  for dirpath, _, files in os.walk(workdir):
    for f in files:
      path = os.path.join(dirpath, f)
      if "results" not in path:
        out[path] = os.stat(path).st_mtime_ns
  return out


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
  w = str(tmp_path_factory.mktemp("default"))
  run_tda(w)
  return w


def test_default_run_writes_everything(default_run):
  res = os.path.join(default_run, "results")
  for f in ("model_eval.json", "metrics.json", "table.md", "table.csv", "table_by_bucket.md",
            "fig_table.png", "fig_by_bucket.png", "viewer.html", "timings.json"):
    assert os.path.getsize(os.path.join(res, f)) > 0, f
  me = json.load(open(os.path.join(res, "model_eval.json")))
  assert 0.0 <= me["query_accuracy"] <= 1.0 and set(me["accuracy_by_bucket"]) <= {"1", "2-3", "4-10", "11-30"}
  m = json.load(open(os.path.join(res, "metrics.json")))
  for name in ("trak", "exp1", "exp2", "exp3", "exp4", "exp5", "trackstar", "trackstar_no_task_r", "bm25"):
    entry = m["methods"][name]
    for key in ("mrr", "recall_at_10", "tailpatch_abs", "tailpatch_rel", "by_bucket"):
      assert key in entry, (name, key)
    assert 0.0 <= entry["mrr"] <= 1.0
  for stage in ("world", "vocab", "train", "model_eval", "gradients", "tables", "retrieval"):
    assert stage in m["timings_s"], stage
  rows = [json.loads(l) for l in open(os.path.join(res, "proponents", "trackstar.jsonl"))]
  assert len(rows) == me["num_queries"] and len(rows[0]["proponent_ids"]) == 10
  assert rows[0]["example_id"].startswith("trex")


def test_rerun_skips_committed_stages(default_run):
  before = _snapshot(default_run)
  run_tda(default_run)
  assert _snapshot(default_run) == before  # Nothing outside results/ was rewritten.
  t = json.load(open(os.path.join(default_run, "results", "timings.json")))["last"]
  assert t["train"] < 5 and t["tables"] < 5


def test_changed_model_is_refused_and_nothing_overwritten(default_run):
  before = _snapshot(default_run)
  p = run_tda(default_run, "--config.model.d_model=96", check=False)
  assert p.returncode != 0
  assert "d_model" in p.stderr and "refusing" in p.stderr.lower()
  assert _snapshot(default_run) == before


def test_unknown_config_key_is_a_clear_error(tmp_path):
  p = run_tda(str(tmp_path / "w"), "--config.model.no_such_knob=3", check=False)
  assert p.returncode != 0 and "no_such_knob" in p.stderr
  assert not os.path.exists(tmp_path / "w")


def test_unsatisfiable_world_is_a_clear_error(tmp_path):
  w = str(tmp_path / "w")
  p = run_tda(w, "--config.world.facts_per_bucket=(5000,5000,5000,5000)", check=False)
  assert p.returncode != 0 and "world.facts_per_bucket" in p.stderr
  assert not os.path.exists(os.path.join(w, "world"))


def test_bring_your_own_data_runs_end_to_end(tmp_path):
  w = str(tmp_path / "byo")
  run_tda(w, "--config.world.source=byo",
          f"--config.world.byo_corpus={FIXTURES}/corpus.jsonl",
          f"--config.world.byo_facts={FIXTURES}/facts.jsonl",
          f"--config.world.byo_sentences={FIXTURES}/sentences.jsonl",
          "--config.data.vocab_size=400", "--config.hessian.train_samples=8",
          "--config.eval.methods=('exp2','trackstar','bm25')", "--config.index.k=5",
          "--config.tables.rows_per_shard=8", "--config.gradients.batch_size=4")
  m = json.load(open(os.path.join(w, "results", "metrics.json")))
  assert set(m["methods"]) == {"exp2", "trackstar", "bm25"}
  assert m["methods"]["bm25"]["recall_at_10"] > 0.5  # The fixture sentences are findable.

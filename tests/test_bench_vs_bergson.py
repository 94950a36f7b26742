"""scripts/bench_vs_bergson.py at a small size: the side-by-side still installs, runs
and agrees with bergson (not a timing assertion: a ratio is only reported, and may
be refused when the rounds disagree)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tda import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HAVE_BENCH = all(importlib.util.find_spec(m) is not None
                  for m in ("bergson", "torch", "transformers", "datasets"))


@pytest.mark.slow
@pytest.mark.skipif(not _HAVE_BENCH, reason="needs the `bench` extra and bergson "
                    "(README: pip install -e '.[bench]' && pip install --no-deps bergson==2.5.1)")
def test_side_by_side_small_run_agrees_and_reports_ratio_fields(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  p = subprocess.run(
      [sys.executable, os.path.join(ROOT, "scripts", "bench_vs_bergson.py"), "--json",
       f"--workdir={tmp_path}", "--device=cpu", "--threads=1", "--steps=20", "--vocab=512",
       "--d_model=128", "--n_layers=2", "--d_ff=256", "--seq_len=64", "--proj=8", "--batch=8",
       "--bucket=32", "--n_time=32", "--n_check=32", "--n_queries=8", "--repeats=5",
       "--nofp64_check"],
      capture_output=True, text=True, env=env, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  res = json.loads(p.stdout)
  assert res["agreement_ok"], res["agreement"]
  ag, sp = res["agreement"], res["speed"]
  assert ag["passages_max_norm_aware_err"] <= 1e-4 and ag["queries_max_norm_aware_err"] <= 1e-4
  assert ag["top10_sets_equal"] == "8/8"
  assert len(sp["ratio_per_round"]) == 5 and len(sp["load_average_1min"]) == 5
  assert sp["ratio_min"] <= sp["ratio_median"] <= sp["ratio_max"]
  assert all(r > 0 for r in sp["ratio_per_round"])
  # A ratio, or the reason there is none (the rounds disagree by more than 25%).
  if sp["ratio_refused"] is None:
    assert res["ours_over_bergson_examples_per_s"] == round(sp["ratio_median"], 2)
    assert sp["ratio_spread"] <= 0.25
  else:
    assert res["ours_over_bergson_examples_per_s"] is None
    assert sp["ratio_spread"] > 0.25 and "disagree" in sp["ratio_refused"]
  for side in ("ours", "bergson"):
    assert len(sp[side]["examples_per_s"]) == 5 and sp[side]["threads"] == 1
    assert sp[side]["device"].lower().startswith("cpu")
  # Both sides under the same host allocator policy (tda.host_memory): 'retain' on a
  # CPU, as the parent sets it for both workers, wherever this session could take it.
  assert sp["ours"]["host_malloc"] == sp["bergson"]["host_malloc"]
  if host_memory.STATUS == "retain":
    assert sp["ours"]["host_malloc"] == "retain"


def _ratio_summary(ratios):
  """The script's `ratio_summary`, run in a subprocess (the script defines absl flags)."""
  code = ("import json, sys; sys.path.insert(0, 'scripts'); import bench_vs_bergson as b; "
          f"print(json.dumps(b.ratio_summary({ratios!r})))")
  p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                     env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
  assert p.returncode == 0, p.stderr[-2000:]
  return json.loads(p.stdout.strip().splitlines()[-1])


def test_ratio_summary_refuses_when_rounds_disagree():
  ok = _ratio_summary([1.5, 1.6, 1.55, 1.62, 1.58])
  assert ok["ratio_refused"] is None and ok["ours_over_bergson_examples_per_s"] == 1.58
  assert (ok["ratio_min"], ok["ratio_max"]) == (1.5, 1.62)
  bad = _ratio_summary([0.99, 0.81, 1.7, 1.6, 1.65])
  assert bad["ours_over_bergson_examples_per_s"] is None and "disagree" in bad["ratio_refused"]
  assert bad["ratio_median"] == 1.6  # Still reported, as what was measured.
  few = _ratio_summary([1.5, 1.5])
  assert few["ours_over_bergson_examples_per_s"] is None and "at least 5" in few["ratio_refused"]

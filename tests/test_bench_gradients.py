"""scripts/bench_gradients.py end to end at a small size: the side-by-side figures and
the per-phase profile, as the README gives their command lines."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "bench_gradients.py")
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _run(*flags):
  r = subprocess.run([sys.executable, SCRIPT, "--rounds=2", "--seq_len=32", "--json", *flags],
                     capture_output=True, text=True, timeout=900, env=ENV, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(r.stdout)  # Exactly one JSON object, on one line.


@pytest.mark.slow
def test_side_by_side_figures():
  out = _run()
  for name in ("train_step", "factored", "factored_corrected_only", "reference", "forward"):
    assert out[f"{name}_examples_per_s"] > 0 and out[f"{name}_peak_bytes"] > 0, name
  assert out["factored_over_train_step"] > 0 and out["reference_over_factored"] > 0
  assert 0 < out["achieved_gflops"] and 0 < out["peak_gflops"]
  assert out["achieved_over_peak"] == pytest.approx(out["achieved_gflops"] / out["peak_gflops"])
  # The target-rows head gives the full head's vectors (float32 rounding only).
  assert out["query_target_rows_max_abs_diff"] < 1e-4


@pytest.mark.slow
def test_profile_phases_are_per_round_differences_with_their_range(tmp_path):
  path = str(tmp_path / "prof.json")
  out = _run(f"--profile={path}")
  with open(path) as f:
    assert json.load(f) == out
  assert [s["shape"] for s in out["shapes"]] == ["bench", "bergson_bench"]
  for sh in out["shapes"]:
    med, rng = sh["phase_ms_per_batch"], sh["phase_ms_range"]
    assert sorted(med) == sorted(["forward", "activation_backward", "projection",
                                  "correction", "whitening", "host_io"])
    for k, v in med.items():
      lo, hi = rng[k]
      assert lo <= v <= hi, (sh["shape"], k)
    # Within noise: exactly the phases some round measured at or below 0. A median
    # below 0 counts 0 in the shares, which sum to 1.
    assert sorted(sh["phases_within_noise"]) == sorted(k for k, (lo, _) in rng.items()
                                                       if lo <= 0)
    total = sum(max(v, 0.0) for v in med.values())
    for k, v in med.items():
      assert sh["phase_share"][k] == pytest.approx(max(v, 0.0) / total, abs=2e-3), k
    assert sum(sh["phase_share"].values()) == pytest.approx(1.0, abs=0.01)
    # Programs that exist on their own are timed, never differenced.
    assert med["forward"] == sh["program_ms_per_batch"]["forward"] > 0
    assert np.all([v > 0 for v in sh["program_ms_per_batch"].values()])
    assert sh["featurizer_ms_per_batch"] > 0 and sh["rounds"] == 2

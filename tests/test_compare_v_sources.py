"""scripts/compare_v_sources.py on two tiny workdirs: one trained (V from its
Adafactor state), one sharing its world/vocab/train with V estimated.

The script copies each gradient method's MRR / recall@10 from the workdirs'
`results/metrics.json` (the evaluation stage's file); running evaluation is not
what is tested here, so each workdir gets a small metrics.json of its own and the
test checks those numbers come through unchanged. The V cosines are computed by
the script from the committed checkpoint and estimate."""

import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest

from configs import trackstar_tiny
from tda import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = {"train.steps": 4, "train.checkpoint_every": 4, "train.warmup_steps": 2,
             "gradients.v_estimate_samples": 16, "trend.sizes": ()}
METRICS = {"ck": {"trackstar": {"family": "gradient", "mrr": 0.5, "recall_at_10": 0.75},
                  "bm25": {"family": "lexical", "mrr": 0.25, "recall_at_10": 0.5}},
           "est": {"trackstar": {"family": "gradient", "mrr": 0.375, "recall_at_10": 0.625}}}


def _config(**extra):
  c = trackstar_tiny.get_config("runlocal")
  c.unlock()
  for k, v in {**OVERRIDES, **extra}.items():
    *section, key = k.split(".")
    (c[section[0]] if section else c)[key] = v
  c.lock()
  return c


def _write_metrics(workdir, methods):
  os.makedirs(os.path.join(workdir, "results"), exist_ok=True)
  with open(os.path.join(workdir, "results", "metrics.json"), "w") as f:
    json.dump({"methods": methods}, f)


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  ck, est = (str(tmp_path_factory.mktemp(n)) for n in ("ck", "est"))
  pipeline.run(_config(stages="world,vocab,train"), ck)
  for stage in ("world", "vocab", "train"):
    shutil.copytree(os.path.join(ck, stage), os.path.join(est, stage))
  pipeline.run(_config(stages="second_moments", **{"gradients.v_source": "estimate"}), est)
  _write_metrics(ck, METRICS["ck"])
  _write_metrics(est, METRICS["est"])
  return ck, est


def _script(ck, est, *flags):
  args = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  p = subprocess.run(
      [sys.executable, "scripts/compare_v_sources.py",
       "--config=configs/trackstar_tiny.py:runlocal", *args, f"--checkpoint_workdir={ck}",
       f"--estimate_workdir={est}", *flags],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"})
  assert p.returncode == 0, p.stderr[-3000:]
  return p.stdout


@pytest.mark.slow
def test_json_has_every_field_and_cosines_in_range(workdirs):
  out = json.loads(_script(*workdirs, "--json"))
  assert set(out) == {"methods", "cosine_by_param", "cosine_by_kind", "cos_v_mean",
                      "cos_inv_sqrt_v_mean", "estimate_summary"}
  assert out["methods"] == {"trackstar": {
      "checkpoint": {"mrr": 0.5, "recall_at_10": 0.75},
      "estimate": {"mrr": 0.375, "recall_at_10": 0.625}}}  # Gradient methods only.
  per_param = out["cosine_by_param"]
  assert "embed/embedding" in per_param and "final_norm/scale" in per_param
  assert len(per_param) == 1 + 2 * 8 + 1  # Embedding, 2 layers x (7 kernels + norm), final norm.
  for name, r in per_param.items():
    for key in ("cos_v", "cos_inv_sqrt_v"):
      assert math.isfinite(r[key]) and -1.0 <= r[key] <= 1.0 + 1e-6, (name, key, r[key])
    assert math.isfinite(r["mean_v_ratio"]) and r["mean_v_ratio"] > 0, (name, r)
  assert set(out["cosine_by_kind"]) == {"embeddings", "attention", "mlp", "norms"}
  for key in ("cos_v_mean", "cos_inv_sqrt_v_mean"):
    assert math.isfinite(out[key]) and -1.0 <= out[key] <= 1.0 + 1e-6
  summary = out["estimate_summary"]
  assert summary["samples"] == 16 and summary["v_source"] == "estimate"


@pytest.mark.slow
def test_printed_report(workdirs):
  lines = _script(*workdirs).splitlines()
  assert lines[0] == "trackstar: checkpoint V  MRR 0.5000  recall@10 0.7500"
  assert lines[1] == "trackstar: estimated V   MRR 0.3750  recall@10 0.6250"
  assert lines[2].startswith("cosine(V_ckpt, V_est): mean ")
  means = [float(x) for x in re.findall(r"mean (-?[0-9.]+)", lines[2])]
  assert len(means) == 2 and all(-1.0 <= m <= 1.0 + 1e-6 for m in means)
  assert sum(line.strip().startswith("embed/embedding ") for line in lines) == 1

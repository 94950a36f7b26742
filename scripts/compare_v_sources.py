"""Compares V from the checkpoint's optimizer state with V estimated from per-example
gradients (`gradients.v_source`), on two finished `tda.run` workdirs of one config.

    python scripts/compare_v_sources.py --config=configs/trackstar_tiny.py:runlocal \
        --checkpoint_workdir=W_ck --estimate_workdir=W_est [--json]

`--checkpoint_workdir` ran with `v_source='checkpoint'`, `--estimate_workdir` with
`'estimate'` (its world/vocab/train may be copies of the first's). Reports each
gradient method's MRR and recall@10 in both, and per parameter the cosine between
the two V's (Adafactor's factored V expanded to the full matrix), between their
1/sqrt(V) (the correction actually applied) and the ratio of their mean V
(the estimate is of per-example, not mini-batch, gradients: only the shape of V
matters to unit-normalised vectors), with means by parameter kind.
"""

from __future__ import annotations

import copy
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tda import cli  # pylint: disable=g-import-not-at-top
from tda import context as context_lib
from tda import projection as proj
from tda import v_estimate
from tda import workdir as wd

_CONFIG = config_flags.DEFINE_config_file("config", None, "The runs' config file.",
                                          lock_config=False)
_CK = flags.DEFINE_string("checkpoint_workdir", None, "Workdir run with v_source='checkpoint'.")
_EST = flags.DEFINE_string("estimate_workdir", None, "Workdir run with v_source='estimate'.")
_JSON = cli.define_json_flag()
flags.mark_flags_as_required(["config", "checkpoint_workdir", "estimate_workdir"])


def _metrics(workdir: str) -> dict[str, dict[str, float]]:
  m = wd.read_json(os.path.join(workdir, "results", "metrics.json"))
  return {name: {"mrr": r.get("mrr"), "recall_at_10": r.get("recall_at_10")}
          for name, r in m["methods"].items() if r.get("family") == "gradient"}


def compare(config, checkpoint_workdir: str, estimate_workdir: str) -> dict:
  """The comparison record (see the module docstring)."""
  ck_config = copy.deepcopy(config)
  ck_config.gradients.v_source = "checkpoint"
  est_config = copy.deepcopy(config)
  est_config.gradients.v_source = "estimate"
  ck = context_lib.Context(config=ck_config, workdir=checkpoint_workdir)
  est = context_lib.Context(config=est_config, workdir=estimate_workdir)
  _, state, _ = ck.trained
  per_param = v_estimate.compare(est.second_moments, state.opt_state, state.params)
  by_kind: dict[str, dict[str, list[float]]] = {}
  for name, r in per_param.items():
    row = by_kind.setdefault(proj.param_kind(name.split("/")), {"cos_v": [], "cos_inv_sqrt_v": []})
    row["cos_v"].append(r["cos_v"])
    row["cos_inv_sqrt_v"].append(r["cos_inv_sqrt_v"])
  ck_m, est_m = _metrics(checkpoint_workdir), _metrics(estimate_workdir)
  return {
      "methods": {m: {"checkpoint": ck_m[m], "estimate": est_m.get(m)} for m in ck_m},
      "cosine_by_param": per_param,
      "cosine_by_kind": {k: {s: float(np.mean(v)) for s, v in row.items()}
                         for k, row in by_kind.items()},
      "cos_v_mean": float(np.mean([r["cos_v"] for r in per_param.values()])),
      "cos_inv_sqrt_v_mean": float(np.mean([r["cos_inv_sqrt_v"]
                                            for r in per_param.values()])),
      "estimate_summary": est.summary("second_moments"),
  }


def main(argv):
  del argv
  cli.emit(as_json=_JSON.value, report=_report,
           measure=lambda: compare(_CONFIG.value, _CK.value, _EST.value))


def _report(out) -> None:
  for m, r in out["methods"].items():
    print(f"{m}: checkpoint V  MRR {r['checkpoint']['mrr']:.4f}  "
          f"recall@10 {r['checkpoint']['recall_at_10']:.4f}")
    if r["estimate"]:
      print(f"{m}: estimated V   MRR {r['estimate']['mrr']:.4f}  "
            f"recall@10 {r['estimate']['recall_at_10']:.4f}")
  print(f"cosine(V_ckpt, V_est): mean {out['cos_v_mean']:.4f}; "
        f"cosine of 1/sqrt(V): mean {out['cos_inv_sqrt_v_mean']:.4f}")
  for k, r in out["cosine_by_kind"].items():
    print(f"  {k:<11} cos V {r['cos_v']:.4f}  cos 1/sqrt(V) {r['cos_inv_sqrt_v']:.4f}")
  for name, r in out["cosine_by_param"].items():
    print(f"  {name:<28} cos V {r['cos_v']:.4f}  cos 1/sqrt(V) {r['cos_inv_sqrt_v']:.4f}  "
          f"mean V est/ckpt {r['mean_v_ratio']:.3g}")


if __name__ == "__main__":
  app.run(main)

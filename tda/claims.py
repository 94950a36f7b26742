"""The paper's orderings (DESIGN.md §2), checked on our metrics."""

from __future__ import annotations

from typing import Any

from tda import methods as methods_lib
from tda import json_values

TRAK_NEAR_ZERO_MRR = 0.05


def _claim(text: str, holds: bool, values: dict[str, Any]) -> dict[str, Any]:
  return {"claim": text, "holds": bool(holds), "values": values}


def paper_orderings(*, methods: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
  """Checks the paper's orderings (DESIGN.md §2) on our numbers.

  Args:
    methods: name -> {"family", "mrr", "recall_at_10", "tailpatch_abs"} (the
      `methods` section of metrics.json; tailpatch may be None/NaN).

  Returns:
    claim name -> {"claim": text, "holds": bool, "values": the numbers
    compared}; a claim is present only when every method it needs is (and has
    the number).
  """
  def val(m: str, key: str) -> float | None:
    return json_values.finite_or_none(methods[m].get(key)) if m in methods else None

  out = {}
  grad = [m for m, e in methods.items() if e.get("family") == "gradient"]
  base = [m for m, e in methods.items() if e.get("family") == "baseline"]
  if base and grad:
    lo = min(base, key=lambda m: val(m, "mrr"))
    hi = max(grad, key=lambda m: val(m, "mrr"))
    out["baselines_beat_gradient_mrr"] = _claim(
        "min over bm25/dense of MRR > max over gradient methods of MRR",
        val(lo, "mrr") > val(hi, "mrr"),
        {"min_baseline": {lo: val(lo, "mrr")}, "max_gradient": {hi: val(hi, "mrr")}})
  others = [m for m in grad if m != "trackstar"]
  if "trackstar" in methods and others:
    for key, label in (("mrr", "MRR"), ("recall_at_10", "recall@10")):
      best = max(others, key=lambda m: val(m, key))
      out[f"trackstar_best_gradient_{'mrr' if key == 'mrr' else 'recall'}"] = _claim(
          f"TrackStar's {label} >= every other gradient method's",
          val("trackstar", key) >= val(best, key),
          {"trackstar": val("trackstar", key), "best_other": {best: val(best, key)}})
  for b in base:
    ts, bv = val("trackstar", "tailpatch_abs"), val(b, "tailpatch_abs")
    if ts is not None and bv is not None:
      out[f"trackstar_tailpatch_gt_{b}"] = _claim(
          f"TrackStar's tail-patch > {b}'s", ts > bv, {"trackstar": ts, b: bv})
  ladder = [m for m in methods_lib.LADDER if m in methods]
  for lo, hi in zip(ladder, ladder[1:]):
    weak = lo == "exp5" and hi == "trackstar"  # Paper: exp5 <= trackstar.
    a, b = val(lo, "mrr"), val(hi, "mrr")
    op = "le" if weak else "lt"
    out[f"mrr_{lo}_{op}_{hi}"] = _claim(
        f"MRR {lo} {'<=' if weak else '<'} {hi}", a <= b if weak else a < b,
        {lo: a, hi: b})
  if "trak" in methods:
    t, e1 = val("trak", "mrr"), val("exp1", "mrr")
    out["trak_near_zero"] = _claim(
        f"TRAK's MRR < {TRAK_NEAR_ZERO_MRR} or below Exp. 1's",
        t < TRAK_NEAR_ZERO_MRR or (e1 is not None and t < e1),
        {"trak": t, "exp1": e1, "threshold": TRAK_NEAR_ZERO_MRR})
  return out

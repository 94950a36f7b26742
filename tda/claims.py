"""The paper's orderings (DESIGN.md §2), judged on our test metrics with CIs.

Every ordering compares two methods on the same test queries with a paired
bootstrap 95% CI of the per-query difference (`tda.metrics.paired_diff_ci`):

* a strict claim ("A < B") **holds** when the CI of B − A lies above 0;
* a weak claim ("A ≤ B", the paper's TrackStar vs Exp. 5 tie) holds when the
  point estimate is on the claimed side and the CI does not lie below 0;
* either **differs** when the CI lies entirely on the opposite side, and is
  **inconclusive** otherwise (the CI straddles 0 and, for a strict claim, or a
  weak one with the point estimate reversed, the data cannot tell).

`holds` (bool) is `verdict == "holds"`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tda import json_values
from tda import methods as methods_lib
from tda import metrics as metrics_lib

TRAK_NEAR_ZERO_MRR = 0.05
HOLDS, DIFFERS, INCONCLUSIVE = "holds", "differs", "inconclusive"


def verdict(ci: dict[str, float], *, strict: bool) -> str:
  """Verdict of "B − A > 0" (strict) or "≥ 0" (weak) from a paired diff CI."""
  d, lo, hi = ci["diff"], ci["lo"], ci["hi"]
  if not all(np.isfinite([d, lo, hi])):
    return INCONCLUSIVE
  if hi < 0:
    return DIFFERS
  if lo > 0 or (not strict and d >= 0):
    return HOLDS
  return INCONCLUSIVE


def _claim(text: str, v: str, values: dict[str, Any]) -> dict[str, Any]:
  return {"claim": text, "verdict": v, "holds": v == HOLDS, "values": values}


def _combine(verdicts: list[str]) -> str:
  if DIFFERS in verdicts:
    return DIFFERS
  return HOLDS if all(v == HOLDS for v in verdicts) else INCONCLUSIVE


def paper_orderings(*, methods: dict[str, dict[str, Any]],
                    per_query: dict[str, dict[str, np.ndarray]] | None = None,
                    n_boot: int = 1000, seed: int = 0) -> dict[str, dict[str, Any]]:
  """Checks the paper's orderings (DESIGN.md §2) on our numbers.

  Args:
    methods: name -> {"family", "mrr", "recall_at_10", "tailpatch_abs"} (the
      `methods` section of metrics.json; tailpatch may be None/NaN).
    per_query: name -> {metric: [q] per-query values on the same queries}; with
      it every ordering is judged by a paired bootstrap CI. Without it (only
      the means known) the CI is degenerate at the difference of the means.
    n_boot, seed: the bootstrap.

  Returns:
    claim name -> {"claim": text, "verdict": holds | differs | inconclusive,
    "holds": bool, "values": the numbers compared, with each difference's CI};
    a claim is present only when every method it needs is (and has the number).
  """
  def val(m: str, key: str) -> float | None:
    return json_values.finite_or_none(methods[m].get(key)) if m in methods else None

  def diff(a: str, b: str, key: str) -> dict[str, float]:
    """b − a with its CI."""
    if per_query is not None and a in per_query and b in per_query:
      return metrics_lib.paired_diff_ci(per_query[a][key], per_query[b][key],
                                        n_boot=n_boot, seed=seed)
    va, vb = val(a, key), val(b, key)
    x = float("nan") if va is None or vb is None else vb - va
    return {"diff": x, "lo": x, "hi": x, "n": 0}

  def has(m: str, key: str) -> bool:
    return val(m, key) is not None

  out = {}
  grad = [m for m, e in methods.items() if e.get("family") == "gradient" and has(m, "mrr")]
  base = [m for m, e in methods.items() if e.get("family") == "baseline" and has(m, "mrr")]
  if base and grad:
    lo = min(base, key=lambda m: val(m, "mrr"))
    hi = max(grad, key=lambda m: val(m, "mrr"))
    ci = diff(hi, lo, "mrr")
    out["baselines_beat_gradient_mrr"] = _claim(
        "min over bm25/dense of MRR > max over gradient methods of MRR",
        verdict(ci, strict=True),
        {"min_baseline": {lo: val(lo, "mrr")}, "max_gradient": {hi: val(hi, "mrr")},
         "diff_ci": ci})
  others = [m for m in grad if m != "trackstar"]
  if "trackstar" in grad and others:
    for key, label, name in (("mrr", "MRR", "mrr"), ("recall_at_10", "recall@10", "recall")):
      cis = {m: diff(m, "trackstar", key) for m in others}
      best = max(others, key=lambda m: val(m, key))
      out[f"trackstar_best_gradient_{name}"] = _claim(
          f"TrackStar's {label} >= every other gradient method's",
          _combine([verdict(c, strict=False) for c in cis.values()]),
          {"trackstar": val("trackstar", key), "best_other": {best: val(best, key)},
           "diff_ci": {f"trackstar-{m}": c for m, c in cis.items()}})
  tp = [m for m in methods if has(m, "tailpatch_abs")]
  if "trackstar" in tp:
    for b in [m for m in base if m in tp]:
      ci = diff(b, "trackstar", "tailpatch_abs")
      out[f"trackstar_tailpatch_gt_{b}"] = _claim(
          f"TrackStar's tail-patch > {b}'s", verdict(ci, strict=True),
          {"trackstar": val("trackstar", "tailpatch_abs"), b: val(b, "tailpatch_abs"),
           "diff_ci": ci})
    rest = [m for m in tp if m != "trackstar"]
    if rest:
      cis = {m: diff(m, "trackstar", "tailpatch_abs") for m in rest}
      best = max(rest, key=lambda m: val(m, "tailpatch_abs"))
      out["trackstar_best_tailpatch"] = _claim(
          "TrackStar's tail-patch >= every other method's",
          _combine([verdict(c, strict=False) for c in cis.values()]),
          {"trackstar": val("trackstar", "tailpatch_abs"),
           "best_other": {best: val(best, "tailpatch_abs")},
           "diff_ci": {f"trackstar-{m}": c for m, c in cis.items()}})
  ladder = [m for m in methods_lib.LADDER if m in grad]
  for lo, hi in zip(ladder, ladder[1:]):
    weak = lo == "exp5" and hi == "trackstar"  # Paper: exp5 <= trackstar.
    ci = diff(lo, hi, "mrr")
    op = "le" if weak else "lt"
    out[f"mrr_{lo}_{op}_{hi}"] = _claim(
        f"MRR {lo} {'<=' if weak else '<'} {hi}", verdict(ci, strict=not weak),
        {lo: val(lo, "mrr"), hi: val(hi, "mrr"), "diff_ci": ci})
  if "trak" in grad:
    t = val("trak", "mrr")
    t_ci = methods["trak"].get("mrr_ci") or [t, t]
    values = {"trak": t, "trak_ci": t_ci, "exp1": val("exp1", "mrr"),
              "threshold": TRAK_NEAR_ZERO_MRR}
    v_exp1 = INCONCLUSIVE
    if "exp1" in grad:
      ci = diff("trak", "exp1", "mrr")
      values["diff_ci"] = ci
      v_exp1 = verdict(ci, strict=True)
    if t_ci[1] is not None and t_ci[1] < TRAK_NEAR_ZERO_MRR or v_exp1 == HOLDS:
      v = HOLDS
    elif v_exp1 == DIFFERS and t_ci[0] is not None and t_ci[0] >= TRAK_NEAR_ZERO_MRR:
      v = DIFFERS
    else:
      v = INCONCLUSIVE
    out["trak_near_zero"] = _claim(
        f"TRAK's MRR < {TRAK_NEAR_ZERO_MRR} or below Exp. 1's", v, values)
  return out

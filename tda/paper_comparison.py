"""`results/paper_comparison.md`: our test table beside the paper's Table 1, and
each of the paper's claims (`tda.claims`) marked holds / differs / inconclusive
with its CI; for each that does not hold, what was measured about it: where the
difference comes from by frequency bucket, and, for methods that use R, the dev
sweep that chose their damping and λ.

Written from metrics.json alone (`write`), so it can be regenerated from a
finished run.
"""

from __future__ import annotations

import os
from typing import Any

from tda import claims as claims_lib
from tda import json_values
from tda import methods as methods_lib
from tda import workdir as workdir_lib

_R_METHODS = ("trak", "exp3", "exp5", "trackstar", "trackstar_no_task_r")


def _f(x: Any, digits: int = 3) -> str:
  x = json_values.finite_or_none(x)
  return "—" if x is None else f"{x:.{digits}f}"


def _ci(v: Any, ci: Any, digits: int = 3, scale: float = 1.0) -> str:
  v = json_values.finite_or_none(v)
  if v is None:
    return "—"
  lo, hi = (ci or [None, None])[:2]
  lo, hi = json_values.finite_or_none(lo), json_values.finite_or_none(hi)
  s = f"{v * scale:.{digits}f}"
  return s if lo is None or hi is None else f"{s} [{lo * scale:.{digits}f}, {hi * scale:.{digits}f}]"


def _diff_ci(ci: dict[str, Any], scale: float = 1.0, digits: int = 3) -> str:
  d, lo, hi = (json_values.finite_or_none(ci.get(k)) for k in ("diff", "lo", "hi"))
  if d is None:
    return "—"
  return f"{d * scale:+.{digits}f} [{(lo or 0) * scale:+.{digits}f}, {(hi or 0) * scale:+.{digits}f}]"


def _table(metrics: dict[str, Any]) -> str:
  ms = metrics["methods"]
  rows = ["| Method | MRR [95% CI] | Paper MRR | Recall@10 [95% CI] | Paper R@10 | "
          "Tail-patch, pp [95% CI] | Paper tail-patch, pp |", "|---|---|---|---|---|---|---|"]
  for m in methods_lib.in_table_order(list(ms)):
    e = ms[m]
    reg = methods_lib.METHODS.get(m)
    p = reg.paper if reg is not None and reg.paper is not None else (None, None, None)
    rows.append(f"| {methods_lib.label(m)} | {_ci(e['mrr'], e.get('mrr_ci'))} | {_f(p[0])} | "
                f"{_ci(e['recall_at_10'], e.get('recall_at_10_ci'))} | {_f(p[1])} | "
                f"{_ci(e['tailpatch_abs'], e.get('tailpatch_abs_ci'), 2, 100)} | {_f(p[2], 2)} |")
  return "\n".join(rows) + "\n"


def _named(values: dict[str, Any]) -> list[str]:
  """The methods a claim compares, from its `values`."""
  out = []
  for k, v in values.items():
    if isinstance(v, dict) and k not in ("diff_ci",):
      out += [m for m in v if m in methods_lib.METHODS]
    elif k in methods_lib.METHODS:
      out.append(k)
  return list(dict.fromkeys(out))


def _evidence(name: str, claim: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
  """What was measured about a claim that does not hold."""
  ms = metrics["methods"]
  key = "tailpatch_abs" if "tailpatch" in name else (
      "recall_at_10" if "recall" in name else "mrr")
  scale, digits = (100.0, 2) if key == "tailpatch_abs" else (1.0, 3)
  names = [m for m in _named(claim["values"]) if m in ms]
  if "trackstar" in ms and "trackstar" not in names and name.startswith("trackstar"):
    names.insert(0, "trackstar")
  out = []
  buckets = list(next(iter(ms.values()))["by_bucket"]) if ms else []
  if names and buckets:
    cells = "; ".join(
        f"{b} (n={ms[names[0]]['by_bucket'][b]['n']}): " + ", ".join(
            f"{m} {_f((ms[m]['by_bucket'][b].get(key) or float('nan')) * scale, digits)}"
            for m in names) for b in buckets)
    out.append(f"By frequency bucket ({key}): {cells}.")
  proto = metrics.get("protocol") or {}
  sweep = ((proto.get("damping") or {}).get("sweep")) or {}
  for m in names:
    for table, sw in sweep.items():
      if m in sw.get("methods", []) and sw.get("candidates"):
        pairs = ", ".join(f"{c:g}: {_f(s, 4)}" for c, s in zip(sw["candidates"], sw["dev_mrr"]))
        edge, added = sw.get("chosen_at_grid_edge"), sw.get("extended_by") or 0
        grown = (f"; the grid grew by {added} candidate{'s' if added > 1 else ''} past the "
                 "end that held the best" if added else "")
        out.append(f"{m}: damping {sw['chosen']:g} chosen on dev (dev MRR by candidate: "
                   f"{pairs}){grown}" + (f"; still the grid's {edge} candidate, so the dev "
                                         "optimum may lie beyond the grid" if edge else "")
                   + ".")
  if any(m in ("trackstar",) for m in names):
    lam = proto.get("lambda") or {}
    out.append(f"λ = {_f(lam.get('value'), 4)} by rule '{lam.get('rule')}'"
               + (f" (K = {lam['top_k']} of d = {(proto.get('d') or {}).get('value')}, "
                  f"{lam.get('dominated')} R_eval directions dominated)"
                  if "top_k" in lam else "") + ".")
  if any(m in _R_METHODS for m in names):
    d = proto.get("d") or {}
    per = ("per dimension of each block of the block-diagonal R" if d.get("block_diagonal")
           else "per dimension")
    out.append(f"R_train from {d.get('train_samples')} passages for d = {d.get('value')} "
               f"({_f(d.get('samples_per_dim'), 1)} {per}).")
  on = ((metrics.get("diagnostics") or {}).get("outlier_norms")) or {}
  shown = [(table, t) for table, t in (on.get("tables") or {}).items()
           if "trak" in names and any(m in names for m in t["methods"])]
  for table, t in shown:
    med = t["median_norm_by_kind"]
    out.append(
        f"Unnormalised {table} gradient norms: median {_f(med.get('outlier'), 1)} for "
        f"outlier passages vs {_f(med.get('fact'), 1)} for fact passages; outliers are "
        f"{_f(100 * t['share_of_corpus'], 1)}% of the corpus, "
        f"{_f(100 * t['share_of_highest_norms'], 1)}% of the top "
        f"{_f(100 * t['top_fraction'], 0)}% of norms and "
        f"{_f(100 * t['share_of_retrieved'], 1)}% of {table}'s retrieved top-k.")
  if shown:
    table, t = shown[0]
    med = t["median_norm_by_kind"]
    ratio = (med.get("outlier") or float("nan")) / (med.get("fact") or float("nan"))
    over = t["share_of_highest_norms"] / max(t["share_of_corpus"], 1e-12)
    out.append(f"The model trained for {_f(on.get('train_epochs'), 1)} epochs over the "
               "corpus. TRAK's collapse in the paper is attributed to outlier passages "
               f"with high-norm gradients; here ({table}) the outliers' median norm is "
               f"{_f(ratio, 2)}× the fact passages' and they are {_f(over, 1)}× "
               "over-represented among the highest norms.")
  rs = (metrics.get("diagnostics") or {}).get("r_sample") or {}
  if "trak" in names and rs.get("by_damping"):
    out.append(_r_sample_line(rs))
  fit = (metrics.get("diagnostics") or {}).get("tailpatch_fit") or {}
  if "tailpatch" in name and fit.get("mean_spearman"):
    out.append(_tailpatch_fit_line(fit))
  if "tailpatch" in name:
    ms_tp = {m: ms[m].get("tailpatch_rel") for m in names}
    out.append("Relative tail-patch: " + ", ".join(
        f"{m} {_f((v or float('nan')) * 100, 1)}%" for m, v in ms_tp.items()) + ".")
  return out


def _pct(x: Any, digits: int = 1) -> str:
  """A share as a percentage; '—' when missing."""
  x = json_values.finite_or_none(x)
  return "—" if x is None else f"{100 * x:.{digits}f}%"


def _r_sample_line(rs: dict[str, Any]) -> str:
  """What R_train's sample does to TRAK (`diagnostics.r_sample`)."""
  rows = {r["damping"]: r for r in rs["by_damping"]}
  low = rows[min(rows)]
  chosen = rows.get(rs.get("trak_damping"))
  n_r, n_c = rs.get("r_train_samples"), rs["candidates"]

  def at(r):
    return (f"TRAK's dev MRR ranking all {n_c} passages is {_f(r.get('mrr_as_run'))} with "
            f"the run's R and {_f(r.get('mrr_half'))} with R from the half, and the "
            f"passages outside the half hold {_pct(r.get('out_of_sample_share_top'))} of "
            f"its top {rs['top']}")

  inside = (f"so every one of the {n_c} candidates lies in R's sample"
            if n_r == n_c else f"a sample of {n_r} of the {n_c} candidates")
  return (
      f"R_train's sample ({rs['queries']} {rs.get('split', 'dev')} queries; a diagnostic, "
      f"nothing is chosen from it): the run fitted R on {n_r} passages, {inside}; inside "
      "the sample a candidate's whitened norm is bounded by its leverage, and at the "
      "paper's scale nearly every candidate lies outside it. Fitted on a random half "
      f"({rs['half']} passages) instead: at damping {low['damping']:g}, {at(low)} (50% if "
      f"the sample did not matter; {_pct(low.get('top_in_highest_norms'))} of it from the "
      f"{_pct(rs.get('top_norm_fraction'), 0)} highest whitened norms), against "
      f"{_f(rs.get('unwhitened_mrr'))} without R"
      + (f"; at TRAK's dev-chosen damping {chosen['damping']:g}, {at(chosen)}"
         if chosen and chosen is not low else "") + ".")


def _tailpatch_fit_line(fit: dict[str, Any]) -> str:
  """Which gradient score follows the measured tail-patch (`diagnostics.tailpatch_fit`)."""
  rho = {t: v for t, v in ((t, json_values.finite_or_none(v))
                           for t, v in fit["mean_spearman"].items()) if v is not None}
  cis = fit.get("mean_spearman_ci") or {}
  cells = ", ".join(f"{t} {_ci(rho[t], cis.get(t))}" for t in sorted(rho, key=lambda t: -rho[t]))
  above = [(t, d) for t, d in (fit.get("minus_trackstar") or {}).items()
           if t in rho and "trackstar" in rho and rho[t] > rho["trackstar"]]
  paired = ("; the score above TrackStar's, minus TrackStar's (paired): " + ", ".join(
      f"{t} {_diff_ci(d)}" for t, d in above) if above else "")
  return ("Which gradient score follows the measured tail-patch (Spearman within each of "
          f"{fit.get('queries')} {fit.get('split', 'test')} queries over the "
          f"{fit.get('pairs')} tail-patched (query, passage) pairs, every method's top k; "
          f"mean [95% CI]): {cells or '—'}{paired}.")


def render(metrics: dict[str, Any]) -> str:
  n = metrics.get("num_queries")
  proto = metrics.get("protocol") or {}
  split = proto.get("split") or {}
  md = ["# Our results beside the paper's (Chang et al., 2025, Table 1, T-REx)\n",
        f"Split: **{metrics.get('split', '?')}** ({n} test queries; "
        f"{split.get('dev_queries')} dev queries chose every tuned value). Every interval is a "
        "percentile bootstrap 95% CI over the test queries. MRR is over the full ranking. "
        "Tail-patch in percentage points of target probability. The paper retrieves from "
        "19.6M T-REx sentences with an 8B model; here the world and model are small, so "
        "absolute values are not comparable, orderings are.\n",
        _table(metrics),
        "\n## The paper's claims\n",
        "A strict ordering holds when the paired bootstrap CI of the difference excludes 0 "
        "on the claimed side, differs when it excludes 0 on the other side, and is "
        "inconclusive otherwise (`tda.claims`).\n",
        "| Claim | Verdict | Ours | Difference [95% CI] |", "|---|---|---|---|"]
  orderings = metrics.get("paper_orderings") or {}
  for name, c in orderings.items():
    v = c["values"]
    scale, digits = (100.0, 2) if "tailpatch" in name else (1.0, 3)
    parts = [f"{k} {_f(x * scale if isinstance(x, float) else x, digits)}"
             for k, x in v.items() if isinstance(x, (int, float)) and k != "threshold"]
    parts += [f"{m} {_f(x * scale, digits)}"
              for k in ("min_baseline", "max_gradient", "best_other")
              for m, x in (v.get(k) or {}).items() if isinstance(x, (int, float))]
    ours = ", ".join(parts)
    dci = v.get("diff_ci") or {}
    if "diff" in dci:
      d = _diff_ci(dci, scale, digits)
    else:
      d = "; ".join(f"{k}: {_diff_ci(x, scale, digits)}" for k, x in dci.items())
    md.append(f"| {c['claim']} | **{c['verdict']}** | {ours} | {d} |")
  md.append("\n## What was measured where a claim does not hold\n")
  missing = [(k, c) for k, c in orderings.items() if c["verdict"] != claims_lib.HOLDS]
  if not missing:
    md.append("Every claim holds.\n")
  for name, c in missing:
    md.append(f"### {c['claim']} — {c['verdict']}\n")
    md += [f"- {line}" for line in _evidence(name, c, metrics)]
    md.append("")
  return "\n".join(md) + "\n"


def write(*, results_dir: str, metrics: dict[str, Any]) -> str:
  path = os.path.join(results_dir, "paper_comparison.md")
  workdir_lib.write_text(path, render(metrics))
  return path

"""Evaluation outputs under `<workdir>/results/` (DESIGN.md §2-3).

`write_report` scores every method on the same queries (`tda.metrics`) and writes:

  metrics.json                 per-method metrics, per-bucket breakdowns, timings,
                               model eval, and `paper_orderings` (the paper's
                               claims checked on our numbers)
  table.md / table.csv         laid out like the paper's Table 1, with its T-REx
                               numbers alongside
  table_by_bucket.md / .csv    the same metrics per frequency bucket
  fig_table.png, fig_by_bucket.png
  proponents/<method>.jsonl    one row per query in the schema of the paper's
                               public results viewer (read by `tda.viewer`)

`plot_trend` draws the paper's "as models improve, influence aligns with
attribution" figure from points the caller collects over several models.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import re
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure  # No pyplot: no global state, no GUI backend.

from tda import methods as methods_lib
from tda import metrics as metrics_lib
from tda import workdir as workdir_lib

FAMILIES = ("gradient", "baseline")
TRAK_NEAR_ZERO_MRR = 0.05


def _paper(name: str) -> tuple[float | None, float | None, float | None]:
  """The paper's T-REx (MRR, recall@10, tail-patch pp) of a method, or Nones."""
  m = methods_lib.METHODS.get(name)
  return m.paper if m is not None and m.paper is not None else (None, None, None)

_RESERVED = ("methods", "timings_s", "model_eval", "num_queries", "paper_orderings")
_FACT_KEYS = ("fact_id", "example_id", "relation", "subject", "object",
              "inputs_plaintext", "targets_plaintext", "frequency", "bucket",
              "passage_ids")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_DPI = 120


@dataclasses.dataclass
class MethodResult:
  """One method's proponents/opponents and tail-patch results on all queries.

  Attributes:
    name: method name ('trackstar', 'bm25', ...); also the JSONL file name.
    family: 'gradient' or 'baseline'.
    query_ids: example ids, the same order for every method.
    top_ids: [q][k] proponent passage ids, best first.
    top_scores: [q, k] their scores.
    bottom_ids: [q][k'] opponent ids (most negative first), or None.
    bottom_scores: [q, k'] their scores, or None.
    tailpatch_abs: [q, k_tp] p_after - p_before per proponent by rank; NaN rows
      for queries not tail-patched; None if not computed.
    tailpatch_rel: [q, k_tp] (p_after - p_before) / p_before; same layout.
  """
  name: str
  family: str
  query_ids: Sequence[str]
  top_ids: Sequence[Sequence[str]]
  top_scores: Any
  bottom_ids: Sequence[Sequence[str]] | None = None
  bottom_scores: Any = None
  tailpatch_abs: Any = None
  tailpatch_rel: Any = None


def _f(x: Any) -> float | None:
  """A float for JSON: None for NaN/inf/None (JSON has no NaN)."""
  if x is None:
    return None
  x = float(x)
  return x if math.isfinite(x) else None


def _jsonable(obj: Any) -> Any:
  if isinstance(obj, dict):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return [_jsonable(v) for v in obj.tolist()]
  if isinstance(obj, (bool, np.bool_)):
    return bool(obj)
  if isinstance(obj, (int, np.integer)):
    return int(obj)
  if isinstance(obj, (float, np.floating)):
    return _f(obj)
  return obj


# --- Validation ---------------------------------------------------------------

def _check_method(m: MethodResult, n_q: int, passages: dict[str, str]) -> None:
  where = f"method '{m.name}'"
  if not isinstance(m.name, str) or not _SAFE_NAME.match(m.name):
    raise ValueError(f"{where}: name must match {_SAFE_NAME.pattern} (it names a file)")
  if m.family not in FAMILIES:
    raise ValueError(f"{where}: family must be one of {FAMILIES}, got {m.family!r}")
  pairs = [("top_ids", "top_scores", m.top_ids, m.top_scores)]
  if m.bottom_ids is not None or m.bottom_scores is not None:
    if m.bottom_ids is None or m.bottom_scores is None:
      raise ValueError(f"{where}: give both bottom_ids and bottom_scores, or neither")
    pairs.append(("bottom_ids", "bottom_scores", m.bottom_ids, m.bottom_scores))
  for id_name, score_name, ids, scores in pairs:
    if len(ids) != n_q or len(scores) != n_q:
      raise ValueError(f"{where}: {id_name} has {len(ids)} rows and {score_name} "
                       f"{len(scores)}, expected one per query ({n_q})")
    for q in range(n_q):
      if len(ids[q]) != len(scores[q]):
        raise ValueError(f"{where}: query {q} has {len(ids[q])} {id_name} but "
                         f"{len(scores[q])} {score_name}")
      for pid in ids[q]:
        if pid not in passages:
          raise ValueError(f"{where}: {id_name} of query {q} names passage {pid!r}, "
                           "which is not in `passages`")
  if (m.tailpatch_abs is None) != (m.tailpatch_rel is None):
    raise ValueError(f"{where}: give both tailpatch_abs and tailpatch_rel, or neither")
  if m.tailpatch_abs is not None:
    width = max((len(r) for r in m.top_ids), default=0)
    for name in ("tailpatch_abs", "tailpatch_rel"):
      shape = np.shape(getattr(m, name))
      if len(shape) != 2 or shape[0] != n_q or shape[1] > width:
        raise ValueError(f"{where}: {name} has shape {shape}, expected [{n_q}, k] "
                         f"with k <= {width} proponents")


def _index_facts(facts: list[dict[str, Any]], query_ids: Sequence[str],
                 passages: dict[str, str], bucket_order: Sequence[str]) -> list[dict]:
  by_ex = {}
  for i, f in enumerate(facts):
    missing = [k for k in _FACT_KEYS if k not in f]
    if missing:
      raise ValueError(f"facts[{i}] lacks key(s) {missing}")
    if f["example_id"] in by_ex:
      raise ValueError(f"facts: example_id {f['example_id']!r} appears twice")
    by_ex[f["example_id"]] = f
  out = []
  for qid in query_ids:
    f = by_ex.get(qid)
    if f is None:
      raise ValueError(f"query {qid!r} has no fact in `facts`")
    if f["bucket"] not in bucket_order:
      raise ValueError(f"fact {f['fact_id']!r}: unknown bucket {f['bucket']!r}; "
                       f"bucket_order is {list(bucket_order)}")
    for pid in f["passage_ids"]:
      if pid not in passages:
        raise ValueError(f"fact {f['fact_id']!r}: ground-truth passage {pid!r} is "
                         "missing from `passages`")
    out.append(f)
  return out


# --- Metrics ------------------------------------------------------------------

def _method_metrics(m: MethodResult, facts_q: list[dict], bucket_order) -> tuple[dict, dict]:
  """(metrics.json entry, per-query arrays) of one method."""
  att = metrics_lib.attribution(top_ids=m.top_ids,
                                relevant=[set(f["passage_ids"]) for f in facts_q], k=10)
  n_q = len(facts_q)
  values = {"mrr": att["rr"], "recall_at_10": att["hit"].astype(np.float64)}
  entry = {"family": m.family, "mrr": att["mrr"], "recall_at_10": att["recall_at_10"],
           "precision_at_10": att["precision_at_10"], "tailpatch_abs": None,
           "tailpatch_rel": None, "tailpatch_at_k": {}, "n_tailpatched": 0}
  if m.tailpatch_abs is not None:
    tp = metrics_lib.tailpatch_summary(abs_qk=m.tailpatch_abs, rel_qk=m.tailpatch_rel)
    entry.update(tailpatch_abs=tp["tailpatch_abs"], tailpatch_rel=tp["tailpatch_rel"],
                 tailpatch_at_k={str(k): v for k, v in tp["at_k"].items()},
                 n_tailpatched=tp["n_evaluated"])
    values["tailpatch_abs"], values["tailpatch_rel"] = tp["abs_q"], tp["rel_q"]
  else:
    values["tailpatch_abs"] = values["tailpatch_rel"] = np.full(n_q, np.nan)
  groups = metrics_lib.by_group(values=values, groups=[f["bucket"] for f in facts_q],
                                order=list(bucket_order))
  entry["by_bucket"] = {b: {**g["mean"], "n": g["n"],
                            "n_tailpatched": g["count"]["tailpatch_abs"]}
                        for b, g in groups.items()}
  return entry, {"rank": att["rank"], **values}


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
    return _f(methods[m].get(key)) if m in methods else None

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


# --- Tables -------------------------------------------------------------------

def _rows_in_order(names: Sequence[str]) -> list[tuple[str, str]]:
  return [(m, methods_lib.label(m)) for m in methods_lib.in_table_order(names)]


def _num(x: Any, digits: int = 3) -> str:
  x = _f(x)
  return "—" if x is None else f"{x:.{digits}f}"


def _pct(x: Any, scale: float = 100.0, digits: int = 2) -> str:
  x = _f(x)
  return "—" if x is None else f"{x * scale:+.{digits}f}%"


def _csv_val(x: Any) -> str:
  x = _f(x)
  return "" if x is None else repr(x)


def _write_text(path: str, text: str) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8", newline="") as f:
    f.write(text)
  os.replace(tmp, path)


def _write_csv(path: str, header: list[str], rows: list[list[Any]]) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)
  os.replace(tmp, path)


def _md(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def write_tables(*, results_dir: str, methods: dict[str, dict[str, Any]],
                 bucket_order: Sequence[str]) -> None:
  """table.md/.csv (paper Table 1 layout) and table_by_bucket.md/.csv."""
  order = _rows_in_order(list(methods))
  md_rows, csv_rows = [], []
  for m, label in order:
    e = methods[m]
    p = _paper(m)
    md_rows.append([label, _num(e["mrr"]), _num(e["recall_at_10"]),
                    _pct(e["tailpatch_abs"]), _pct(e["tailpatch_rel"], digits=1),
                    _num(p[0]), _num(p[1]), _pct(p[2], scale=1.0)])
    csv_rows.append([m, label, e["family"], _csv_val(e["mrr"]), _csv_val(e["recall_at_10"]),
                     _csv_val(e["precision_at_10"]),
                     _csv_val(None if _f(e["tailpatch_abs"]) is None else e["tailpatch_abs"] * 100),
                     _csv_val(None if _f(e["tailpatch_rel"]) is None else e["tailpatch_rel"] * 100),
                     _csv_val(p[0]), _csv_val(p[1]), _csv_val(p[2])])
  md = ("# Attribution and influence (layout of the paper's Table 1)\n\n"
        "Tail-patch: mean change in target probability after one step on a proponent, in "
        "percentage points (rel: relative change). Paper columns: T-REx numbers of "
        "Chang et al. (2025), Table 1 (Dense is compared with Gecko).\n\n")
  md += _md(["Method", "MRR", "Recall@10", "Tail-patch", "Tail-patch rel",
             "Paper MRR", "Paper Recall@10", "Paper tail-patch"], md_rows)
  _write_text(os.path.join(results_dir, "table.md"), md)
  _write_csv(os.path.join(results_dir, "table.csv"),
             ["method", "label", "family", "mrr", "recall_at_10", "precision_at_10",
              "tailpatch_abs_pct", "tailpatch_rel_pct", "paper_mrr",
              "paper_recall_at_10", "paper_tailpatch_pct"], csv_rows)

  md = "# Metrics per frequency bucket (facts stated in n passages)\n"
  first = methods[order[0][0]]["by_bucket"]
  cols = [f"{b} (n={first[b]['n']})" for b in bucket_order]
  for key, title, fmt in (("mrr", "MRR", _num), ("recall_at_10", "Recall@10", _num),
                          ("tailpatch_abs", "Tail-patch", _pct)):
    rows = [[label] + [fmt(methods[m]["by_bucket"][b][key]) for b in bucket_order]
            for m, label in order]
    md += f"\n## {title}\n\n" + _md(["Method"] + cols, rows)
  _write_text(os.path.join(results_dir, "table_by_bucket.md"), md)
  csv_rows = []
  for m, _ in order:
    for b in bucket_order:
      g = methods[m]["by_bucket"][b]
      csv_rows.append([m, b, g["n"], _csv_val(g["mrr"]), _csv_val(g["recall_at_10"]),
                       _csv_val(None if _f(g["tailpatch_abs"]) is None else g["tailpatch_abs"] * 100),
                       _csv_val(None if _f(g["tailpatch_rel"]) is None else g["tailpatch_rel"] * 100),
                       g["n_tailpatched"]])
  _write_csv(os.path.join(results_dir, "table_by_bucket.csv"),
             ["method", "bucket", "n", "mrr", "recall_at_10", "tailpatch_abs_pct",
              "tailpatch_rel_pct", "n_tailpatched"], csv_rows)


# --- Figures ------------------------------------------------------------------

def _save(fig: Figure, path: str) -> str:
  tmp = f"{path}.tmp-{os.getpid()}"
  fig.savefig(tmp, format="png", dpi=_DPI, bbox_inches="tight")
  os.replace(tmp, path)
  return path


def _nan(x: Any) -> float:
  x = _f(x)
  return float("nan") if x is None else x


def plot_table(*, methods: dict[str, dict[str, Any]], path: str) -> str:
  """Grouped bars of MRR and recall@10, and tail-patch on a second panel."""
  order = _rows_in_order(list(methods))
  names = [m for m, _ in order]
  x = np.arange(len(names))
  fig = Figure(figsize=(max(8.0, 1.1 * len(names) + 3), 4.2))
  ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
  for i, (key, label) in enumerate((("mrr", "MRR"), ("recall_at_10", "Recall@10"))):
    ax1.bar(x + (i - 0.5) * 0.38, [_nan(methods[m][key]) for m in names], 0.38, label=label)
  ax1.set_xticks(x, names, rotation=40, ha="right")
  ax1.set_ylabel("score")
  ax1.set_title("Attribution")
  ax1.legend(loc="upper right", fontsize=8)
  tp = [_nan(methods[m]["tailpatch_abs"]) * 100 for m in names]
  colors = ["tab:gray" if methods[m]["family"] == "baseline" else "tab:green" for m in names]
  ax2.bar(x, tp, 0.6, color=colors)
  for i, v in enumerate(tp):
    if math.isnan(v):  # Not tail-patched: say so rather than look like a zero.
      ax2.text(i, 0.0, "n/a", ha="center", va="bottom", fontsize=7, color="gray")
  ax2.axhline(0.0, color="black", linewidth=0.6)
  ax2.set_xticks(x, names, rotation=40, ha="right")
  ax2.set_ylabel("Δ target probability (pp)")
  ax2.set_title("Influence (tail-patch)")
  return _save(fig, path)


def plot_by_bucket(*, methods: dict[str, dict[str, Any]], bucket_order: Sequence[str],
                   path: str) -> str:
  """MRR and recall@10 against frequency bucket, one line per method."""
  fig = Figure(figsize=(10, 4))
  axes = fig.subplots(1, 2)
  x = np.arange(len(bucket_order))
  for ax, (key, label) in zip(axes, (("mrr", "MRR"), ("recall_at_10", "Recall@10"))):
    for m, _ in _rows_in_order(list(methods)):
      style = "--" if methods[m]["family"] == "baseline" else "-"
      ax.plot(x, [_nan(methods[m]["by_bucket"][b][key]) for b in bucket_order],
              style, marker="o", label=m)
    first = next(iter(methods.values()))["by_bucket"]
    ax.set_xticks(x, [f"{b}\n(n={first[b]['n']})" for b in bucket_order])
    ax.set_xlabel("fact frequency bucket (entailing passages)")
    ax.set_ylabel(label)
  axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
  return _save(fig, path)


def plot_trend(*, points: list[dict[str, Any]], path: str,
               xlabel: str = "model quality (query accuracy)",
               ylabel: str = "share of TrackStar top-10 proponents that entail the fact") -> str:
  """The paper's trend: as models improve, influence aligns with attribution.

  Args:
    points: one per model, {"x": model quality, "y": TrackStar precision@10,
      "label": e.g. "300 steps"}; drawn in order of x and joined by a line.
    path: PNG to write.
    xlabel, ylabel: axis labels.

  Returns:
    `path`.
  """
  if not points:
    raise ValueError("plot_trend: no points")
  for i, p in enumerate(points):
    missing = [k for k in ("x", "y", "label") if k not in p]
    if missing:
      raise ValueError(f"plot_trend: points[{i}] lacks {missing}")
    if _f(p["x"]) is None or _f(p["y"]) is None:
      raise ValueError(f"plot_trend: points[{i}] has a non-finite x or y: {p}")
  pts = sorted(points, key=lambda p: float(p["x"]))
  fig = Figure(figsize=(5.5, 4))
  ax = fig.subplots()
  xs, ys = [float(p["x"]) for p in pts], [float(p["y"]) for p in pts]
  ax.plot(xs, ys, "-o", color="tab:green")
  for p in pts:
    ax.annotate(str(p["label"]), (float(p["x"]), float(p["y"])), textcoords="offset points",
                xytext=(5, 5), fontsize=8)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel, fontsize=8)
  ax.set_title("Influence aligns with attribution as models improve", fontsize=9)
  return _save(fig, path)


# --- Viewer JSONL -------------------------------------------------------------

def viewer_rows(*, m: MethodResult, facts_q: list[dict], passages: dict[str, str],
                predictions: dict[str, dict]) -> list[dict[str, Any]]:
  """One method's rows in the paper's viewer schema (DESIGN.md §3)."""
  rows = []
  tp_abs = None if m.tailpatch_abs is None else np.asarray(m.tailpatch_abs, np.float64)
  tp_rel = None if m.tailpatch_rel is None else np.asarray(m.tailpatch_rel, np.float64)
  for q, f in enumerate(facts_q):
    pred = predictions.get(f["example_id"]) or {}
    rel = set(f["passage_ids"])
    ids = [str(i) for i in m.top_ids[q]]
    opp = [] if m.bottom_ids is None else [str(i) for i in m.bottom_ids[q]]
    tp_row = tp_rel_row = None
    if tp_abs is not None and np.isfinite(tp_abs[q]).any():
      tp_row = [_f(v) for v in tp_abs[q]]
      tp_rel_row = [_f(v) for v in tp_rel[q]]
    correct = pred.get("correct")
    rows.append({
        "example_id": f["example_id"],
        "inputs_plaintext": f["inputs_plaintext"],
        "targets_plaintext": f["targets_plaintext"],
        "proponents": [passages[i] for i in ids],
        "proponent_ids": ids,
        "proponent_scores": [_f(s) for s in m.top_scores[q]],
        "proponent_correct": [i in rel for i in ids],
        "opponents": [passages[i] for i in opp],
        "opponent_ids": opp,
        "opponent_scores": ([] if m.bottom_scores is None
                            else [_f(s) for s in m.bottom_scores[q]]),
        "fact_id": f["fact_id"],
        "relation": f["relation"],
        "groundtruth": {"subject": f["subject"], "relation": f["relation"],
                        "object": f["object"]},
        "subject": f["subject"],
        "object": f["object"],
        "c4_frequency": int(f["frequency"]),
        "c4_frequency_bucket": str(f["bucket"]),
        "has_trex_sentence": int(f["frequency"]) > 0,
        "model_confidence": _f(pred.get("model_confidence")),
        "temperature_samples": list(pred.get("temperature_samples") or []),
        "model_prediction": pred.get("prediction"),
        "model_correct": None if correct is None else bool(correct),
        "proponent_tailpatch_abs": tp_row,
        "proponent_tailpatch_rel": tp_rel_row,
    })
  return rows


# --- Entry point --------------------------------------------------------------

def write_report(*, results_dir: str, methods: dict[str, MethodResult],
                 facts: list[dict[str, Any]], passages: dict[str, str],
                 predictions: dict[str, dict[str, Any]], bucket_order: Sequence[str],
                 timings_s: dict[str, float], model_eval: dict[str, Any],
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
  """Scores every method and writes all evaluation outputs to `results_dir`.

  Args:
    results_dir: `<workdir>/results` (created if needed).
    methods: name -> MethodResult; all on the same queries in the same order.
    facts: fact records (tda.world schema); must cover every query id.
    passages: passage id -> text; must cover every proponent, opponent and
      ground-truth id.
    predictions: example id -> {"correct", "prediction", "model_confidence",
      "temperature_samples", ...} (tda.model_eval); missing queries get nulls.
    bucket_order: frequency bucket names in display order.
    timings_s: stage -> wall seconds.
    model_eval: the model-eval summary.
    extra: more top-level keys for metrics.json (must not shadow ours).

  Returns:
    The metrics dict written to metrics.json (NaN written as null).

  Raises:
    ValueError: no methods, methods on different queries, a query without a
      fact, an unknown bucket, a passage id missing from `passages`, malformed
      arrays, or `extra` shadowing a reserved key.
  """
  if not methods:
    raise ValueError("write_report: no methods")
  clash = sorted(set(extra or {}) & set(_RESERVED))
  if clash:
    raise ValueError(f"write_report: extra keys {clash} would overwrite metrics.json's own")
  names = list(methods)
  ref = names[0]
  query_ids = [str(q) for q in methods[ref].query_ids]
  if not query_ids:
    raise ValueError(f"write_report: method '{ref}' has no queries")
  for name in names:
    m = methods[name]
    if m.name != name:
      raise ValueError(f"methods['{name}'] has name {m.name!r}; they must agree")
    ids = [str(q) for q in m.query_ids]
    if ids != query_ids:
      diff = next((i for i, (a, b) in enumerate(zip(ids, query_ids)) if a != b),
                  min(len(ids), len(query_ids)))
      raise ValueError(
          f"method '{name}' is on different queries than '{ref}' ({len(ids)} vs "
          f"{len(query_ids)} queries; first difference at position {diff}): every "
          "method must list the same query ids in the same order")
    _check_method(m, len(query_ids), passages)
  facts_q = _index_facts(facts, query_ids, passages, bucket_order)

  entries = {name: _method_metrics(methods[name], facts_q, bucket_order)[0]
             for name in names}
  out = {
      "methods": entries,
      "timings_s": dict(timings_s),
      "model_eval": model_eval,
      "num_queries": len(query_ids),
      "paper_orderings": paper_orderings(methods=entries),
      **(extra or {}),
  }
  out = _jsonable(out)

  os.makedirs(results_dir, exist_ok=True)
  workdir_lib.write_json(os.path.join(results_dir, "metrics.json"), out)
  write_tables(results_dir=results_dir, methods=out["methods"], bucket_order=bucket_order)
  plot_table(methods=out["methods"], path=os.path.join(results_dir, "fig_table.png"))
  plot_by_bucket(methods=out["methods"], bucket_order=bucket_order,
                 path=os.path.join(results_dir, "fig_by_bucket.png"))
  folder = os.path.join(results_dir, "proponents")
  os.makedirs(folder, exist_ok=True)
  for stale in os.listdir(folder):  # The viewer reads every .jsonl here.
    if stale.endswith(".jsonl") and stale[:-len(".jsonl")] not in methods:
      os.remove(os.path.join(folder, stale))
  for name in names:
    workdir_lib.write_jsonl(os.path.join(folder, f"{name}.jsonl"),
                            viewer_rows(m=methods[name], facts_q=facts_q,
                                        passages=passages, predictions=predictions))
  return out

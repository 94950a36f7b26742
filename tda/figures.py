"""Result figures: Table 1 as bars, metrics per frequency bucket, the trend.

Each function draws on a fresh matplotlib `Figure` (no pyplot: no global state,
no GUI backend), writes it as a PNG via write-then-rename and returns it, so a
caller can inspect what was drawn.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from matplotlib.figure import Figure
import numpy as np

from tda import fs
from tda import json_values
from tda import methods as methods_lib

_DPI = 120


def _save(fig: Figure, path: str) -> Figure:
  with fs.atomic_open(path, "wb") as f:
    fig.savefig(f, format="png", dpi=_DPI, bbox_inches="tight")
  return fig


def _nan(x: Any) -> float:
  x = json_values.finite_or_none(x)
  return float("nan") if x is None else x


def _ci_err(methods: dict[str, dict[str, Any]], names: Sequence[str], key: str,
            scale: float = 1.0) -> np.ndarray | None:
  """[2, n] error-bar lengths from each method's `<key>_ci` ([lo, hi] or
  {"lo", "hi"}) around its value; None when no method has a CI for `key`."""
  if not any(methods[m].get(f"{key}_ci") is not None for m in names):
    return None
  err = np.zeros((2, len(names)))
  for i, m in enumerate(names):
    ci, v = methods[m].get(f"{key}_ci"), _nan(methods[m].get(key))
    if ci is None or math.isnan(v):
      continue
    lo, hi = (ci["lo"], ci["hi"]) if isinstance(ci, dict) else ci
    err[:, i] = [max(v - _nan(lo), 0.0) * scale, max(_nan(hi) - v, 0.0) * scale]
  return err


def plot_table(*, methods: dict[str, dict[str, Any]], path: str) -> Figure:
  """Grouped bars of MRR and recall@10, and tail-patch on a second panel, each bar
  with its 95% CI as an error bar where the metrics carry one (`<key>_ci`).

  Args:
    methods: the `methods` section of metrics.json.
    path: PNG to write.

  Returns:
    The figure: axes[0] attribution (one MRR and one recall@10 bar per method,
    in table order), axes[1] tail-patch in percentage points.
  """
  names = methods_lib.in_table_order(list(methods))
  x = np.arange(len(names))
  fig = Figure(figsize=(max(8.0, 1.1 * len(names) + 3), 4.2))
  ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
  has_ci = False
  for i, (key, label) in enumerate((("mrr", "MRR"), ("recall_at_10", "Recall@10"))):
    err = _ci_err(methods, names, key)
    has_ci |= err is not None
    ax1.bar(x + (i - 0.5) * 0.38, [_nan(methods[m][key]) for m in names], 0.38, label=label,
            yerr=err, capsize=2, error_kw={"linewidth": 0.8})
  ax1.set_xticks(x, names, rotation=40, ha="right")
  ax1.set_ylabel("score")
  ax1.set_title("Attribution")
  ax1.legend(loc="upper right", fontsize=8)
  tp = [_nan(methods[m]["tailpatch_abs"]) * 100 for m in names]
  colors = ["tab:gray" if methods[m]["family"] == "baseline" else "tab:green" for m in names]
  err = _ci_err(methods, names, "tailpatch_abs", scale=100.0)
  has_ci |= err is not None
  ax2.bar(x, tp, 0.6, color=colors, yerr=err, capsize=2, error_kw={"linewidth": 0.8})
  for i, v in enumerate(tp):
    if math.isnan(v):  # Not tail-patched: say so rather than look like a zero.
      ax2.text(i, 0.0, "n/a", ha="center", va="bottom", fontsize=7, color="gray")
  ax2.axhline(0.0, color="black", linewidth=0.6)
  ax2.set_xticks(x, names, rotation=40, ha="right")
  ax2.set_ylabel("Δ target probability (pp)")
  ax2.set_title("Influence (tail-patch)")
  fig.suptitle("error bars: 95% bootstrap CI over queries" if has_ci
               else "no confidence intervals in these metrics", fontsize=8)
  return _save(fig, path)


def plot_by_bucket(*, methods: dict[str, dict[str, Any]], bucket_order: Sequence[str],
                   path: str) -> Figure:
  """MRR and recall@10 against frequency bucket, one line per method.

  Args:
    methods: the `methods` section of metrics.json.
    bucket_order: frequency bucket names in display order.
    path: PNG to write.

  Returns:
    The figure: axes[0] MRR, axes[1] recall@10, one line per method (dashed
    for baselines) over the buckets.
  """
  fig = Figure(figsize=(10, 4))
  axes = fig.subplots(1, 2)
  x = np.arange(len(bucket_order))
  first = next(iter(methods.values()))["by_bucket"]
  for ax, (key, label) in zip(axes, (("mrr", "MRR"), ("recall_at_10", "Recall@10"))):
    for m in methods_lib.in_table_order(list(methods)):
      style = "--" if methods[m]["family"] == "baseline" else "-"
      ax.plot(x, [_nan(methods[m]["by_bucket"][b][key]) for b in bucket_order],
              style, marker="o", label=m)
    ax.set_xticks(x, [f"{b}\n(n={first[b]['n']})" for b in bucket_order])
    ax.set_xlabel("fact frequency bucket (entailing passages)")
    ax.set_ylabel(label)
  axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
  return _save(fig, path)


def plot_trend(*, points: list[dict[str, Any]], path: str) -> Figure:
  """The model-size trend as measured: TrackStar's attribution and the model's
  query accuracy against model size, each with its 95% CI.

  Args:
    points: one per model (`tda.trend.size_points`): "size", "params", "steps",
      "mrr", "recall_at_10", "query_accuracy", each metric with `<key>_ci`.
    path: PNG to write.

  Returns:
    The figure: axes[0] TrackStar MRR and recall@10, axes[1] query accuracy, each
    a line over the sizes (ordered by parameters, log x) with CI error bars; the
    title says what was measured, not what the paper found.

  Raises:
    ValueError: no points, a point lacking a key, or a non-finite value.
  """
  if not points:
    raise ValueError("plot_trend: no points")
  keys = ("size", "params", "mrr", "mrr_ci", "recall_at_10", "recall_at_10_ci",
          "query_accuracy", "query_accuracy_ci")
  for i, p in enumerate(points):
    missing = [k for k in keys if k not in p]
    if missing:
      raise ValueError(f"plot_trend: points[{i}] lacks {missing}")
    if any(json_values.finite_or_none(p[k]) is None
           for k in ("params", "mrr", "recall_at_10", "query_accuracy")):
      raise ValueError(f"plot_trend: points[{i}] has a non-finite value: {p}")
  pts = sorted(points, key=lambda p: float(p["params"]))
  xs = [float(p["params"]) for p in pts]
  fig = Figure(figsize=(10, 4))
  ax1, ax2 = fig.subplots(1, 2)

  def line(ax, key, label, color):
    ys = [float(p[key]) for p in pts]
    err = np.array([[y - p[f"{key}_ci"][0], p[f"{key}_ci"][1] - y] for y, p in zip(ys, pts)]).T
    ax.errorbar(xs, ys, yerr=np.maximum(err, 0.0), fmt="-o", capsize=3, label=label,
                color=color)

  line(ax1, "mrr", "TrackStar MRR", "tab:green")
  line(ax1, "recall_at_10", "TrackStar Recall@10", "tab:olive")
  ax1.set_ylabel("attribution (entailing proponents)")
  ax1.legend(fontsize=8)
  line(ax2, "query_accuracy", "query accuracy", "tab:blue")
  ax2.set_ylabel("model quality (greedy first-token accuracy)")
  for ax in (ax1, ax2):
    ax.set_xscale("log")
    ax.set_xticks(xs, [f"{p['size']}\n{int(p['params']):,}" for p in pts])
    ax.minorticks_off()
    ax.set_xlabel("model size (parameters)")
  steps = sorted({p.get("steps") for p in pts} - {None})
  fig.suptitle(f"TrackStar attribution and model quality by model size "
               f"({', '.join(map(str, steps))} training steps each; "
               f"error bars: 95% bootstrap CI over {pts[0].get('queries', '?')} queries)",
               fontsize=9)
  return _save(fig, path)

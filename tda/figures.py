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


def plot_table(*, methods: dict[str, dict[str, Any]], path: str) -> Figure:
  """Grouped bars of MRR and recall@10, and tail-patch on a second panel.

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


def plot_trend(*, points: list[dict[str, Any]], path: str,
               xlabel: str = "model quality (query accuracy)",
               ylabel: str = "share of TrackStar top-10 proponents that entail the fact"
               ) -> Figure:
  """The paper's trend: as models improve, influence aligns with attribution.

  Args:
    points: one per model, {"x": model quality, "y": TrackStar precision@10,
      "label": e.g. "300 steps"}; drawn in order of x and joined by a line.
    path: PNG to write.
    xlabel, ylabel: axis labels.

  Returns:
    The figure: one axes with one line through the points, each annotated
    with its label.

  Raises:
    ValueError: no points, a point without x, y or label, or a non-finite x or y.
  """
  if not points:
    raise ValueError("plot_trend: no points")
  for i, p in enumerate(points):
    missing = [k for k in ("x", "y", "label") if k not in p]
    if missing:
      raise ValueError(f"plot_trend: points[{i}] lacks {missing}")
    if json_values.finite_or_none(p["x"]) is None or json_values.finite_or_none(p["y"]) is None:
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

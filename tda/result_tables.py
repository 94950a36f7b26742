"""Result tables: table.md/.csv (the paper's Table 1 layout) and per-bucket ones.

Not to be confused with `tda.tables`, the gradient-table storage.
"""

from __future__ import annotations

import csv
import io
import os
from typing import Any, Sequence

from tda import json_values
from tda import methods as methods_lib
from tda import workdir as workdir_lib


def _paper(name: str) -> tuple[float | None, float | None, float | None]:
  """The paper's T-REx (MRR, recall@10, tail-patch pp) of a method, or Nones."""
  m = methods_lib.METHODS.get(name)
  return m.paper if m is not None and m.paper is not None else (None, None, None)


def _num(x: Any, digits: int = 3) -> str:
  x = json_values.finite_or_none(x)
  return "—" if x is None else f"{x:.{digits}f}"


def _pct(x: Any, scale: float = 100.0, digits: int = 2) -> str:
  x = json_values.finite_or_none(x)
  return "—" if x is None else f"{x * scale:+.{digits}f}%"


def _csv_val(x: Any) -> str:
  x = json_values.finite_or_none(x)
  return "" if x is None else repr(x)


def _csv_pct(x: Any) -> str:
  """A fraction as percentage points for the csv; empty when not finite."""
  x = json_values.finite_or_none(x)
  return _csv_val(None if x is None else x * 100)


def _md(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def _csv(header: list[str], rows: list[list[Any]]) -> str:
  buf = io.StringIO(newline="")
  w = csv.writer(buf)
  w.writerow(header)
  w.writerows(rows)
  return buf.getvalue()


def write_tables(*, results_dir: str, methods: dict[str, dict[str, Any]],
                 bucket_order: Sequence[str]) -> None:
  """table.md/.csv (paper Table 1 layout) and table_by_bucket.md/.csv.

  Args:
    results_dir: folder to write into (must exist).
    methods: the `methods` section of metrics.json.
    bucket_order: frequency bucket names in display order.
  """
  order = [(m, methods_lib.label(m)) for m in methods_lib.in_table_order(list(methods))]
  md_rows, csv_rows = [], []
  for m, label in order:
    e = methods[m]
    p = _paper(m)
    md_rows.append([label, _num(e["mrr"]), _num(e["recall_at_10"]),
                    _pct(e["tailpatch_abs"]), _pct(e["tailpatch_rel"], digits=1),
                    _num(p[0]), _num(p[1]), _pct(p[2], scale=1.0)])
    csv_rows.append([m, label, e["family"], _csv_val(e["mrr"]), _csv_val(e["recall_at_10"]),
                     _csv_val(e["precision_at_10"]), _csv_pct(e["tailpatch_abs"]),
                     _csv_pct(e["tailpatch_rel"]), _csv_val(p[0]), _csv_val(p[1]),
                     _csv_val(p[2])])
  md = ("# Attribution and influence (layout of the paper's Table 1)\n\n"
        "Tail-patch: mean change in target probability after one step on a proponent, in "
        "percentage points (rel: relative change). Paper columns: T-REx numbers of "
        "Chang et al. (2025), Table 1 (Dense is compared with Gecko).\n\n")
  md += _md(["Method", "MRR", "Recall@10", "Tail-patch", "Tail-patch rel",
             "Paper MRR", "Paper Recall@10", "Paper tail-patch"], md_rows)
  workdir_lib.write_text(os.path.join(results_dir, "table.md"), md)
  workdir_lib.write_text(os.path.join(results_dir, "table.csv"), _csv(
      ["method", "label", "family", "mrr", "recall_at_10", "precision_at_10",
       "tailpatch_abs_pct", "tailpatch_rel_pct", "paper_mrr",
       "paper_recall_at_10", "paper_tailpatch_pct"], csv_rows))

  md = "# Metrics per frequency bucket (facts stated in n passages)\n"
  first = methods[order[0][0]]["by_bucket"]
  cols = [f"{b} (n={first[b]['n']})" for b in bucket_order]
  for key, title, fmt in (("mrr", "MRR", _num), ("recall_at_10", "Recall@10", _num),
                          ("tailpatch_abs", "Tail-patch", _pct)):
    rows = [[label] + [fmt(methods[m]["by_bucket"][b][key]) for b in bucket_order]
            for m, label in order]
    md += f"\n## {title}\n\n" + _md(["Method"] + cols, rows)
  workdir_lib.write_text(os.path.join(results_dir, "table_by_bucket.md"), md)
  csv_rows = []
  for m, _ in order:
    for b in bucket_order:
      g = methods[m]["by_bucket"][b]
      csv_rows.append([m, b, g["n"], _csv_val(g["mrr"]), _csv_val(g["recall_at_10"]),
                       _csv_pct(g["tailpatch_abs"]), _csv_pct(g["tailpatch_rel"]),
                       g["n_tailpatched"]])
  workdir_lib.write_text(os.path.join(results_dir, "table_by_bucket.csv"), _csv(
      ["method", "bucket", "n", "mrr", "recall_at_10", "tailpatch_abs_pct",
       "tailpatch_rel_pct", "n_tailpatched"], csv_rows))

"""Offline results viewer: one self-contained HTML page for the proponents.

`result_rows` builds a method's rows in the viewer's JSONL schema (that of the
paper's public results viewer; DESIGN.md §3), which `tda.report` writes to
`<workdir>/results/proponents/<method>.jsonl`. The page reads those files and
writes `<workdir>/results/viewer.html`: data embedded as JSON in a
`<script type="application/json">`, vanilla JS and CSS inline, no network.

    python -m tda.viewer --workdir=W [--out=PATH] [--json]

Passage texts are untrusted: the page builds them from DOM text nodes and
`<mark>` elements only (never innerHTML), the JSON blob escapes every `<`, `>`
and `&` as `\\u003c`/`\\u003e`/`\\u0026` (so neither `</script>` nor `<!--` can
appear in it), and a Content-Security-Policy allows only the page's own script
(by hash) and no network at all.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
from typing import Any, Iterable, Sequence

from absl import app
from absl import flags
import numpy as np

from tda import cli
from tda import fs
from tda import json_values
from tda import methods as methods_lib
from tda import workdir as workdir_lib

TEMPLATE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                             "viewer_template.html")
REQUIRED_FIELDS = ("example_id", "inputs_plaintext", "targets_plaintext",
                   "proponents", "proponent_ids", "proponent_scores")
# Query-level fields that must agree between method files of the same query.
_MUST_AGREE = ("inputs_plaintext", "targets_plaintext")
_SCORE_DIGITS = 7  # Significant digits kept for embedded scores (display shows 4).


def groundtruth_text(fact: dict[str, Any]) -> str:
  """A fact as the paper's viewer shows its ground truth: "subject | relation | object"."""
  return f"{fact['subject']} | {fact['relation']} | {fact['object']}"


def result_rows(*, facts: Sequence[dict[str, Any]], passages: dict[str, str],
                predictions: dict[str, dict[str, Any]], top_ids: Sequence[Sequence[str]],
                top_scores: Any, bottom_ids: Sequence[Sequence[str]] | None = None,
                bottom_scores: Any = None, tailpatch_abs: Any = None,
                tailpatch_rel: Any = None) -> list[dict[str, Any]]:
  """One method's rows in this viewer's JSONL schema (DESIGN.md §3).

  Args:
    facts: the fact record (tda.world schema) of each query, in query order.
    passages: passage id -> text; covers every proponent and opponent id.
    predictions: example id -> {"correct", "prediction", "model_confidence",
      "temperature_samples"} (tda.model_eval); a missing query gets nulls.
    top_ids, top_scores: [q][k] proponent ids and scores, best first.
    bottom_ids, bottom_scores: [q][k'] opponent ids and scores, or None.
    tailpatch_abs, tailpatch_rel: [q, k_tp] tail-patch results per proponent
      (NaN rows: not tail-patched), or None.

  Returns:
    One row per query, with every field of REQUIRED_FIELDS.
  """
  finite = json_values.finite_or_none
  rows = []
  tp_abs = None if tailpatch_abs is None else np.asarray(tailpatch_abs, np.float64)
  tp_rel = None if tailpatch_rel is None else np.asarray(tailpatch_rel, np.float64)
  for q, f in enumerate(facts):
    pred = predictions.get(f["example_id"]) or {}
    rel = set(f["passage_ids"])
    ids = [str(i) for i in top_ids[q]]
    opp = [] if bottom_ids is None else [str(i) for i in bottom_ids[q]]
    tp_row = tp_rel_row = None
    if tp_abs is not None and np.isfinite(tp_abs[q]).any():
      tp_row = [finite(v) for v in tp_abs[q]]
      tp_rel_row = [finite(v) for v in tp_rel[q]]
    correct = pred.get("correct")
    rows.append({
        "example_id": f["example_id"],
        "inputs_plaintext": f["inputs_plaintext"],
        "targets_plaintext": f["targets_plaintext"],
        "proponents": [passages[i] for i in ids],
        "proponent_ids": ids,
        "proponent_scores": [finite(s) for s in top_scores[q]],
        "proponent_correct": [i in rel for i in ids],
        "opponents": [passages[i] for i in opp],
        "opponent_ids": opp,
        "opponent_scores": ([] if bottom_scores is None
                            else [finite(s) for s in bottom_scores[q]]),
        "fact_id": f["fact_id"],
        "relation": f["relation"],
        # The paper's viewer shows `groundtruth` as text: "subject | relation | object".
        "groundtruth": groundtruth_text(f),
        "trex_id": f["example_id"],  # the paper's viewer lists queries by this name
        "subject": f["subject"],
        "object": f["object"],
        "c4_frequency": int(f["frequency"]),
        "c4_frequency_bucket": str(f["bucket"]),
        "has_trex_sentence": int(f["frequency"]) > 0,
        "model_confidence": finite(pred.get("model_confidence")),
        "temperature_samples": list(pred.get("temperature_samples") or []),
        "model_prediction": pred.get("prediction"),
        "model_correct": None if correct is None else bool(correct),
        "proponent_tailpatch_abs": tp_row,
        "proponent_tailpatch_rel": tp_rel_row,
    })
  return rows


def load_results(*, workdir: str) -> dict[str, list[dict[str, Any]]]:
  """Reads every `<workdir>/results/proponents/<method>.jsonl`.

  Args:
    workdir: the run's workdir.

  Returns:
    {method: rows}, one row per query, in file order.

  Raises:
    FileNotFoundError: no proponents folder or no .jsonl file in it.
    ValueError: a malformed line (names the file and line).
  """
  folder = os.path.join(workdir, "results", "proponents")
  paths = [os.path.join(folder, n) for n in fs.listdir(folder) if n.endswith(".jsonl")]
  if not paths:
    raise FileNotFoundError(
        f"no proponent files (<method>.jsonl) in {folder}: run the evaluation "
        "stage first, or point --workdir at a run that has results/proponents/.")
  out = {}
  for path in paths:
    out[os.path.basename(path)[:-len(".jsonl")]] = workdir_lib.read_jsonl(path)
  return out


def _sorted_methods(methods: Iterable[str]) -> list[str]:
  return methods_lib.in_viewer_order(methods)


def _round_score(x: Any) -> float | None:
  x = json_values.finite_or_none(x)  # JSON.parse in the page rejects NaN/Infinity.
  if x is None or x == 0.0:
    return x
  return float(f"{x:.{_SCORE_DIGITS}g}")


def _check_row(row: Any, where: str) -> None:
  if not isinstance(row, dict):
    raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
  missing = [k for k in REQUIRED_FIELDS if k not in row]
  if missing:
    raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
  n = len(row["proponents"])
  for key in ("proponent_ids", "proponent_scores", "proponent_correct"):
    if row.get(key) is not None and len(row[key]) != n:
      raise ValueError(f"{where}: '{key}' has {len(row[key])} entries but "
                       f"'proponents' has {n}")
  n_opp = len(row.get("opponents") or [])
  for key in ("opponent_ids", "opponent_scores"):
    if row.get(key) is not None and len(row[key]) != n_opp:
      raise ValueError(f"{where}: '{key}' has {len(row[key])} entries but "
                       f"'opponents' has {n_opp}")


def first_correct_rank(correct: Sequence[bool | None] | None) -> int | None:
  """1-based rank of the first correct proponent; 0 if none; None if unlabelled.

  This is what MRR (1/rank, 0 if none) and recall@10 (0 < rank <= 10) are
  computed from (DESIGN.md §3).
  """
  if correct is None or any(c is None for c in correct):
    return None
  for i, c in enumerate(correct):
    if c:
      return i + 1
  return 0


def build_payload(*, results: dict[str, list[dict[str, Any]]],
                  page_size: int = 50) -> dict[str, Any]:
  """Turns {method: rows} into the compact structure the page reads.

  Queries are merged across methods by `example_id` (sorted by it); passage
  texts are stored once in `passages` and referenced by index.

  Args:
    results: {method: rows in the viewer JSONL schema}.
    page_size: queries per page in the list.

  Returns:
    JSON-able dict: methods, default_a/default_b, page_size, queries,
    passages ([id, text] pairs), results ({method: [per-query entry or None]}).

  Raises:
    ValueError: a row is malformed, an example id repeats within a method, or
      two methods disagree on a query's prompt or target.
  """
  if not results:
    raise ValueError("no methods to show: `results` is empty")
  if page_size < 1:
    raise ValueError(f"page_size must be >= 1, got {page_size}")
  methods = _sorted_methods(results)
  queries: dict[str, dict[str, Any]] = {}
  by_method: dict[str, dict[str, dict[str, Any]]] = {m: {} for m in methods}
  for m in methods:
    for i, row in enumerate(results[m]):
      where = f"method '{m}', row {i + 1}"
      _check_row(row, where)
      qid = str(row["example_id"])
      where = f"{where} (example_id {qid})"
      if qid in by_method[m]:
        raise ValueError(f"{where}: example_id appears twice for this method")
      by_method[m][qid] = row
      q = queries.get(qid)
      if q is None:
        queries[qid] = dict(row)
        continue
      for key in _MUST_AGREE:
        if q[key] != row[key]:
          raise ValueError(f"{where}: '{key}' is {row[key]!r} here but {q[key]!r} "
                           "in another method's file")
      for key, value in row.items():  # Fill metadata one method lacks.
        if q.get(key) is None and value is not None:
          q[key] = value

  passages: list[list[str]] = []
  passage_index: dict[tuple[str, str], int] = {}

  def intern(pid: Any, text: Any) -> int:
    key = (str(pid), str(text))
    idx = passage_index.get(key)
    if idx is None:
      idx = passage_index[key] = len(passages)
      passages.append([key[0], key[1]])
    return idx

  qids = sorted(queries)
  out_queries = []
  for qid in qids:
    q = queries[qid]
    gt = q.get("groundtruth") if isinstance(q.get("groundtruth"), dict) else None
    if gt is None and all(q.get(k) is not None for k in ("subject", "relation", "object")):
      gt = {k: q[k] for k in ("subject", "relation", "object")}
    conf = q.get("model_confidence")
    freq = q.get("c4_frequency")
    out_queries.append({
        "id": qid,
        "prompt": str(q["inputs_plaintext"]),
        "target": str(q["targets_plaintext"]),
        "pred": None if q.get("model_prediction") is None else str(q["model_prediction"]),
        "correct": None if q.get("model_correct") is None else bool(q["model_correct"]),
        "conf": None if conf is None else _round_score(conf),
        "freq": None if freq is None else int(freq),
        "bucket": None if q.get("c4_frequency_bucket") is None else str(q["c4_frequency_bucket"]),
        "relation": q.get("relation") or (gt or {}).get("relation"),
        "fact_id": q.get("fact_id"),
        "gt": gt,
        "subject": q.get("subject") or (gt or {}).get("subject"),
        "object": q.get("object") or (gt or {}).get("object"),
        "samples": [str(s) for s in (q.get("temperature_samples") or [])],
    })

  out_results: dict[str, list[dict[str, Any] | None]] = {}
  for m in methods:
    entries = []
    for qid in qids:
      row = by_method[m].get(qid)
      if row is None:
        entries.append(None)
        continue
      ids = row.get("proponent_ids") or [""] * len(row["proponents"])
      opps = row.get("opponents") or []
      opp_ids = row.get("opponent_ids") or [""] * len(opps)
      opp_scores = row.get("opponent_scores") or [None] * len(opps)
      correct = row.get("proponent_correct")
      entries.append({
          "p": [intern(i, t) for i, t in zip(ids, row["proponents"])],
          "s": [_round_score(s) for s in row["proponent_scores"]],
          "c": (None if correct is None else
                [None if c is None else int(bool(c)) for c in correct]),
          "o": [intern(i, t) for i, t in zip(opp_ids, opps)],
          "os": [_round_score(s) for s in opp_scores],
          "first": first_correct_rank(correct),
      })
    out_results[m] = entries

  default_a = "trackstar" if "trackstar" in methods else methods[0]
  others = [m for m in methods if m != default_a]
  default_b = "bm25" if "bm25" in others else (others[0] if others else "")
  return {
      "version": 1,
      "methods": methods,
      "default_a": default_a,
      "default_b": default_b,
      "page_size": int(page_size),
      "queries": out_queries,
      "passages": passages,
      "results": out_results,
  }


def embed_json(obj: Any) -> str:
  """JSON safe to place inside `<script type="application/json">`.

  Every `<`, `>` and `&` becomes a JSON unicode escape, so no `</script>`,
  `<!--` or `<script` sequence can occur in the blob; JSON.parse restores them.
  """
  text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
  return (text.replace("<", "\\u003c").replace(">", "\\u003e")
          .replace("&", "\\u0026").replace("\u2028", "\\u2028")
          .replace("\u2029", "\\u2029"))


def render_html(*, payload: dict[str, Any], title: str = "TrackStar results viewer",
                served: bool = False) -> str:
  """The page: template + inline script (allowed by its CSP hash) + data.

  `served`: the page comes from `tda.serve`, whose API its "trace a prompt" box
  calls (`payload["trace"]`), so its CSP also allows requests to its own origin
  (`connect-src 'self'`); the offline page allows no network at all.
  """
  if not os.path.exists(TEMPLATE_PATH):
    raise FileNotFoundError(
        f"viewer template missing: {TEMPLATE_PATH} (is package_data set for "
        "tda/viewer_template.html?)")
  with open(TEMPLATE_PATH, encoding="utf-8") as f:
    template = f.read()
  head, _, rest = template.partition("<script id=\"viewer-app\">")
  script, _, tail = rest.partition("</script>")
  if not script or not tail:
    raise ValueError(f"{TEMPLATE_PATH}: no <script id=\"viewer-app\"> block found")
  digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode()
  if served:
    head = head.replace("default-src 'none';", "default-src 'none'; connect-src 'self';", 1)
  page = (head.replace("__SCRIPT_HASH__", f"sha256-{digest}")
          .replace("__TITLE__", html.escape(title))
          .replace("__DATA__", embed_json(payload))
          + "<script id=\"viewer-app\">" + script + "</script>" + tail)
  return page


def write_viewer(*, workdir: str, out_path: str | None = None,
                 page_size: int = 50) -> str:
  """Writes the viewer page for a workdir's results.

  Args:
    workdir: the run's workdir (reads `results/proponents/*.jsonl`).
    out_path: where to write; default `<workdir>/results/viewer.html`.
    page_size: queries per page in the list.

  Returns:
    The path written.
  """
  results = load_results(workdir=workdir)
  payload = build_payload(results=results, page_size=page_size)
  page = render_html(payload=payload,
                     title=f"TrackStar results: {os.path.basename(fs.abspath(workdir).rstrip('/'))}")
  out_path = out_path or os.path.join(workdir, "results", "viewer.html")
  fs.makedirs(os.path.dirname(fs.abspath(out_path)))
  workdir_lib.write_text(out_path, page)  # Write-then-rename: no half pages.
  return out_path


def _define_flags() -> None:
  # Defined only when run as a program: tda.run (and scripts) import this module
  # and define their own --workdir.
  flags.DEFINE_string("workdir", None, "Run workdir holding results/proponents/.")
  flags.DEFINE_string("out", None, "Output path (default <workdir>/results/viewer.html).")
  flags.DEFINE_integer("page_size", 50, "Queries per page.")
  cli.define_json_flag()


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  fv = flags.FLAGS
  if not fv.workdir:
    raise app.UsageError("--workdir is required")
  path = write_viewer(workdir=fv.workdir, out_path=fv.out, page_size=fv.page_size)
  if fv.json:
    cli.print_json({"path": path, "bytes": fs.getsize(path)})
  else:
    print(f"wrote {path} ({fs.getsize(path) / 2**20:.1f} MiB); open it in a browser.")


if __name__ == "__main__":
  _define_flags()
  app.run(main)

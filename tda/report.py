"""Evaluation outputs under `<workdir>/results/` (DESIGN.md §2-3).

`write_report` checks its inputs, scores every method on the same queries
(`tda.metrics`) and writes:

  metrics.json                 per-method metrics, per-bucket breakdowns, timings,
                               model eval, and `paper_orderings` (the paper's
                               claims checked on our numbers, `tda.claims`)
  table.md / table.csv         laid out like the paper's Table 1, with its T-REx
  table_by_bucket.md / .csv    numbers alongside; the same per frequency bucket
                               (`tda.result_tables`)
  fig_table.png, fig_by_bucket.png   (`tda.figures`)
  proponents/<method>.jsonl    one row per query in the schema of the paper's
                               public results viewer (`tda.viewer.result_rows`)
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Sequence

import numpy as np

from tda import claims
from tda import figures
from tda import fs
from tda import json_values
from tda import metrics as metrics_lib
from tda import result_tables
from tda import viewer
from tda import workdir as workdir_lib

FAMILIES = ("gradient", "baseline")

_RESERVED = ("methods", "timings_s", "model_eval", "num_queries", "paper_orderings")
_FACT_KEYS = ("fact_id", "example_id", "relation", "subject", "object",
              "inputs_plaintext", "targets_plaintext", "frequency", "bucket",
              "passage_ids")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


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
    first_relevant_rank: [q] rank of the first entailing passage in the full
      ranking (0: none); None: MRR from `top_ids` only.
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
  first_relevant_rank: Any = None


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


def _check_inputs(*, methods: dict[str, MethodResult], passages: dict[str, str],
                  extra: dict[str, Any] | None) -> list[str]:
  """The query ids every method shares; raises on any malformed method or `extra`."""
  if not methods:
    raise ValueError("write_report: no methods")
  clash = sorted(set(extra or {}) & set(_RESERVED))
  if clash:
    raise ValueError(f"write_report: extra keys {clash} would overwrite metrics.json's own")
  ref = next(iter(methods))
  query_ids = [str(q) for q in methods[ref].query_ids]
  if not query_ids:
    raise ValueError(f"write_report: method '{ref}' has no queries")
  for name, m in methods.items():
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
  return query_ids


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

def _method_metrics(m: MethodResult, facts_q: list[dict], bucket_order: Sequence[str],
                    n_boot: int, seed: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """One method's metrics.json entry (each metric with a bootstrap 95% CI over
  queries) and its per-query values (for paired comparisons)."""
  att = metrics_lib.attribution(top_ids=m.top_ids,
                                relevant=[set(f["passage_ids"]) for f in facts_q], k=10,
                                full_ranks=m.first_relevant_rank)
  n_q = len(facts_q)
  values = {"mrr": att["rr"], "recall_at_10": att["hit"].astype(np.float64)}
  entry = {"family": m.family, "mrr": att["mrr"], "recall_at_10": att["recall_at_10"],
           "precision_at_10": att["precision_at_10"], "tailpatch_abs": None,
           "tailpatch_rel": None, "tailpatch_at_k": {}, "n_tailpatched": 0,
           "full_ranking": m.first_relevant_rank is not None}
  if m.tailpatch_abs is not None:
    tp = metrics_lib.tailpatch_summary(abs_qk=m.tailpatch_abs, rel_qk=m.tailpatch_rel)
    entry.update(tailpatch_abs=tp["tailpatch_abs"], tailpatch_rel=tp["tailpatch_rel"],
                 tailpatch_at_k={str(k): v for k, v in tp["at_k"].items()},
                 n_tailpatched=tp["n_evaluated"])
    values["tailpatch_abs"], values["tailpatch_rel"] = tp["abs_q"], tp["rel_q"]
  else:
    values["tailpatch_abs"] = values["tailpatch_rel"] = np.full(n_q, np.nan)
  for key in ("mrr", "recall_at_10", "tailpatch_abs", "tailpatch_rel"):
    entry[f"{key}_ci"] = list(metrics_lib.bootstrap_ci(values[key], n_boot=n_boot, seed=seed))
  entry["median_rank"] = (float(np.median(att["rank"][att["rank"] > 0]))
                          if (att["rank"] > 0).any() else None)
  groups = metrics_lib.by_group(values=values, groups=[f["bucket"] for f in facts_q],
                                order=list(bucket_order))
  entry["by_bucket"] = {b: {**g["mean"], "n": g["n"],
                            "n_tailpatched": g["count"]["tailpatch_abs"]}
                        for b, g in groups.items()}
  g = np.asarray([f["bucket"] for f in facts_q])
  for b in bucket_order:
    for key in ("mrr", "tailpatch_abs"):
      entry["by_bucket"][b][f"{key}_ci"] = list(metrics_lib.bootstrap_ci(
          values[key][g == b], n_boot=n_boot, seed=seed))
  return entry, values


# --- Entry point --------------------------------------------------------------

def write_report(*, results_dir: str, methods: dict[str, MethodResult],
                 facts: list[dict[str, Any]], passages: dict[str, str],
                 predictions: dict[str, dict[str, Any]], bucket_order: Sequence[str],
                 timings_s: dict[str, float], model_eval: dict[str, Any],
                 extra: dict[str, Any] | None = None, n_boot: int = 1000,
                 seed: int = 0) -> dict[str, Any]:
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
    n_boot, seed: bootstrap resamples and seed of every CI (`tda.metrics.bootstrap_ci`;
      one seed, so all methods share resamples).

  Returns:
    The metrics dict written to metrics.json (NaN written as null).

  Raises:
    ValueError: no methods, methods on different queries, a query without a
      fact, an unknown bucket, a passage id missing from `passages`, malformed
      arrays, or `extra` shadowing a reserved key.
  """
  query_ids = _check_inputs(methods=methods, passages=passages, extra=extra)
  names = list(methods)
  facts_q = _index_facts(facts, query_ids, passages, bucket_order)

  scored = {name: _method_metrics(methods[name], facts_q, bucket_order, n_boot, seed)
            for name in names}
  entries = {name: e for name, (e, _) in scored.items()}
  out = {
      "methods": entries,
      "timings_s": dict(timings_s),
      "model_eval": model_eval,
      "num_queries": len(query_ids),
      "paper_orderings": claims.paper_orderings(
          methods=entries, per_query={name: v for name, (_, v) in scored.items()},
          n_boot=n_boot, seed=seed),
      **(extra or {}),
  }
  out = json_values.to_jsonable(out)

  fs.makedirs(results_dir)
  workdir_lib.write_json(os.path.join(results_dir, "metrics.json"), out)
  result_tables.write_tables(results_dir=results_dir, methods=out["methods"],
                             bucket_order=bucket_order)
  figures.plot_table(methods=out["methods"], path=os.path.join(results_dir, "fig_table.png"))
  figures.plot_by_bucket(methods=out["methods"], bucket_order=bucket_order,
                         path=os.path.join(results_dir, "fig_by_bucket.png"))
  folder = os.path.join(results_dir, "proponents")
  fs.makedirs(folder)
  for stale in fs.listdir(folder):  # The viewer reads every .jsonl here.
    if stale.endswith(".jsonl") and stale[:-len(".jsonl")] not in methods:
      fs.remove(os.path.join(folder, stale))
  for name in names:
    m = methods[name]
    workdir_lib.write_jsonl(os.path.join(folder, f"{name}.jsonl"), viewer.result_rows(
        facts=facts_q, passages=passages, predictions=predictions, top_ids=m.top_ids,
        top_scores=m.top_scores, bottom_ids=m.bottom_ids, bottom_scores=m.bottom_scores,
        tailpatch_abs=m.tailpatch_abs, tailpatch_rel=m.tailpatch_rel))
  return out

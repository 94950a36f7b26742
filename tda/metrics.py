"""Evaluation metrics (DESIGN.md §3): attribution (MRR, recall@k, precision@k),
tail-patch influence aggregation, and per-group (frequency bucket) breakdowns.

Pure functions of ids and arrays; no config, no files. `tda.report` calls them.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

# Accepted containers for one query's relevant passage ids. A bare string is
# refused: `"c4:12" in "c4:123"` would silently match substrings.
_ID_CONTAINERS = (set, frozenset, list, tuple)


def _check_ids(ids: Any, what: str) -> None:
  for x in ids:
    if not isinstance(x, str):
      raise ValueError(f"{what}: ids must be str, got {type(x).__name__} ({x!r}); "
                       "ints vs. strings would never match")


def _as_relevant(relevant: Any, where: str) -> set[str] | frozenset[str]:
  if isinstance(relevant, (str, bytes)) or not isinstance(relevant, _ID_CONTAINERS):
    raise ValueError(f"{where}: relevant ids must be a set (or list/tuple) of str, got "
                     f"{type(relevant).__name__}")
  _check_ids(relevant, where)
  return relevant if isinstance(relevant, (set, frozenset)) else set(relevant)


def first_correct_rank(*, proponent_ids: Sequence[str], relevant: set[str]) -> int:
  """1-based rank of the first proponent in `relevant`; 0 if none is.

  Args:
    proponent_ids: one query's proponents, best first.
    relevant: ids of the passages that entail the query's fact.

  Returns:
    The rank (1 = best proponent), or 0 when no proponent is relevant.
  """
  if isinstance(proponent_ids, (str, bytes)):
    raise ValueError("proponent_ids must be a sequence of ids, not a single string")
  rel = _as_relevant(relevant, "first_correct_rank")
  _check_ids(proponent_ids, "first_correct_rank proponent_ids")
  for i, pid in enumerate(proponent_ids):
    if pid in rel:
      return i + 1
  return 0


def attribution(*, top_ids: Sequence[Sequence[str]], relevant: Sequence[Any],
                k: int = 10, full_ranks: Sequence[int] | None = None) -> dict[str, Any]:
  """Attribution metrics of ranked proponents against ground truth (DESIGN.md §3).

  Args:
    top_ids: per query, the proponent ids best first (lengths may differ).
    relevant: per query, the set of ids that entail its fact.
    k: cut-off for recall and precision (the paper uses 10).
    full_ranks: per query, the rank of the first relevant passage in a deeper
      ranking than `top_ids` (e.g. the whole corpus; 0 = none within it). When
      given, MRR and recall come from these ranks (so a first correct passage
      at rank 11+ still counts in MRR) and precision from `top_ids`.

  Returns:
    {"mrr": mean over queries of 1/rank of the first correct proponent among
     ALL listed ones (0 if none), "recall_at_10": share of queries with a
     correct proponent in the top k, "precision_at_10": mean over queries of the
     share of the top-k proponents (of those listed, at most k) that are
     correct (0 for an empty list), "rr": [q] reciprocal ranks, "hit": [q]
     bools, "rank": [q] ints (0 = none), "k": k}. The `_at_10` names are kept
     for every k so the report's keys stay fixed.

  Raises:
    ValueError: no queries, lengths differ, k < 1, or ids of the wrong type.
  """
  if int(k) != k or k < 1:
    raise ValueError(f"k must be an integer >= 1, got {k!r}")
  k = int(k)
  n = len(top_ids)
  if n == 0:
    raise ValueError("attribution: no queries (top_ids is empty)")
  if len(relevant) != n:
    raise ValueError(f"attribution: top_ids has {n} queries but relevant has "
                     f"{len(relevant)}")
  ranks = np.zeros(n, np.int64)
  prec = np.zeros(n, np.float64)
  for q in range(n):
    rel = _as_relevant(relevant[q], f"attribution relevant[{q}]")
    ids = top_ids[q]
    ranks[q] = first_correct_rank(proponent_ids=ids, relevant=rel)
    head = list(ids[:k])
    prec[q] = sum(pid in rel for pid in head) / len(head) if head else 0.0
  if full_ranks is not None:
    full = np.asarray(full_ranks, np.int64)
    if full.shape != (n,) or (full < 0).any():
      raise ValueError(f"attribution: full_ranks must be {n} ranks >= 0, got shape {full.shape}")
    listed = ranks > 0
    if (full[listed] > ranks[listed]).any():
      q = int(np.flatnonzero(listed & (full > ranks))[0])
      raise ValueError(f"attribution: query {q} has a correct proponent at rank {ranks[q]} "
                       f"of top_ids but full_ranks says {full[q]}")
    ranks = full
  rr = np.where(ranks > 0, 1.0 / np.maximum(ranks, 1), 0.0)
  hit = (ranks > 0) & (ranks <= k)
  return {
      "mrr": float(rr.mean()),
      "recall_at_10": float(hit.mean()),
      "precision_at_10": float(prec.mean()),
      "rr": rr,
      "hit": hit,
      "rank": ranks,
      "precision": prec,
      "k": k,
  }


def _check_tailpatch(x: Any, name: str) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != 2:
    raise ValueError(f"{name} must be [queries, proponents], got shape {x.shape}")
  if x.shape[0] == 0 or x.shape[1] == 0:
    raise ValueError(f"{name} is empty (shape {x.shape})")
  if np.isinf(x).any():
    # NaN means "not tail-patched"; an infinity is a bug upstream (e.g. a
    # relative change divided by p_before = 0), not something to average.
    q, j = np.argwhere(np.isinf(x))[0]
    raise ValueError(f"{name}[{q}, {j}] is infinite; guard p_before = 0 before dividing")
  return x


def _row_means(x_qk: np.ndarray, k: int) -> np.ndarray:
  """Per-row nan-mean of the first k columns; NaN where all of them are NaN."""
  head = x_qk[:, :k]
  cnt = np.isfinite(head).sum(1)
  tot = np.where(np.isfinite(head), head, 0.0).sum(1)
  return np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan)


def _nanmean(x: np.ndarray) -> float:
  ok = np.isfinite(x)
  return float(x[ok].mean()) if ok.any() else float("nan")


def tailpatch_summary(*, abs_qk: Any, rel_qk: Any,
                      ks: Sequence[int] = (1, 3, 5, 10)) -> dict[str, Any]:
  """Aggregates per-proponent tail-patch changes (DESIGN.md §3, influence).

  Rows are queries, columns proponents by rank (best first). A row that is all
  NaN is a query that was not tail-patched and is ignored; a NaN inside an
  evaluated row (e.g. a query with fewer proponents) is skipped in that row's
  mean.

  Args:
    abs_qk: [q, k] p_after - p_before per proponent.
    rel_qk: [q, k] (p_after - p_before) / p_before per proponent.
    ks: cut-offs; those larger than the number of columns are dropped.

  Returns:
    {"at_k": {k: {"abs", "rel"}} (mean over evaluated queries of the mean over
     the top-k proponents), "tailpatch_abs"/"tailpatch_rel" (the value at the
     largest k kept), "k": that k, "n_evaluated": queries with any value,
     "abs_q"/"rel_q": [q] per-query means over the top-k (NaN if not
     evaluated)}. Values are NaN when no query was evaluated.

  Raises:
    ValueError: shapes differ or are not 2-D, an empty array, an infinite
      value, a k < 1, or no k in `ks` fits the number of columns.
  """
  a = _check_tailpatch(abs_qk, "abs_qk")
  r = _check_tailpatch(rel_qk, "rel_qk")
  if a.shape != r.shape:
    raise ValueError(f"abs_qk has shape {a.shape} but rel_qk has {r.shape}")
  if not len(ks):
    raise ValueError("ks is empty")
  for k in ks:
    if int(k) != k or k < 1:
      raise ValueError(f"every k in ks must be an integer >= 1, got {k!r}")
  kept = sorted({int(k) for k in ks if k <= a.shape[1]})
  if not kept:
    raise ValueError(f"no k in ks={tuple(ks)} fits the {a.shape[1]} tail-patched "
                     "proponents per query")
  at_k = {}
  for k in kept:
    at_k[k] = {"abs": _nanmean(_row_means(a, k)), "rel": _nanmean(_row_means(r, k))}
  top = kept[-1]
  evaluated = np.isfinite(a).any(1) | np.isfinite(r).any(1)
  return {
      "at_k": at_k,
      "tailpatch_abs": at_k[top]["abs"],
      "tailpatch_rel": at_k[top]["rel"],
      "k": top,
      "n_evaluated": int(evaluated.sum()),
      "abs_q": _row_means(a, top),
      "rel_q": _row_means(r, top),
  }


def by_group(*, values: dict[str, Any], groups: Sequence[str],
             order: Sequence[str]) -> dict[str, dict[str, Any]]:
  """Per-group means of per-query values (e.g. per frequency bucket).

  Args:
    values: name -> [q] per-query values (NaN = missing, ignored).
    groups: [q] the group of each query.
    order: every group name, in display order (groups with no query get n=0).

  Returns:
    {group: {"n": queries in the group, "mean": {name: mean of non-NaN values
     (NaN if none)}, "count": {name: non-NaN values}}}, keys in `order`.

  Raises:
    ValueError: empty input, a length mismatch, duplicate names in `order`,
      or a group not in `order`.
  """
  n = len(groups)
  if n == 0:
    raise ValueError("by_group: no queries (groups is empty)")
  if not values:
    raise ValueError("by_group: no values to aggregate")
  if len(set(order)) != len(order):
    raise ValueError(f"by_group: order has duplicate names: {list(order)}")
  unknown = sorted({str(g) for g in groups} - {str(o) for o in order})
  if unknown:
    raise ValueError(f"by_group: unknown group(s) {unknown}; known: {list(order)}")
  arrays = {}
  for name, v in values.items():
    v = np.asarray(v, np.float64)
    if v.shape != (n,):
      raise ValueError(f"by_group: values['{name}'] has shape {v.shape}, expected ({n},)")
    arrays[name] = v
  g = np.asarray([str(x) for x in groups])
  out = {}
  for name in order:
    sel = g == str(name)
    out[name] = {
        "n": int(sel.sum()),
        "mean": {k: _nanmean(v[sel]) for k, v in arrays.items()},
        "count": {k: int(np.isfinite(v[sel]).sum()) for k, v in arrays.items()},
    }
  return out


def _boot_means(x: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
  """Means of `n_boot` resamples (with replacement) of the rows of x."""
  n = len(x)
  idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
  return x[idx].mean(axis=1)


def bootstrap_ci(values_q: Any, *, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
  """Percentile bootstrap CI of the mean over queries (NaN values are dropped).

  Args:
    values_q: [q] per-query values (e.g. reciprocal ranks).
    n_boot: resamples of the queries.
    seed: resampling seed (the same seed resamples the same query indices, so
      methods scored on the same queries share resamples).
    level: coverage, e.g. 0.95.

  Returns:
    (lo, hi); (NaN, NaN) when no value is finite.
  """
  if not 0.0 < level < 1.0:
    raise ValueError(f"level must be in (0, 1), got {level}")
  if n_boot < 1:
    raise ValueError(f"n_boot must be >= 1, got {n_boot}")
  x = np.asarray(values_q, np.float64)
  x = x[np.isfinite(x)]
  if not len(x):
    return float("nan"), float("nan")
  m = _boot_means(x, n_boot, seed)
  a = (1.0 - level) / 2
  return float(np.quantile(m, a)), float(np.quantile(m, 1.0 - a))


def paired_diff_ci(a_q: Any, b_q: Any, *, n_boot: int = 1000, seed: int = 0,
                   level: float = 0.95) -> dict[str, float]:
  """Mean of b − a over the queries where both are finite, with a paired
  percentile bootstrap CI (both methods resampled on the same queries).

  Returns:
    {"diff", "lo", "hi", "n"}; NaNs (n = 0) when no query has both.
  """
  a, b = np.asarray(a_q, np.float64), np.asarray(b_q, np.float64)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(f"paired_diff_ci: shapes {a.shape} and {b.shape} must be equal and 1-D")
  ok = np.isfinite(a) & np.isfinite(b)
  d = (b - a)[ok]
  if not len(d):
    return {"diff": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
  lo, hi = bootstrap_ci(d, n_boot=n_boot, seed=seed, level=level)
  return {"diff": float(d.mean()), "lo": lo, "hi": hi, "n": int(len(d))}


def norms_by_kind(*, ids: Sequence[str], norms_n: Any, kind_of: dict[str, str],
                  top_ids: Sequence[Sequence[str]], kind: str = "outlier",
                  top_fraction: float = 0.05) -> dict[str, Any]:
  """How a kind of passage (outliers by default) sits among unnormalised gradient
  norms: the median norm per kind, the kind's share of the corpus, of the
  `top_fraction` highest norms, and of the retrieved top-k. TRAK's collapse in the
  paper comes from high-norm outlier passages dominating unnormalised scores; these
  figures say whether that mechanism exists in a run."""
  norms_n = np.asarray(norms_n, np.float64)
  if len(ids) != len(norms_n):
    raise ValueError(f"{len(ids)} ids but {len(norms_n)} norms")
  kinds = np.array([kind_of.get(i, "?") for i in ids])
  top_n = max(1, int(round(top_fraction * len(ids))))
  highest = np.argsort(-norms_n, kind="stable")[:top_n]
  retrieved = [kind_of.get(i, "?") for row in top_ids for i in row]
  return {
      "kind": kind,
      "median_norm_by_kind": {k: float(np.median(norms_n[kinds == k]))
                              for k in sorted(set(kinds.tolist()))},
      "share_of_corpus": float(np.mean(kinds == kind)),
      "top_fraction": top_fraction,
      "share_of_highest_norms": float(np.mean(kinds[highest] == kind)),
      "share_of_retrieved": (float(np.mean([k == kind for k in retrieved]))
                             if retrieved else float("nan")),
  }

"""The evaluation protocol (DESIGN.md §3, "Protocol"): which queries tune, which report.

The queries are split, seeded and stratified by (frequency bucket, relation), into
**dev** and **test** (`eval.dev_fraction`, `eval.split_seed`). Every tuned value
(the damping of each R-using method; λ comes from the paper's rule, whose K is
fixed by `hessian.lambda_top_k_fraction`) is chosen on dev, and R_eval is
estimated from dev queries; every reported number is on test.

Dev scoring ranks a pool of passages exactly: a uniform sample of the corpus drawn
apart from R_train's (`featurize.sweep_pool_sample`) plus the dev queries'
ground-truth passages (at the default scale the pool is the whole corpus, so the
dev MRR is over the full ranking).

Pure functions of arrays and fact records; the 'gradients' and 'evaluation' stages
call them.
"""

from __future__ import annotations

import collections
from typing import Any, Sequence

import numpy as np

DEV, TEST = "dev", "test"


def split_queries(*, buckets: Sequence[str], relations: Sequence[str],
                  dev_fraction: float, seed: int) -> np.ndarray:
  """Seeded, stratified dev/test assignment of queries.

  Within each (bucket, relation) stratum the queries are shuffled with a seed
  derived from `seed` and the stratum's name, and round(dev_fraction × n) of them
  (at most n − 1, so every stratum with two or more queries keeps one on test) go
  to dev. The assignment of a stratum does not depend on the other strata. When
  that gives dev no query at all (every stratum a single query), the single-query
  strata are pooled into one remainder stratum split by the same rule.

  Args:
    buckets, relations: per query, its frequency bucket and relation.
    dev_fraction: share of each stratum on dev, in [0, 1).
    seed: the split seed.

  Returns:
    [Q] array of 'dev' / 'test'.
  """
  if len(buckets) != len(relations):
    raise ValueError(f"split_queries: {len(buckets)} buckets but {len(relations)} relations")
  if not 0.0 <= dev_fraction < 1.0:
    raise ValueError(f"eval.dev_fraction must be in [0, 1), got {dev_fraction}")
  strata: dict[tuple[str, str], list[int]] = collections.defaultdict(list)
  for i, key in enumerate(zip(buckets, relations)):
    strata[(str(key[0]), str(key[1]))].append(i)
  out = np.full(len(buckets), TEST, dtype=object)
  for (b, r), rows in sorted(strata.items()):
    _assign(out, rows, name=f"{b}\x00{r}", dev_fraction=dev_fraction, seed=seed)
  if dev_fraction > 0 and not (out == DEV).any():
    # Every stratum is a single query (a small query set over many relations), so the
    # stratified rule gives dev nothing. Only then are those queries pooled into one
    # remainder stratum and split by the same rule; a query set with any stratum of
    # two or more keeps the purely stratified split.
    singles = [rows[0] for rows in strata.values() if len(rows) == 1]
    _assign(out, sorted(singles), name="\x00remainder", dev_fraction=dev_fraction, seed=seed)
  return out


def _assign(out: np.ndarray, rows: list[int], *, name: str, dev_fraction: float,
            seed: int) -> None:
  """Marks round(dev_fraction × n) of `rows` (at most n − 1) as dev, seeded by `name`."""
  n = len(rows)
  n_dev = min(int(np.floor(dev_fraction * n + 0.5)), max(n - 1, 0))
  # A stable per-stratum seed: the same stratum gets the same split whatever else exists.
  key = [seed] + [ord(c) for c in name]
  perm = np.random.default_rng(key).permutation(n)
  for j in perm[:n_dev]:
    out[rows[j]] = DEV


def query_split(config, facts_q: Sequence[dict[str, Any]]) -> np.ndarray:
  """`split_queries` for the run's queries (fact records in query order)."""
  return split_queries(buckets=[f["bucket"] for f in facts_q],
                       relations=[f["relation"] for f in facts_q],
                       dev_fraction=config.eval.dev_fraction, seed=config.eval.split_seed)


def first_relevant_rank(*, scores_qn: np.ndarray, relevant_qn: np.ndarray) -> np.ndarray:
  """Exact 1-based rank of each query's best-scoring relevant passage; 0 if none.

  Ties are counted against the query: rank = 1 + the number of irrelevant
  passages scoring at least as high as the best relevant one, so a tie never
  inflates a metric.
  """
  scores_qn = np.asarray(scores_qn, np.float64)
  relevant_qn = np.asarray(relevant_qn, bool)
  if scores_qn.shape != relevant_qn.shape or scores_qn.ndim != 2:
    raise ValueError(f"scores {scores_qn.shape} and relevant {relevant_qn.shape} must be "
                     "the same [Q, N] shape")
  best = np.where(relevant_qn, scores_qn, -np.inf).max(axis=1)
  above = ((scores_qn >= best[:, None]) & ~relevant_qn).sum(axis=1)
  return np.where(relevant_qn.any(axis=1), 1 + above, 0).astype(np.int64)


def mrr_from_ranks(ranks_q: np.ndarray) -> float:
  r = np.asarray(ranks_q)
  return float(np.where(r > 0, 1.0 / np.maximum(r, 1), 0.0).mean()) if len(r) else float("nan")


def grid_edge(candidates: Sequence[float], scores: Sequence[float], chosen: int) -> str | None:
  """Whether the chosen candidate of a dev sweep sits at an end of its grid with a dev
  score strictly above its neighbour's, so the dev optimum may lie beyond the grid.

  Args:
    candidates: the grid, in any order.
    scores: the dev score of each candidate.
    chosen: the index (into `candidates`) of the chosen one.

  Returns:
    'largest' or 'smallest' (the end it sits at), or None: a candidate inside the
    grid, one tied with its neighbour (a flat end says nothing about beyond), or a
    grid of fewer than two candidates.
  """
  if len(candidates) != len(scores):
    raise ValueError(f"{len(candidates)} candidates but {len(scores)} scores")
  if not 0 <= chosen < len(candidates):
    raise ValueError(f"chosen={chosen} is not an index into {len(candidates)} candidates")
  if len(candidates) < 2:
    return None
  order = [int(i) for i in np.argsort(np.asarray(candidates, np.float64), kind="stable")]
  pos = order.index(chosen)
  if pos == len(order) - 1 and scores[chosen] > scores[order[-2]]:
    return "largest"
  if pos == 0 and scores[chosen] > scores[order[1]]:
    return "smallest"
  return None

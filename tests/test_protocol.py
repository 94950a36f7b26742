"""Tests for the evaluation protocol: the dev/test split, exact full-ranking MRR,
bootstrap CIs, CI-judged claims, and the dev sweep of the damping."""

import collections
import logging

import numpy as np
import pytest

from tda import claims
from tda import featurize
from tda import hessian
from tda import metrics
from tda import protocol
from tests import helpers


def _strata(n_per=7):
  buckets, relations = [], []
  for b in ("1", "2-3", "4-10"):
    for r in ("born", "capital", "sport"):
      buckets += [b] * n_per
      relations += [r] * n_per
  return buckets, relations


def test_split_is_stratified_disjoint_and_seeded():
  buckets, relations = _strata()
  s = protocol.split_queries(buckets=buckets, relations=relations, dev_fraction=0.3, seed=0)
  assert set(s) == {"dev", "test"} and len(s) == len(buckets)  # Every query in exactly one.
  per = collections.Counter((b, r, x) for b, r, x in zip(buckets, relations, s))
  for b in ("1", "2-3", "4-10"):
    for r in ("born", "capital", "sport"):
      assert per[(b, r, "dev")] == 2 and per[(b, r, "test")] == 5  # round(0.3 × 7) per stratum.
  again = protocol.split_queries(buckets=buckets, relations=relations, dev_fraction=0.3, seed=0)
  other = protocol.split_queries(buckets=buckets, relations=relations, dev_fraction=0.3, seed=1)
  assert list(again) == list(s) and list(other) != list(s)
  # A stratum's assignment does not depend on the other strata.
  part = protocol.split_queries(buckets=buckets[:7], relations=relations[:7], dev_fraction=0.3,
                                seed=0)
  assert list(part) == list(s[:7])
  # A single-query stratum stays on test; a bad fraction is refused.
  assert list(protocol.split_queries(buckets=["1"], relations=["x"], dev_fraction=0.5,
                                     seed=0)) == ["test"]
  with pytest.raises(ValueError, match="dev_fraction"):
    protocol.split_queries(buckets=buckets, relations=relations, dev_fraction=1.0, seed=0)


def test_all_single_query_strata_are_pooled_but_only_when_no_stratum_gives_dev():
  # Ten queries, each its own (bucket, relation): the stratified rule gives dev none,
  # so they are pooled into one remainder stratum: round(0.3 × 10) = 3 on dev.
  buckets = [str(i % 2) for i in range(10)]
  relations = [f"r{i}" for i in range(10)]
  s = protocol.split_queries(buckets=buckets, relations=relations, dev_fraction=0.3, seed=0)
  assert collections.Counter(s) == {"dev": 3, "test": 7}
  # With one stratum of two or more, singletons stay on test and the split is purely stratified.
  b2, r2 = buckets + ["0"] * 4, relations + ["shared"] * 4
  s2 = protocol.split_queries(buckets=b2, relations=r2, dev_fraction=0.3, seed=0)
  assert list(s2[:10]) == ["test"] * 10 and collections.Counter(s2[10:]) == {"dev": 1, "test": 3}


def test_full_ranking_mrr_counts_ranks_beyond_ten_and_ties_against_the_query():
  scores = np.array([np.arange(20, 0, -1), [5.0] * 20], np.float64)  # Row 1: all tied.
  rel = np.zeros((2, 20), bool)
  rel[0, 14] = True  # Rank 15 in a strictly decreasing row.
  rel[1, 0] = True   # Tied with 19 irrelevant passages: counted as rank 20.
  ranks = protocol.first_relevant_rank(scores_qn=scores, relevant_qn=rel)
  assert list(ranks) == [15, 20]
  assert protocol.mrr_from_ranks(ranks) == pytest.approx((1 / 15 + 1 / 20) / 2)
  # attribution() with full ranks: MRR from the deep rank, recall@10 a miss.
  att = metrics.attribution(top_ids=[["x%d" % i for i in range(10)]],
                            relevant=[{"gold"}], full_ranks=[15])
  assert att["mrr"] == pytest.approx(1 / 15) and att["recall_at_10"] == 0.0
  att = metrics.attribution(top_ids=[["x", "gold"]], relevant=[{"gold"}])
  assert att["mrr"] == 0.5
  with pytest.raises(ValueError, match="full_ranks says 5"):
    metrics.attribution(top_ids=[["x", "gold"]], relevant=[{"gold"}], full_ranks=[5])
  # Dev ranks agree with the single-process definition.
  q = np.random.default_rng(0).normal(size=(4, 3))
  p = np.random.default_rng(1).normal(size=(30, 3))
  rel = np.random.default_rng(2).random((4, 30)) < 0.1
  rel[0] = False
  np.testing.assert_array_equal(
      featurize.dev_ranks(queries_qd=q, pool_pd=p, relevant_qp=rel),
      protocol.first_relevant_rank(scores_qn=q @ p.T, relevant_qn=rel))


def test_bootstrap_ci_covers_the_mean_narrows_with_n_and_pairs_methods():
  rng = np.random.default_rng(0)
  x = rng.random(400)
  lo, hi = metrics.bootstrap_ci(x, n_boot=500, seed=0)
  assert lo < x.mean() < hi
  lo_s, hi_s = metrics.bootstrap_ci(x[:40], n_boot=500, seed=0)
  assert hi_s - lo_s > 2 * (hi - lo)  # ~sqrt(10) wider with a tenth of the queries.
  assert metrics.bootstrap_ci(x, n_boot=500, seed=0) == (lo, hi)  # Seeded.
  assert np.isnan(metrics.bootstrap_ci([np.nan, np.nan])[0])
  # Paired: a constant shift has a degenerate CI even though each method's CI is wide.
  d = metrics.paired_diff_ci(x, x + 0.01, n_boot=200)
  assert d["lo"] == pytest.approx(0.01) and d["hi"] == pytest.approx(0.01) and d["n"] == 400
  assert claims.verdict(d, strict=True) == "holds"
  assert claims.verdict({"diff": -0.1, "lo": -0.2, "hi": -0.01}, strict=False) == "differs"
  assert claims.verdict({"diff": 0.01, "lo": -0.05, "hi": 0.07}, strict=True) == "inconclusive"
  assert claims.verdict({"diff": 0.01, "lo": -0.05, "hi": 0.07}, strict=False) == "holds"


def test_claims_are_judged_by_paired_cis():
  rng = np.random.default_rng(0)
  base = rng.random(300)
  per_query = {"exp1": {"mrr": base}, "exp2": {"mrr": base + 0.05},
               "trak": {"mrr": base + rng.normal(0, 0.3, 300)}}
  entries = {m: {"family": "gradient", "mrr": float(v["mrr"].mean()),
                 "mrr_ci": list(metrics.bootstrap_ci(v["mrr"]))}
             for m, v in per_query.items()}
  out = claims.paper_orderings(methods=entries, per_query=per_query, n_boot=200)
  assert out["mrr_exp1_lt_exp2"]["verdict"] == "holds"
  assert out["trak_near_zero"]["verdict"] == "inconclusive"  # Noisy, no real difference.


def _dev_setup(seed=0, d=8):
  rng = np.random.default_rng(seed)
  pool = {v: rng.normal(size=(64, d)) for v in ("raw", "corrected")}
  # Dev queries near their own passage, with a shared large direction on top.
  shared = np.zeros(d)
  shared[0] = 10.0
  qs = {v: pool[v][:12] + 0.3 * rng.normal(size=(12, d)) + shared for v in pool}
  rel = np.zeros((12, 64), bool)
  rel[np.arange(12), np.arange(12)] = True
  return qs, pool, rel, featurize.DevPool(queries=qs, pool=pool, relevant_qp=rel)


def _chosen_dev_mrr(fit, t, qs, pool, rel):
  """The dev MRR of method `t` with the whitener the sweep chose."""
  v = "raw" if t == "trak" else "corrected"
  ranks = featurize.dev_ranks(queries_qd=fit.whiteners.transform(method=t, vectors_nd=qs[v]),
                              pool_pd=fit.whiteners.transform(method=t, vectors_nd=pool[v]),
                              relevant_qp=rel)
  return protocol.mrr_from_ranks(ranks)


def test_dev_sweep_picks_the_damping_with_the_best_dev_mrr_and_records_every_candidate(
    caplog):
  c = helpers.tiny_config(**{"hessian.damping_candidates": (1e-3, 1.0, 1e3),
                             "hessian.lambda_top_k_fraction": 0.25,
                             "hessian.damping_extend_steps": 0})
  qs, pool, rel, dev = _dev_setup()
  methods = ["trak", "exp2", "exp5", "trackstar"]
  with caplog.at_level(logging.WARNING):
    fit = featurize.fit_whiteners(c, methods=methods, queries=qs, train=pool, dev=dev)
  for t in ("trak", "exp5", "trackstar"):
    sw = fit.sweep[t]
    assert sw["candidates"] == [1e-3, 1.0, 1e3] and len(sw["dev_mrr"]) == 3
    assert sw["chosen"] == sw["candidates"][int(np.argmax(sw["dev_mrr"]))]
    assert fit.whiteners.damping[t] == sw["chosen"]
    # The chosen whitener reproduces the recorded dev score.
    assert _chosen_dev_mrr(fit, t, qs, pool, rel) == pytest.approx(max(sw["dev_mrr"]))
    assert sw["chosen_at_grid_edge"] == protocol.grid_edge(
        sw["candidates"], sw["dev_mrr"], sw["candidates"].index(sw["chosen"]))
  assert fit.sweep["exp2"]["candidates"] == [] and "exp2" not in fit.whiteners.damping
  assert fit.sweep["exp2"]["chosen_at_grid_edge"] is None
  flagged = {t: sw["chosen_at_grid_edge"] for t, sw in fit.sweep.items()
             if sw["chosen_at_grid_edge"]}
  assert flagged  # This setup's sweeps end at the grid's ends; each is warned about.
  for t, edge in flagged.items():
    assert f"damping of {t}: the grid's {edge} candidate" in caplog.text
  lam, info = hessian.lambda_top_k(r_train=fit.r_train["corrected"],
                                   r_eval=fit.r_eval["corrected"], top_k=2)
  assert fit.whiteners.lam == pytest.approx(lam) and fit.whiteners.lambda_info["top_k"] == 2


def test_grid_edge_flags_only_a_strict_best_at_an_end_of_the_grid():
  grid = [1.0, 0.01, 100.0, 0.1]  # Unsorted on purpose.
  assert protocol.grid_edge(grid, [0.5, 0.4, 0.7, 0.45], chosen=2) == "largest"
  assert protocol.grid_edge(grid, [0.5, 0.7, 0.4, 0.45], chosen=1) == "smallest"
  assert protocol.grid_edge(grid, [0.7, 0.4, 0.5, 0.45], chosen=0) is None  # Inside.
  # Tied with its neighbour: a flat end says nothing about what lies beyond.
  assert protocol.grid_edge(grid, [0.5, 0.6, 0.4, 0.6], chosen=1) is None
  assert protocol.grid_edge(grid, [0.6, 0.4, 0.6, 0.45], chosen=2) is None
  assert protocol.grid_edge([1.0], [0.3], chosen=0) is None
  with pytest.raises(ValueError, match="2 candidates but 3 scores"):
    protocol.grid_edge([1.0, 2.0], [0.1, 0.2, 0.3], chosen=0)
  with pytest.raises(ValueError, match="chosen=5 is not an index"):
    protocol.grid_edge([1.0, 2.0], [0.1, 0.2], chosen=5)


def test_dev_sweep_extends_the_grid_past_an_end_that_holds_the_best_dev_mrr(caplog):
  """A best candidate at an end of the grid (strictly above its neighbour) grows the
  grid past that end by its end ratio, until the best is inside or tied at the end,
  or `hessian.damping_extend_steps` candidates were added; the rest is as before."""
  qs, pool, rel, dev = _dev_setup(seed=0)
  methods = ["trak", "exp5", "trackstar"]
  for grid, steps in (((1e-3, 1e-2), 3), ((10.0, 100.0), 3), ((10.0, 100.0), 1),
                      ((1e-3, 1.0, 1e3), 0)):
    c = helpers.tiny_config(**{"hessian.damping_candidates": grid,
                               "hessian.lambda_top_k_fraction": 0.25,
                               "hessian.damping_extend_steps": steps})
    with caplog.at_level(logging.WARNING):
      caplog.clear()
      fit = featurize.fit_whiteners(c, methods=methods, queries=qs, train=pool, dev=dev)
    for t in methods:
      sw = fit.sweep[t]
      cands = sw["candidates"]
      assert cands == sorted(cands) and 0 <= sw["extended_by"] <= steps
      assert len(cands) == len(grid) + sw["extended_by"] == len(sw["dev_mrr"])
      lo = cands.index(grid[0])
      assert cands[lo:lo + len(grid)] == list(grid)  # The base grid, in place.
      ratio = grid[1] / grid[0]
      np.testing.assert_allclose(np.diff(np.log(cands)), np.log(ratio), rtol=1e-9)
      i = cands.index(sw["chosen"])
      assert sw["dev_mrr"][i] == max(sw["dev_mrr"]) == sw["dev_mrr_chosen"]
      assert fit.whiteners.damping[t] == sw["chosen"]
      assert sw["chosen_at_grid_edge"] == protocol.grid_edge(cands, sw["dev_mrr"], i)
      if sw["extended_by"] < steps:  # Stopped early: the best is inside or tied.
        assert sw["chosen_at_grid_edge"] is None
      if sw["chosen_at_grid_edge"]:
        assert f"damping of {t}: the grid's {sw['chosen_at_grid_edge']}" in caplog.text
      # Each added candidate was asked for by the grid as it stood: its best sat at
      # the end the candidate was added past (additions all go past one end, since
      # a candidate added past the best cannot move the best to the other end).
      scores = sw["dev_mrr"]
      side = "smallest" if lo > 0 else "largest"
      for k in range(sw["extended_by"]):
        keep = slice(lo - k, None) if side == "smallest" else slice(0, len(grid) + k)
        sub_c, sub_s = cands[keep], scores[keep]
        assert protocol.grid_edge(sub_c, sub_s, int(np.argmax(sub_s))) == side
      assert _chosen_dev_mrr(fit, t, qs, pool, rel) == pytest.approx(sw["dev_mrr_chosen"])
  # This setup: TRAK's dev MRR still rises at the grid's top after three additions
  # (flagged); below a (10, 100) grid TrackStar's dev MRR rises twice, then the third
  # addition ties (0.958 at 0.01 and 0.1): a tie keeps the earlier candidate.
  c = helpers.tiny_config(**{"hessian.damping_candidates": (1e-3, 1e-2),
                             "hessian.lambda_top_k_fraction": 0.25})
  sw = featurize.fit_whiteners(c, methods=["trak"], queries=qs, train=pool,
                               dev=dev).sweep["trak"]
  assert sw["candidates"] == [1e-3, 1e-2, 1e-1, 1.0, 10.0]
  assert sw["extended_by"] == 3 and sw["chosen_at_grid_edge"] == "largest"
  c = helpers.tiny_config(**{"hessian.damping_candidates": (10.0, 100.0),
                             "hessian.lambda_top_k_fraction": 0.25})
  sw = featurize.fit_whiteners(c, methods=["trackstar"], queries=qs, train=pool,
                               dev=dev).sweep["trackstar"]
  assert sw["candidates"] == [1e-2, 1e-1, 1.0, 10.0, 100.0]  # Exact: no product drift.
  assert sw["dev_mrr"][0] == sw["dev_mrr"][1] > sw["dev_mrr"][2] > max(sw["dev_mrr"][3:])
  assert sw["chosen"] == 1e-1 and sw["chosen_at_grid_edge"] is None


def test_dev_sweep_extension_stops_where_it_has_no_step_and_refuses_negative_steps():
  qs, pool, rel, dev = _dev_setup(seed=0)
  # TrackStar's best is the smallest candidate here: a single candidate or a zero at
  # that end gives no ratio to step by, so the grid stays as given (and is flagged).
  for grid in ((1.0,), (0.0, 1.0)):
    c = helpers.tiny_config(**{"hessian.damping_candidates": grid,
                               "hessian.lambda_top_k_fraction": 0.25})
    sw = featurize.fit_whiteners(c, methods=["trackstar"], queries=qs, train=pool,
                                 dev=dev).sweep["trackstar"]
    assert sw["candidates"] == sorted(grid) and sw["extended_by"] == 0
  assert sw["chosen"] == 0.0 and sw["chosen_at_grid_edge"] == "smallest"
  # The base grid's ties go to the first candidate in the order given.
  c = helpers.tiny_config(**{"hessian.damping_candidates": (1e-2, 1e-3),
                             "hessian.lambda_top_k_fraction": 0.25,
                             "hessian.damping_extend_steps": 0})
  sw = featurize.fit_whiteners(c, methods=["trackstar"], queries=qs, train=pool,
                               dev=dev).sweep["trackstar"]
  assert sw["dev_mrr"][0] == sw["dev_mrr"][1] and sw["chosen"] == 1e-2
  c = helpers.tiny_config(**{"hessian.damping_extend_steps": -1})
  with pytest.raises(ValueError, match="damping_extend_steps"):
    featurize.fit_whiteners(c, methods=["trackstar"], queries=qs, train=pool, dev=dev)


def test_the_sweep_pool_is_drawn_apart_from_r_trains_sample():
  """The dev sweep's pool is a uniform sample of its own, so it holds about the
  corpus's share (train_samples / n) of passages inside R's sample, as the test
  ranking over the whole corpus does; the whole corpus when it is small."""
  c = helpers.tiny_config(**{"hessian.train_samples": 1000, "hessian.sweep_pool": 2000})
  n = 10_000
  r, pool = featurize.hessian_sample(c, n), featurize.sweep_pool_sample(c, n)
  assert len(r) == 1000 and len(pool) == 2000 and len(np.unique(pool)) == 2000
  assert np.all(np.diff(pool) > 0)
  assert np.isin(pool, r).mean() == pytest.approx(1000 / n, abs=0.03)  # Not R's sample.
  np.testing.assert_array_equal(pool, featurize.sweep_pool_sample(c, n))  # Seeded.
  np.testing.assert_array_equal(featurize.sweep_pool_sample(c, 1500), np.arange(1500))

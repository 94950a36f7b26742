"""Tests for tda.metrics on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from tda import metrics

NAN = np.nan


def _ranked(rank, n=12, q=0):
  """n ids with the relevant one ('gt{q}') at 1-based `rank` (0: absent)."""
  ids = [f"other{q}_{j}" for j in range(n)]
  if rank:
    ids[rank - 1] = f"gt{q}"
  return ids


def test_first_correct_rank_is_one_based_and_zero_when_absent():
  assert metrics.first_correct_rank(proponent_ids=["a", "b", "c"], relevant={"c", "b"}) == 2
  assert metrics.first_correct_rank(proponent_ids=["a", "b"], relevant={"z"}) == 0
  assert metrics.first_correct_rank(proponent_ids=[], relevant={"z"}) == 0
  assert metrics.first_correct_rank(proponent_ids=["a"], relevant={"a"}) == 1


def test_attribution_scores_hits_at_ranks_1_and_3_and_a_miss():
  top = [_ranked(1, q=0), _ranked(3, q=1), _ranked(0, q=2)]
  rel = [{"gt0"}, {"gt1"}, {"gt2"}]
  out = metrics.attribution(top_ids=top, relevant=rel)
  assert out["mrr"] == pytest.approx((1 + 1 / 3 + 0) / 3)
  assert out["recall_at_10"] == pytest.approx(2 / 3)
  np.testing.assert_allclose(out["rr"], [1.0, 1 / 3, 0.0])
  assert out["hit"].tolist() == [True, True, False]
  assert out["rank"].tolist() == [1, 3, 0]
  # One correct id among the top 10 of 12 listed, for two queries.
  assert out["precision_at_10"] == pytest.approx((0.1 + 0.1 + 0.0) / 3)


def test_attribution_mrr_counts_beyond_k_but_recall_does_not():
  top = [_ranked(11, q=0), _ranked(2, q=1)]
  out = metrics.attribution(top_ids=top, relevant=[{"gt0"}, {"gt1"}], k=10)
  assert out["mrr"] == pytest.approx((1 / 11 + 1 / 2) / 2)
  assert out["recall_at_10"] == pytest.approx(0.5)
  out2 = metrics.attribution(top_ids=top, relevant=[{"gt0"}, {"gt1"}], k=1)
  assert out2["recall_at_10"] == 0.0
  assert out2["mrr"] == pytest.approx(out["mrr"])


def test_attribution_precision_several_correct_and_short_lists():
  top = [["a", "x", "b", "y"], ["c"], []]
  rel = [{"a", "b"}, ["c"], {"q"}]  # A list is accepted too.
  out = metrics.attribution(top_ids=top, relevant=rel, k=2)
  # q0: top-2 = a, x -> 1/2; q1: only c listed -> 1/1; q2: empty -> 0.
  assert out["precision_at_10"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
  assert out["rank"].tolist() == [1, 1, 0]
  assert out["hit"].tolist() == [True, True, False]


@pytest.mark.parametrize("kwargs, match", [
    (dict(top_ids=[], relevant=[]), "no queries"),
    (dict(top_ids=[["a"]], relevant=[{"a"}, {"b"}]), "1 queries but relevant has 2"),
    (dict(top_ids=[["a"]], relevant=[{"a"}], k=0), "k must be"),
    (dict(top_ids=[["a"]], relevant=["a"]), "must be a set"),
    (dict(top_ids=[["a"]], relevant=[{"a": 1}]), "must be a set"),
    (dict(top_ids=[["1"]], relevant=[{1}]), "ids must be str"),
    (dict(top_ids=[[1]], relevant=[{"1"}]), "ids must be str"),
])
def test_attribution_rejects_malformed_input(kwargs, match):
  with pytest.raises(ValueError, match=match):
    metrics.attribution(**kwargs)


def test_tailpatch_summary_ignores_unpatched_rows_and_missing_proponents():
  abs_qk = np.array([
      [0.02, 0.00, 0.01, 0.03],
      [NAN, NAN, NAN, NAN],      # Not tail-patched: ignored.
      [-0.01, 0.01, 0.03, NAN],  # Fourth proponent missing: skipped in its mean.
  ])
  rel_qk = abs_qk * 10
  out = metrics.tailpatch_summary(abs_qk=abs_qk, rel_qk=rel_qk, ks=(1, 3, 5, 10))
  assert sorted(out["at_k"]) == [1, 3]  # 5 and 10 exceed the 4 columns.
  assert out["at_k"][1]["abs"] == pytest.approx((0.02 - 0.01) / 2)
  assert out["at_k"][3]["abs"] == pytest.approx((0.01 + 0.01) / 2)
  assert out["at_k"][3]["rel"] == pytest.approx(0.1)
  assert out["tailpatch_abs"] == out["at_k"][3]["abs"]
  assert out["tailpatch_rel"] == out["at_k"][3]["rel"]
  assert out["k"] == 3 and out["n_evaluated"] == 2
  np.testing.assert_allclose(out["abs_q"], [0.01, NAN, 0.01])

  out4 = metrics.tailpatch_summary(abs_qk=abs_qk, rel_qk=rel_qk, ks=(4,))
  assert out4["tailpatch_abs"] == pytest.approx(((0.06 / 4) + (0.03 / 3)) / 2)


def test_tailpatch_summary_nothing_evaluated_gives_nan():
  x = np.full((3, 2), NAN)
  out = metrics.tailpatch_summary(abs_qk=x, rel_qk=x, ks=(1, 2))
  assert np.isnan(out["tailpatch_abs"]) and out["n_evaluated"] == 0


@pytest.mark.parametrize("abs_qk, rel_qk, ks, match", [
    (np.zeros((2, 3)), np.zeros((2, 4)), (1,), "rel_qk has"),
    (np.zeros(3), np.zeros(3), (1,), r"\[queries, proponents\]"),
    (np.zeros((0, 3)), np.zeros((0, 3)), (1,), "empty"),
    (np.zeros((2, 3)), np.zeros((2, 3)), (0, 1), "integer >= 1"),
    (np.zeros((2, 3)), np.zeros((2, 3)), (5, 10), "no k in ks"),
    (np.zeros((2, 3)), np.array([[0, np.inf, 0], [0, 0, 0]]), (1,), r"rel_qk\[0, 1\] is infinite"),
])
def test_tailpatch_summary_rejects_malformed_input(abs_qk, rel_qk, ks, match):
  with pytest.raises(ValueError, match=match):
    metrics.tailpatch_summary(abs_qk=abs_qk, rel_qk=rel_qk, ks=ks)


def test_by_group_means_each_bucket_ignoring_nan_and_keeps_empty_buckets():
  out = metrics.by_group(
      values={"mrr": np.array([1.0, 0.5, 0.0, 0.25]),
              "tp": np.array([0.1, NAN, 0.3, NAN])},
      groups=["1", "2-3", "1", "2-3"], order=["1", "2-3", "4-10"])
  assert list(out) == ["1", "2-3", "4-10"]
  assert out["1"]["n"] == 2 and out["1"]["mean"]["mrr"] == pytest.approx(0.5)
  assert out["1"]["mean"]["tp"] == pytest.approx(0.2) and out["1"]["count"]["tp"] == 2
  assert out["2-3"]["mean"]["mrr"] == pytest.approx(0.375)
  assert np.isnan(out["2-3"]["mean"]["tp"]) and out["2-3"]["count"]["tp"] == 0
  assert out["4-10"]["n"] == 0 and np.isnan(out["4-10"]["mean"]["mrr"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(values={"a": np.zeros(2)}, groups=["1", "9"], order=["1"]), r"unknown group\(s\) \['9'\]"),
    (dict(values={"a": np.zeros(3)}, groups=["1", "1"], order=["1"]), "values\\['a'\\] has shape"),
    (dict(values={"a": np.zeros(0)}, groups=[], order=["1"]), "no queries"),
    (dict(values={}, groups=["1"], order=["1"]), "no values"),
    (dict(values={"a": np.zeros(1)}, groups=["1"], order=["1", "1"]), "duplicate"),
])
def test_by_group_rejects_malformed_input(kwargs, match):
  with pytest.raises(ValueError, match=match):
    metrics.by_group(**kwargs)

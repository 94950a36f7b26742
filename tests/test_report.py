"""Tests for tda.report (and the claims, tables, figures and viewer rows it writes)
on a tiny hand-built input with known ranks."""

from __future__ import annotations

import copy
import csv
import json
import os

import numpy as np
import pytest

from tda import claims
from tda import figures
from tda import report
from tda import viewer

NAN = np.nan
BUCKETS = ["1", "2-3", "4-10"]
K = 12
# Per query: bucket, frequency. Query q's ground-truth passages are gt{q}_0..
FACTS_SPEC = [("1", 1), ("1", 1), ("2-3", 2), ("2-3", 3), ("4-10", 4), ("4-10", 5)]
# Per method: family and the 1-based rank of the first correct proponent per
# query (0: none). Chosen so every paper ordering holds.
RANKS = {
    "bm25": ("baseline", [1, 1, 1, 2, 1, 1]),
    "dense": ("baseline", [1, 1, 2, 2, 1, 1]),
    "trak": ("gradient", [0, 0, 0, 0, 0, 0]),
    "exp1": ("gradient", [0, 0, 0, 0, 5, 0]),
    "exp2": ("gradient", [2, 0, 0, 0, 0, 0]),
    "exp3": ("gradient", [1, 0, 0, 0, 0, 0]),
    "exp4": ("gradient", [1, 1, 0, 0, 0, 0]),
    "trackstar": ("gradient", [1, 1, 2, 0, 0, 0]),
}
TP_COLS = 3


def _facts():
  out = []
  for q, (bucket, freq) in enumerate(FACTS_SPEC):
    out.append({
        "fact_id": f"fact{q}", "example_id": f"trex_synth:{q:015d}",
        "relation": "place_of_birth", "subject": f"Person {q}", "object": f"City{q}",
        "inputs_plaintext": f"Person {q} was born in the city of",
        "targets_plaintext": f"City{q}", "frequency": freq, "bucket": bucket,
        "passage_ids": [f"gt{q}_{j}" for j in range(freq)],
    })
  return out


def _passages():
  p = {f"gt{q}_{j}": f"Person {q} was born in City{q} ({j})."
       for q, (_, freq) in enumerate(FACTS_SPEC) for j in range(freq)}
  p.update({f"fill{i}": f"Filler passage {i} <b>&</b>." for i in range(40)})
  return p


def _method(name, family, ranks, tp_scale=None):
  top_ids, top_scores = [], []
  for q, r in enumerate(ranks):
    ids = [f"fill{(q * 5 + j) % 40}" for j in range(K)]
    if r:
      ids[r - 1] = f"gt{q}_0"
    top_ids.append(ids)
    top_scores.append(np.linspace(0.9, 0.3, K))
  bottom_ids = [[f"fill{(q + j) % 40}" for j in range(3)] for q in range(len(ranks))]
  tp_abs = tp_rel = None
  if tp_scale is not None:
    tp_abs = np.full((len(ranks), TP_COLS), NAN)
    tp_abs[:4] = tp_scale * np.array([[3.0, 2.0, 1.0]] * 4)  # Queries 4, 5: not patched.
    tp_rel = tp_abs * 5
  return report.MethodResult(
      name=name, family=family, query_ids=[f["example_id"] for f in _facts()],
      top_ids=top_ids, top_scores=np.asarray(top_scores, np.float32),
      bottom_ids=bottom_ids, bottom_scores=-np.ones((len(ranks), 3), np.float32),
      tailpatch_abs=tp_abs, tailpatch_rel=tp_rel)


TP_SCALE = {"trackstar": 0.003, "bm25": 0.001, "exp1": 0.0005, "trak": -0.0001}


def _methods(ranks=RANKS):
  return {m: _method(m, fam, r, TP_SCALE.get(m)) for m, (fam, r) in ranks.items()}


def _predictions():
  return {f"trex_synth:{q:015d}": {"correct": q % 2 == 0, "prediction": f"City{q}",
                                   "model_confidence": 0.5, "target_prob": 0.4,
                                   "temperature_samples": [f"City{q}", "Elsewhere"]}
          for q in range(5)}  # Query 5 has no prediction: nulls.


def _write(tmp_path, methods=None, **over):
  kwargs = dict(results_dir=str(tmp_path / "results"), methods=methods or _methods(),
                facts=_facts(), passages=_passages(), predictions=_predictions(),
                bucket_order=BUCKETS, timings_s={"train": 12.5}, model_eval={"query_accuracy": 0.5},
                extra={"tailpatch": {"k": TP_COLS}})
  kwargs.update(over)
  return report.write_report(**kwargs)


def _mrr(ranks):
  return float(np.mean([1 / r if r else 0.0 for r in ranks]))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("report")
  return tmp, _write(tmp)


def test_metrics_json_holds_hand_computed_metrics_per_method_and_bucket(written):
  tmp, out = written
  on_disk = json.loads((tmp / "results" / "metrics.json").read_text())
  assert on_disk == json.loads(json.dumps(out))
  assert on_disk["num_queries"] == 6 and on_disk["timings_s"] == {"train": 12.5}
  assert on_disk["model_eval"] == {"query_accuracy": 0.5}
  assert on_disk["tailpatch"] == {"k": TP_COLS}
  assert set(on_disk["methods"]) == set(RANKS)
  for m, (fam, ranks) in RANKS.items():
    e = on_disk["methods"][m]
    assert e["family"] == fam
    assert e["mrr"] == pytest.approx(_mrr(ranks))
    assert e["recall_at_10"] == pytest.approx(np.mean([0 < r <= 10 for r in ranks]))
    assert e["precision_at_10"] == pytest.approx(np.mean([0.1 if 0 < r <= 10 else 0 for r in ranks]))
    assert set(e["by_bucket"]) == set(BUCKETS)
    for b in BUCKETS:
      assert set(e["by_bucket"][b]) >= {"mrr", "recall_at_10", "tailpatch_abs",
                                        "tailpatch_rel", "n"}
      assert e["by_bucket"][b]["n"] == 2
  ts = on_disk["methods"]["trackstar"]
  assert ts["tailpatch_at_k"]["1"]["abs"] == pytest.approx(0.009)
  assert ts["tailpatch_abs"] == pytest.approx(0.006)  # Mean of 3, 2, 1 (x0.003).
  assert ts["tailpatch_rel"] == pytest.approx(0.03)
  assert set(ts["tailpatch_at_k"]) == {"1", "3"} and ts["n_tailpatched"] == 4
  # Bucket '2-3' holds queries 2 and 3: trackstar ranks 2 and none.
  assert ts["by_bucket"]["2-3"]["mrr"] == pytest.approx(0.25)
  assert ts["by_bucket"]["2-3"]["recall_at_10"] == pytest.approx(0.5)
  assert ts["by_bucket"]["4-10"]["tailpatch_abs"] is None  # Not tail-patched.
  assert ts["by_bucket"]["4-10"]["n_tailpatched"] == 0
  dense = on_disk["methods"]["dense"]
  assert dense["tailpatch_abs"] is None and dense["tailpatch_at_k"] == {}


def test_report_checks_every_applicable_paper_ordering_and_all_hold(written):
  _, out = written
  po = out["paper_orderings"]
  assert set(po) == {
      "baselines_beat_gradient_mrr", "trackstar_best_gradient_mrr",
      "trackstar_best_gradient_recall", "trackstar_tailpatch_gt_bm25",
      "mrr_exp1_lt_exp2", "mrr_exp2_lt_exp3", "mrr_exp3_lt_exp4", "mrr_exp4_lt_trackstar",
      "trak_near_zero", "trackstar_best_tailpatch"}  # No dense tail-patch, no exp5.
  # Six queries: every point estimate is on the claimed side, but the paired CIs
  # are wide, so no claim "differs" and the strict ones need not "hold".
  assert all(c["verdict"] in ("holds", "inconclusive") for c in po.values()), po
  assert all(c["holds"] == (c["verdict"] == "holds") for c in po.values())
  ts_tp = po["trackstar_best_tailpatch"]["values"]["diff_ci"]["trackstar-trak"]
  assert ts_tp["diff"] == pytest.approx(0.0062) and ts_tp["lo"] > 0  # Constant shift.
  assert po["trackstar_best_tailpatch"]["verdict"] == "holds"
  base = po["baselines_beat_gradient_mrr"]["values"]
  assert base["min_baseline"] == {"dense": pytest.approx(_mrr(RANKS["dense"][1]))}
  assert base["max_gradient"] == {"trackstar": pytest.approx(_mrr(RANKS["trackstar"][1]))}
  v = dict(po["trackstar_tailpatch_gt_bm25"]["values"])
  ci = v.pop("diff_ci")
  assert v == {"trackstar": pytest.approx(0.006), "bm25": pytest.approx(0.002)}
  assert ci["diff"] == pytest.approx(0.004) and ci["n"] == 4  # The tail-patched queries.


def test_breaking_one_ladder_step_fails_exactly_that_ordering(written, tmp_path):
  before = written[1]["paper_orderings"]
  ranks = copy.deepcopy(RANKS)
  # Exp. 3 finds its only correct proponent at rank 12: MRR 1/72 < Exp. 2's 1/12
  # (and recall 0), which breaks exactly the exp2 < exp3 step.
  ranks["exp3"] = ("gradient", [0, 0, 0, 0, 0, 12])
  po = _write(tmp_path, methods=_methods(ranks))["paper_orderings"]
  def reversed_(claims_):
    return sorted(k for k, c in claims_.items() if k.startswith("mrr_")
                  and c["values"]["diff_ci"]["diff"] < 0)
  assert reversed_(before) == [] and reversed_(po) == ["mrr_exp2_lt_exp3"]
  # Six queries cannot show the reversal is real: not "holds", not "differs".
  assert po["mrr_exp2_lt_exp3"]["verdict"] == "inconclusive"
  v = po["mrr_exp2_lt_exp3"]["values"]
  assert (v["exp2"], v["exp3"]) == (pytest.approx(1 / 12), pytest.approx(1 / 72))
  assert v["diff_ci"]["diff"] == pytest.approx(1 / 72 - 1 / 12)


def test_paper_orderings_allow_exp5_tie_and_flag_failed_claims():
  m = lambda fam, mrr, rec=0.0, tp=None: {"family": fam, "mrr": mrr, "recall_at_10": rec,
                                          "tailpatch_abs": tp}
  po = claims.paper_orderings(methods={
      "bm25": m("baseline", 0.5, 0.6, 0.004), "dense": m("baseline", 0.3, 0.7, 0.02),
      "exp5": m("gradient", 0.4, 0.5), "trackstar": m("gradient", 0.4, 0.4, 0.01),
      "trak": m("gradient", 0.2)})
  assert po["mrr_exp5_le_trackstar"]["holds"]            # A tie is allowed here.
  assert not po["baselines_beat_gradient_mrr"]["holds"]  # dense 0.3 < 0.4.
  assert po["trackstar_best_gradient_mrr"]["holds"]
  assert not po["trackstar_best_gradient_recall"]["holds"]  # exp5 0.5 > 0.4.
  assert po["trackstar_tailpatch_gt_bm25"]["holds"]
  assert not po["trackstar_tailpatch_gt_dense"]["holds"]
  assert not po["trak_near_zero"]["holds"]  # 0.2 >= 0.05 and no exp1.


def test_tables_list_methods_in_paper_order_with_paper_numbers(written):
  tmp, out = written
  res = tmp / "results"
  with open(res / "table.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert [r["method"] for r in rows] == ["bm25", "dense", "trak", "exp1", "exp2", "exp3",
                                         "exp4", "trackstar"]
  ts = rows[-1]
  assert float(ts["mrr"]) == pytest.approx(out["methods"]["trackstar"]["mrr"])
  assert float(ts["tailpatch_abs_pct"]) == pytest.approx(0.6)
  assert float(ts["paper_mrr"]) == 0.365 and float(ts["paper_tailpatch_pct"]) == 0.90
  assert rows[1]["tailpatch_abs_pct"] == ""  # Dense: not tail-patched.
  md = (res / "table.md").read_text()
  lines = [l for l in md.splitlines() if l.startswith("| ") and not l.startswith("| Method")]
  assert [l.split(" | ")[0][2:] for l in lines] == [
      "BM25", "Dense (Gecko stand-in)", "TRAK", "Exp. 1 (Pruthi et al., 2020)",
      "Exp. 2 (Han & Tsvetkov, 2022)", "Exp. 3 (Choe et al., 2024)",
      "Exp. 4 (Akyürek et al., 2022; Xia et al., 2024)", "TrackStar"]
  assert "| +0.60% |" in lines[-1] and "| +0.90% |" in lines[-1]
  assert lines[2].endswith("| -0.02% |")  # Paper TRAK tail-patch.
  with open(res / "table_by_bucket.csv", newline="") as f:
    brows = list(csv.DictReader(f))
  assert len(brows) == len(RANKS) * len(BUCKETS)
  r = next(r for r in brows if r["method"] == "trackstar" and r["bucket"] == "2-3")
  assert float(r["mrr"]) == pytest.approx(0.25) and r["n"] == "2"
  assert "## MRR" in (res / "table_by_bucket.md").read_text()


def _bar_heights(ax):
  return [p.get_height() for p in ax.patches]


def _tick_labels(ax):
  return [t.get_text() for t in ax.get_xticklabels()]


def test_table_figure_draws_one_bar_per_method_and_metric(written, tmp_path):
  _, out = written
  path = tmp_path / "fig_table.png"
  fig = figures.plot_table(methods=out["methods"], path=str(path))
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  order = ["bm25", "dense", "trak", "exp1", "exp2", "exp3", "exp4", "trackstar"]
  attribution, influence = fig.axes
  assert attribution.get_title() == "Attribution"
  assert _tick_labels(attribution) == order == _tick_labels(influence)
  assert [t.get_text() for t in attribution.get_legend().get_texts()] == ["MRR", "Recall@10"]
  heights = _bar_heights(attribution)
  assert len(heights) == 2 * len(order)  # MRR bars, then recall@10 bars.
  assert heights[:len(order)] == pytest.approx([_mrr(RANKS[m][1]) for m in order])
  assert heights[len(order):] == pytest.approx(
      [np.mean([0 < r <= 10 for r in RANKS[m][1]]) for m in order])
  # Tail-patch in percentage points; methods without it get NaN bars and "n/a".
  tp = _bar_heights(influence)
  assert tp[order.index("trackstar")] == pytest.approx(0.6)
  assert tp[order.index("trak")] == pytest.approx(-0.02)
  untested = [m for m in order if m not in TP_SCALE]
  assert all(np.isnan(tp[order.index(m)]) for m in untested)
  assert [t.get_text() for t in influence.texts] == ["n/a"] * len(untested)


def test_bucket_figure_draws_one_line_per_method_over_buckets(written, tmp_path):
  _, out = written
  fig = figures.plot_by_bucket(methods=out["methods"], bucket_order=BUCKETS,
                               path=str(tmp_path / "fig_by_bucket.png"))
  mrr_ax, recall_ax = fig.axes
  assert (mrr_ax.get_ylabel(), recall_ax.get_ylabel()) == ("MRR", "Recall@10")
  assert _tick_labels(mrr_ax) == ["1\n(n=2)", "2-3\n(n=2)", "4-10\n(n=2)"]
  for ax, key in ((mrr_ax, "mrr"), (recall_ax, "recall_at_10")):
    lines = {l.get_label(): l for l in ax.get_lines()}
    assert set(lines) == set(RANKS)
    assert lines["bm25"].get_linestyle() == "--" and lines["trackstar"].get_linestyle() == "-"
    # Trackstar: buckets {q0, q1}, {q2, q3}, {q4, q5} with ranks 1, 1 | 2, none | none.
    want = {"mrr": [1.0, 0.25, 0.0], "recall_at_10": [1.0, 0.5, 0.0]}[key]
    assert list(lines["trackstar"].get_ydata()) == pytest.approx(want)


def test_report_writes_both_figures(written):
  tmp, _ = written
  for name in ("fig_table.png", "fig_by_bucket.png"):
    assert (tmp / "results" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_proponent_jsonl_is_read_by_viewer_with_ranks_intact(written):
  tmp, _ = written
  results = viewer.load_results(workdir=str(tmp))
  assert set(results) == set(RANKS)
  row = results["trackstar"][2]
  assert row["example_id"] == "trex_synth:000000000000002"
  assert row["proponent_correct"][:2] == [False, True]
  assert row["proponents"][1] == "Person 2 was born in City2 (0)."
  assert row["groundtruth"] == "Person 2 | place_of_birth | City2"
  assert row["c4_frequency"] == 2 and row["c4_frequency_bucket"] == "2-3"
  assert row["has_trex_sentence"] is True and row["model_correct"] is True
  assert row["proponent_tailpatch_abs"] == pytest.approx([0.009, 0.006, 0.003])
  assert results["trackstar"][5]["proponent_tailpatch_abs"] is None
  assert results["trackstar"][5]["model_prediction"] is None
  assert results["dense"][0]["proponent_tailpatch_abs"] is None
  assert len(row["opponents"]) == 3 and row["opponent_scores"] == [-1.0] * 3
  payload = viewer.build_payload(results=results)
  assert payload["default_a"] == "trackstar" and payload["default_b"] == "bm25"
  for m, (_, ranks) in RANKS.items():
    assert [e["first"] for e in payload["results"][m]] == ranks


def test_rewrite_removes_jsonl_of_methods_no_longer_reported(tmp_path):
  _write(tmp_path)
  few = {m: r for m, r in _methods().items() if m in ("bm25", "trackstar")}
  _write(tmp_path, methods=few)
  assert sorted(os.listdir(tmp_path / "results" / "proponents")) == ["bm25.jsonl",
                                                                     "trackstar.jsonl"]


def test_invalid_inputs_raise_before_anything_is_written(tmp_path):
  ms = _methods()
  ms["exp1"].query_ids = list(reversed(ms["exp1"].query_ids))
  with pytest.raises(ValueError, match="method 'exp1' is on different queries"):
    _write(tmp_path, methods=ms)
  passages = _passages()
  del passages["gt3_2"]
  with pytest.raises(ValueError, match="ground-truth passage 'gt3_2' is missing"):
    _write(tmp_path, passages=passages)
  facts = _facts()
  facts[4]["bucket"] = "11-30"
  with pytest.raises(ValueError, match="unknown bucket '11-30'"):
    _write(tmp_path, facts=facts)
  ms = _methods()
  ms["bm25"].top_ids[0][3] = "nope"
  with pytest.raises(ValueError, match="passage 'nope', which is not in `passages`"):
    _write(tmp_path, methods=ms)
  ms = _methods()
  ms["trackstar"].tailpatch_abs = ms["trackstar"].tailpatch_abs[:5]
  with pytest.raises(ValueError, match="tailpatch_abs has shape"):
    _write(tmp_path, methods=ms)
  with pytest.raises(ValueError, match="extra keys \\['methods'\\]"):
    _write(tmp_path, extra={"methods": 1})
  ms = _methods()
  ms["trak"].family = "other"
  with pytest.raises(ValueError, match="family must be one of"):
    _write(tmp_path, methods=ms)
  assert not (tmp_path / "results").exists()  # Validation happens before writing.


def test_paper_comparison_sets_our_cis_beside_the_paper_and_explains_each_unheld_claim(written):
  from tda import paper_comparison
  _, out = written
  md = paper_comparison.render(out)
  ts = out["methods"]["trackstar"]
  lo, hi = ts["mrr_ci"]
  assert f"| TrackStar | {ts['mrr']:.3f} [{lo:.3f}, {hi:.3f}] | 0.365 |" in md
  for c in out["paper_orderings"].values():
    assert f"| {c['claim']} | **{c['verdict']}** |" in md
  unheld = [c for c in out["paper_orderings"].values() if c["verdict"] != "holds"]
  assert unheld  # Six queries leave some strict claims inconclusive...
  for c in unheld:  # ...and each gets its measured per-bucket breakdown.
    section = md.split(f"### {c['claim']} — {c['verdict']}")[1].split("###")[0]
    assert "By frequency bucket" in section


def _unheld_section(out, key, claim, values):
  """paper_comparison.md's evidence section for `claim`, added to `out` as differing."""
  from tda import paper_comparison
  out = {**out, "paper_orderings": {**out["paper_orderings"], key: {
      "claim": claim, "verdict": "differs", "values": values}}}
  return paper_comparison.render(out).split(f"### {claim} — differs")[1]


def test_outlier_norms_are_measured_and_explain_the_trak_claim(written):
  from tda import metrics as metrics_lib
  ids = [f"p{i}" for i in range(20)]
  kind_of = {i: ("outlier" if int(i[1:]) >= 18 else "fact") for i in ids}
  norms = np.arange(20, dtype=float)  # The two outliers have the two highest norms.
  d = metrics_lib.norms_by_kind(ids=ids, norms_n=norms, kind_of=kind_of,
                                top_ids=[["p19", "p1"], ["p2", "p3"]], top_fraction=0.1)
  assert d["median_norm_by_kind"] == {"fact": 8.5, "outlier": 18.5}
  assert (d["share_of_corpus"], d["share_of_highest_norms"], d["share_of_retrieved"]) == (
      0.1, 1.0, 0.25)
  with pytest.raises(ValueError, match="20 ids but 3 norms"):
    metrics_lib.norms_by_kind(ids=ids, norms_n=norms[:3], kind_of=kind_of, top_ids=[])
  _, out = written
  out = {**out, "diagnostics": {"outlier_norms": {
      "train_epochs": 9.0, "tables": {"trak": {"methods": ["trak"], **d}}}}}
  section = _unheld_section(out, "trak_collapses", "TRAK's MRR < 0.05 or below Exp. 1's",
                            {"trak": 0.3, "exp1": 0.2})
  assert ("median 18.5 for outlier passages vs 8.5 for fact passages; outliers are 10.0% "
          "of the corpus, 100.0% of the top 10% of norms and 25.0% of trak's retrieved "
          "top-k.") in section
  assert ("trained for 9.0 epochs over the corpus. TRAK's collapse in the paper is "
          "attributed to outlier passages with high-norm gradients; here (trak) the "
          "outliers' median norm is 2.18× the fact passages' and they are 10.0× "
          "over-represented among the highest norms.") in section


def test_paper_comparison_says_when_a_damping_was_chosen_at_the_grids_edge(written):
  _, out = written
  sweep = {"trackstar": {"methods": ["trackstar"], "candidates": [0.1, 1.0, 10.0],
                         "dev_mrr": [0.50, 0.55, 0.60], "chosen": 10.0,
                         "chosen_at_grid_edge": "largest"}}
  out = {**out, "protocol": {**out.get("protocol", {}), "damping": {"sweep": sweep}}}
  claim = ("exp5_le_trackstar", "MRR exp5 <= trackstar", {"exp5": 0.4, "trackstar": 0.3})
  section = _unheld_section(out, *claim)
  assert ("trackstar: damping 10 chosen on dev (dev MRR by candidate: 0.1: 0.5000, "
          "1: 0.5500, 10: 0.6000); still the grid's largest candidate, so the dev optimum "
          "may lie beyond the grid.") in section
  sweep["trackstar"] = {**sweep["trackstar"], "dev_mrr": [0.5, 0.7, 0.6], "chosen": 1.0,
                        "chosen_at_grid_edge": None}
  section = _unheld_section(out, *claim)
  assert ("trackstar: damping 1 chosen on dev (dev MRR by candidate: 0.1: 0.5000, "
          "1: 0.7000, 10: 0.6000).") in section and "grid's" not in section
  sweep["trackstar"] = {**sweep["trackstar"], "candidates": [0.1, 1.0, 10.0, 100.0],
                        "dev_mrr": [0.5, 0.55, 0.6, 0.59], "chosen": 10.0, "extended_by": 1}
  section = _unheld_section(out, *claim)
  assert ("(dev MRR by candidate: 0.1: 0.5000, 1: 0.5500, 10: 0.6000, 100: 0.5900); the "
          "grid grew by 1 candidate past the end that held the best.") in section


def _trak_section(out):
  return _unheld_section(out, "trak_collapses", "TRAK's MRR < 0.05 or below Exp. 1's",
                         {"trak": 0.6, "exp1": 0.4})


def test_the_r_sample_diagnostic_explains_the_trak_claim(written):
  _, out = written
  rs = {"split": "dev", "queries": 12, "trak_damping": 0.1, "r_train_samples": 40, "half": 20,
        "candidates": 40, "top": 10, "top_norm_fraction": 0.05, "unwhitened_mrr": 0.4,
        "by_damping": [
            {"damping": 0.001, "mrr_as_run": 0.6, "mrr_half": 0.3,
             "out_of_sample_share_top": 0.95, "top_in_highest_norms": 0.5,
             "norm_out_over_in": 1.2},
            {"damping": 0.1, "mrr_as_run": 0.62, "mrr_half": 0.45,
             "out_of_sample_share_top": 0.9, "top_in_highest_norms": 0.4,
             "norm_out_over_in": 1.1}]}
  out = {**out, "diagnostics": {"r_sample": rs}}
  section = _trak_section(out)
  assert ("R_train's sample (12 dev queries; a diagnostic, nothing is chosen from it): the "
          "run fitted R on 40 passages, so every one of the 40 candidates lies in R's "
          "sample") in section
  assert ("at damping 0.001, TRAK's dev MRR ranking all 40 passages is 0.600 with the "
          "run's R and 0.300 with R from the half, and the passages outside the half hold "
          "95.0% of its top 10 (50% if the sample did not matter; 50.0% of it from the 5% "
          "highest whitened norms), against 0.400 without R; at TRAK's dev-chosen damping "
          "0.1, TRAK's dev MRR ranking all 40 passages is 0.620 with the run's R and 0.450 "
          "with R from the half, and the passages outside the half hold 90.0% of its top "
          "10.") in section
  # metrics.json writes NaN as null: a missing value reads '—', never a crash.
  rs["by_damping"][0] = {**rs["by_damping"][0], "mrr_half": None,
                         "out_of_sample_share_top": None}
  section = _trak_section(out)
  assert "0.600 with the run's R and — with R from the half" in section
  assert "outside the half hold — of its top 10" in section
  rs["r_train_samples"] = 30
  section = _trak_section(out)
  assert "the run fitted R on 30 passages, a sample of 30 of the 40 candidates;" in section
  # Claims that do not name TRAK do not carry it.
  section = _unheld_section(out, "mrr_exp1_lt_exp2", "MRR exp1 < exp2",
                            {"exp1": 0.4, "exp2": 0.3})
  assert "R_train's sample" not in section


def test_the_tailpatch_fit_names_the_score_tail_patch_follows(written):
  _, out = written
  fit = {"split": "test", "queries": 6, "pairs": 40,
         "mean_spearman": {"exp4": 0.5, "trackstar": 0.45, "exp1": 0.2},
         "mean_spearman_ci": {"exp4": [0.4, 0.6], "trackstar": [0.35, 0.55],
                              "exp1": [0.1, 0.3]},
         "minus_trackstar": {"exp4": {"diff": 0.05, "lo": 0.01, "hi": 0.09, "n": 6},
                             "exp1": {"diff": -0.25, "lo": -0.3, "hi": -0.2, "n": 6}}}
  out = {**out, "diagnostics": {"tailpatch_fit": fit}}
  claim = ("trackstar_best_tailpatch", "TrackStar's tail-patch >= every other method's",
           {"trackstar": 0.1, "exp4": 0.2})
  section = _unheld_section(out, *claim)
  assert ("Which gradient score follows the measured tail-patch (Spearman within each of 6 "
          "test queries over the 40 tail-patched (query, passage) pairs, every method's top "
          "k; mean [95% CI]): exp4 0.500 [0.400, 0.600], trackstar 0.450 [0.350, 0.550], "
          "exp1 0.200 [0.100, 0.300]; the score above TrackStar's, minus TrackStar's "
          "(paired): exp4 +0.050 [+0.010, +0.090].") in section
  # Null values (NaN in metrics.json) are left out or read '—', never a crash.
  fit["mean_spearman"] = {**fit["mean_spearman"], "exp1": None}
  fit["minus_trackstar"]["exp4"] = {"diff": None, "lo": None, "hi": None, "n": 0}
  section = _unheld_section(out, *claim)
  assert ("mean [95% CI]): exp4 0.500 [0.400, 0.600], trackstar 0.450 [0.350, 0.550]; the "
          "score above TrackStar's, minus TrackStar's (paired): exp4 —.") in section
  assert "Which gradient score" not in _unheld_section(out, "mrr_exp1_lt_exp2",
                                                       "MRR exp1 < exp2",
                                                       {"exp1": 0.4, "exp2": 0.3})

"""The model-size trend (tda.trend, stage 'trend') and the figures' error bars."""

import csv
import io
import os

from matplotlib.container import BarContainer
import numpy as np
import pytest

from tda import config as config_lib
from tda import figures
from tda import pipeline
from tda import trend
from tda.stages import gradients as gradients_stage
from tda.stages import second_moments as second_moments_stage
from tda.stages import train as train_stage
from tda.stages import trend as trend_stage
from tda.stages import vocab as vocab_stage
from tda.stages import world as world_stage
from tests import helpers


def test_sizes_parse_and_bad_entries_are_named():
  small, big = trend.parse_sizes(("s:32:1:1:64", "m:64:2:2:128"))
  assert (small.name, small.d_model, small.n_layers, small.n_heads, small.d_ff) == (
      "s", 32, 1, 1, 64)
  assert big.d_ff == 128
  assert trend.parse_sizes(()) == []
  for bad in ("s:32:1:1", "s:32:x:1:64", ":32:1:1:64", "s:0:1:1:64"):
    with pytest.raises(ValueError, match="trend.sizes entry"):
      trend.parse_sizes((bad,))
  with pytest.raises(ValueError, match="repeated names"):
    trend.parse_sizes(("s:32:1:1:64", "s:64:1:1:64"))


def test_size_config_changes_only_the_model_and_checkpointing():
  c = config_lib.finalize(config_lib.base_config())
  s = trend.size_config(c, trend.Size("s", 32, 1, 1, 64))
  assert (s.model.d_model, s.model.n_layers, s.model.n_heads, s.model.d_ff) == (32, 1, 1, 64)
  assert s.train.steps == c.train.steps and s.train.learning_rate == c.train.learning_rate
  assert s.train.batch_size == c.train.batch_size and s.seed == c.seed
  assert s.train.checkpoint_every == c.train.steps and s.train.max_to_keep == 1
  assert c.model.d_model == 128  # The run's config is untouched.


def _point(size, params, mrr, acc):
  return {"size": size, "params": params, "steps": 400, "queries": 220, "final_loss": 1.0,
          "mrr": mrr, "mrr_ci": [mrr - 0.05, mrr + 0.04], "recall_at_10": mrr + 0.1,
          "recall_at_10_ci": [mrr + 0.05, mrr + 0.15], "precision_at_10": 0.1,
          "precision_at_10_ci": [0.05, 0.15], "query_accuracy": acc,
          "query_accuracy_ci": [acc - 0.1, acc + 0.1], "target_logprob": -2.0}


POINTS = [_point("large", 700_000, 0.30, 0.9), _point("small", 80_000, 0.40, 0.2),
          _point("medium", 250_000, 0.35, 0.5)]


def test_trend_figure_plots_what_was_measured_with_ci_error_bars(tmp_path):
  path = tmp_path / "fig_trend.png"
  fig = figures.plot_trend(points=POINTS, path=str(path))
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  attribution, quality = fig.axes
  mrr_line = attribution.get_lines()[0]
  # Ordered by size, not by value: here MRR falls as models grow, and is drawn so.
  assert list(mrr_line.get_xdata()) == [80_000, 250_000, 700_000]
  assert list(mrr_line.get_ydata()) == pytest.approx([0.40, 0.35, 0.30])
  bars = attribution.containers[0]  # The MRR errorbar container.
  (segments,) = [c for c in bars.lines[2]]
  ys = [tuple(seg[:, 1]) for seg in segments.get_segments()]
  assert ys[0] == pytest.approx((0.35, 0.44))
  assert list(quality.get_lines()[0].get_ydata()) == pytest.approx([0.2, 0.5, 0.9])
  title = fig._suptitle.get_text()
  assert "by model size" in title and "400 training steps" in title and "220 queries" in title
  assert "align" not in title.lower()  # States the measurement, not the paper's claim.
  with pytest.raises(ValueError, match=r"points\[0\] lacks \['mrr_ci'"):
    figures.plot_trend(points=[{k: v for k, v in POINTS[0].items() if k != "mrr_ci"}],
                       path=str(tmp_path / "t.png"))
  with pytest.raises(ValueError, match="non-finite"):
    figures.plot_trend(points=[{**POINTS[0], "mrr": float("nan")}], path=str(tmp_path / "t.png"))
  with pytest.raises(ValueError, match="no points"):
    figures.plot_trend(points=[], path=str(tmp_path / "t.png"))


def test_trend_tables_list_each_size_with_its_ci():
  md = trend.table_markdown(POINTS)
  assert "| large | 700,000 | 400 |" in md
  assert "0.300 [0.250, 0.340]" in md  # MRR and its CI.
  rows = list(csv.DictReader(io.StringIO(trend.table_csv(POINTS))))
  assert [r["size"] for r in rows] == ["large", "small", "medium"]
  assert float(rows[1]["mrr"]) == 0.4 and float(rows[1]["mrr_lo"]) == pytest.approx(0.35)
  assert float(rows[2]["query_accuracy_hi"]) == pytest.approx(0.6)


def _bars(ax):
  return [c for c in ax.containers if isinstance(c, BarContainer)]


def test_table_figure_draws_ci_error_bars_when_metrics_carry_them(tmp_path):
  methods = {
      "bm25": {"family": "baseline", "mrr": 0.6, "mrr_ci": [0.5, 0.7], "recall_at_10": 0.8,
               "recall_at_10_ci": {"lo": 0.7, "hi": 0.85}, "tailpatch_abs": 0.004,
               "tailpatch_abs_ci": [0.002, 0.005]},
      "trackstar": {"family": "gradient", "mrr": 0.4, "mrr_ci": [0.3, 0.45],
                    "recall_at_10": 0.5, "recall_at_10_ci": [0.45, 0.6],
                    "tailpatch_abs": 0.009, "tailpatch_abs_ci": [0.006, 0.012]}}
  fig = figures.plot_table(methods=methods, path=str(tmp_path / "t.png"))
  attribution, influence = fig.axes
  mrr_bars, recall_bars = _bars(attribution)
  for container, want in ((mrr_bars, [(0.5, 0.7), (0.3, 0.45)]),
                          (recall_bars, [(0.7, 0.85), (0.45, 0.6)])):
    (segments,) = container.errorbar.lines[2]
    assert [tuple(s[:, 1]) for s in segments.get_segments()] == pytest.approx(want)
  (segments,) = _bars(influence)[0].errorbar.lines[2]
  assert [tuple(s[:, 1]) for s in segments.get_segments()] == pytest.approx(
      [(0.2, 0.5), (0.6, 1.2)])  # Percentage points.
  assert "95% bootstrap CI" in fig._suptitle.get_text()
  bare = {m: {k: v for k, v in r.items() if not k.endswith("_ci")} for m, r in methods.items()}
  fig = figures.plot_table(methods=bare, path=str(tmp_path / "u.png"))
  assert all(b.errorbar is None for ax in fig.axes for b in _bars(ax))
  assert fig._suptitle.get_text() == "no confidence intervals in these metrics"


@pytest.mark.slow
def test_trend_stage_trains_the_smaller_sizes_alike_and_measures_every_size(tmp_path):
  c = helpers.tiny_config()
  c.world.facts_per_bucket = (3, 3, 2, 1)
  c.world.distractor_passages, c.world.filler_passages = 4, 3
  c.data.vocab_size = 320
  c.train.steps, c.train.warmup_steps, c.train.checkpoint_every = 4, 1, 4
  c.gradients.k_in = c.gradients.k_out = 4
  c.hessian.train_samples = 16
  c.trend.sizes = ("tiny:32:1:1:64",)
  c = config_lib.finalize(c)
  ctx = helpers.context(c, tmp_path)
  for stage in (world_stage, vocab_stage, train_stage, second_moments_stage, gradients_stage):
    pipeline.run_stage(ctx, stage)
  assert pipeline.run_stage(ctx, trend_stage)
  points = ctx.summary("trend")["points"]
  assert [p["size"] for p in points] == ["tiny", "large"]
  assert points[0]["params"] < points[1]["params"]
  assert points[0]["steps"] == points[1]["steps"] == 4  # Same steps: same epochs.
  split = ctx.gradients.split()
  test_ids = sorted(q for q, part in split.items() if part == "test")
  assert 0 < len(test_ids) < len(split)  # R_eval from dev; every number on test.
  for p in points:
    assert p["split"] == "test" and sorted(p["query_ids"]) == test_ids
    assert p["queries"] == len(test_ids) and len(p["rr"]) == len(test_ids)
    assert 0 < p["mrr"] <= 1  # Full ranking: every query has a first correct passage.
    assert min(p["rr"]) > 0
    assert p["mrr_ci"][0] <= p["mrr"] <= p["mrr_ci"][1]
  results = tmp_path / "results"
  assert sorted(os.listdir(results)) == ["fig_trend.png", "trend.csv", "trend.md"]
  assert "| tiny |" in (results / "trend.md").read_text()
  assert not pipeline.run_stage(ctx, trend_stage)  # Committed: skipped on rerun.


def test_the_trend_claim_is_judged_by_paired_cis_over_the_same_queries():
  rng = np.random.default_rng(0)
  ids = [f"q{i}" for i in range(120)]
  base = rng.uniform(0.0, 1.0, 120)
  pts = [{**_point("large", 700_000, 0.0, 0.9), "rr": list(np.minimum(base + 0.3, 1.0)),
          "query_ids": ids},
         {**_point("small", 80_000, 0.0, 0.2), "rr": list(base), "query_ids": ids},
         {**_point("medium", 250_000, 0.0, 0.5), "rr": list(base + rng.normal(0, 0.01, 120)),
          "query_ids": ids}]
  got = {(c["larger"], c["smaller"]): c for c in trend.size_claims(pts)}
  # Ordered by parameters, not by list order: small < medium < large, and the ends.
  assert set(got) == {("medium", "small"), ("large", "medium"), ("large", "small")}
  assert got["large", "small"]["verdict"] == "holds" and got["large", "small"]["lo"] > 0
  assert got["medium", "small"]["verdict"] == "inconclusive"
  worse = [{**p, "rr": list(1.0 - np.asarray(p["rr"]))} for p in pts]
  assert {c["verdict"] for c in trend.size_claims(worse)
          if c["larger"] == "large"} == {"differs"}
  md = trend.table_markdown(pts, trend.size_claims(pts))
  assert "| large − small | +" in md and "**holds**" in md
  with pytest.raises(ValueError, match="different queries"):
    trend.size_claims([pts[0], {**pts[1], "query_ids": ids[::-1]}])
  assert trend.size_claims(POINTS) == []  # No per-query values: nothing to judge.


def test_the_trend_claim_with_two_sizes_is_one_pair_and_with_one_none():
  ids = [f"q{i}" for i in range(40)]
  small = {**_point("small", 80_000, 0.2, 0.2), "rr": [0.2] * 40, "query_ids": ids}
  large = {**_point("large", 700_000, 0.7, 0.9), "rr": [0.7] * 40, "query_ids": ids}
  (c,) = trend.size_claims([large, small])  # Not the same pair twice.
  assert (c["larger"], c["smaller"], c["verdict"]) == ("large", "small", "holds")
  assert c["diff"] == pytest.approx(0.5) and c["n"] == 40
  assert trend.size_claims([large]) == []
  assert "Larger − smaller" not in trend.table_markdown([large], trend.size_claims([large]))


def test_the_run_footer_lists_each_claim_and_the_trend_judged_from_the_summary(tmp_path):
  from tda import run_output
  from tda import workdir as wd
  ids = [f"q{i}" for i in range(40)]
  points = [{**_point("small", 80_000, 0.2, 0.2), "rr": [0.2] * 40, "query_ids": ids},
            {**_point("large", 700_000, 0.7, 0.9), "rr": [0.7] * 40, "query_ids": ids}]
  os.makedirs(tmp_path / "results")
  os.makedirs(tmp_path / "trend")
  wd.write_json(str(tmp_path / "results" / "metrics.json"), {"paper_orderings": {
      "a": {"claim": "MRR exp1 < exp2", "verdict": "holds"},
      "b": {"claim": "TRAK's MRR < 0.05 or below Exp. 1's", "verdict": "differs"}}})
  # A summary committed before the trend was judged: the footer judges its points.
  wd.write_json(str(tmp_path / "trend" / "summary.json"), {"points": points})
  text = "\n".join(run_output.footer_lines(str(tmp_path), {"train": 1.0}))
  assert "  holds        MRR exp1 < exp2\n" in text
  assert "  differs      TRAK's MRR < 0.05 or below Exp. 1's\n" in text
  assert "  holds        large − small: +0.500 [+0.500, +0.500]" in text
  # A skipped trend (no points) and no metrics: no claim lines at all.
  wd.write_json(str(tmp_path / "trend" / "summary.json"), {"points": [], "skipped": "x"})
  os.remove(tmp_path / "results" / "metrics.json")
  text = "\n".join(run_output.footer_lines(str(tmp_path), {"train": 1.0}))
  assert "claims" not in text and "trend by model size" not in text

"""Stage 'evaluation': attribution metrics, tail-patch influence, tables, plots and
per-method JSONL for every method of `eval.methods` (DESIGN.md §2-3), and the
model-quality trend over earlier checkpoints (`tda.trend`).

All methods are scored on the same queries: MRR and recall@10 against the
ground-truth entailing passages of each fact, and tail-patch on the top-k
proponents of a fixed, seeded sample of `eval.tailpatch_queries` queries (the
same sample for every method; each distinct (query, passage) pair is
tail-patched once). The report (`tda.report`) is published to `<workdir>/results/`.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import numpy as np

from tda import config as config_lib
from tda import figures
from tda import fs
from tda import methods as methods_lib
from tda import report
from tda import tailpatch
from tda import trend
from tda import workdir as wd

STAGE = "evaluation"
NEEDS_MODEL = True


def fingerprint(ctx) -> dict[str, Any]:
  return {"eval": ctx.config.eval.to_dict(),
          "upstream": ctx.upstream("world", "vocab", "train", "model_eval", "gradients",
                                   "retrieval")}


def check_ground_truth(*, facts, passage_ids: set[str]) -> None:
  """Every fact's ground-truth passages must exist in the corpus."""
  missing = [(f["fact_id"], p) for f in facts for p in f["passage_ids"] if p not in passage_ids]
  if missing:
    raise ValueError(f"{len(missing)} ground-truth passage ids are missing from the corpus, "
                     f"e.g. (fact, passage) {missing[:5]}")


def tailpatch_sample(*, n_queries: int, n: int, seed: int) -> np.ndarray:
  if n <= 0 or n >= n_queries:
    return np.arange(n_queries)
  return np.sort(np.random.default_rng([seed, 7]).choice(n_queries, size=n, replace=False))


def run(ctx, out_dir: str) -> dict[str, Any]:
  config = ctx.config
  ev = config.eval
  world = ctx.world
  passages = {p["id"]: p["text"] for p in world.passages}
  check_ground_truth(facts=world.facts, passage_ids=set(passages))
  rankings = ctx.rankings
  corpus, queries = ctx.arrays
  facts_by_id = {f["fact_id"]: f for f in world.facts}
  facts = [facts_by_id[f] for f in queries.fact_ids]

  t0 = time.time()
  model, state, _ = ctx.trained
  lr = tailpatch.default_lr(config)
  fn = tailpatch.make_batched(model, tailpatch.tailpatch_optimizer(config, lr))
  rows = tailpatch_sample(n_queries=len(queries.ids), n=ev.tailpatch_queries, seed=config.seed)
  tp = tailpatch.tailpatch_methods(
      fn=fn, params=state.params, opt_state=state.opt_state,
      corpus_tokens_nt=corpus.tokens_nt, row_of={pid: i for i, pid in enumerate(corpus.ids)},
      query_tokens_nl=queries.tokens_nl, query_mask_nl=queries.loss_mask_nl,
      rankings={m: r["top_ids"] for m, r in rankings.items()}, query_rows=rows,
      k=ev.tailpatch_k)
  t_tail = time.time() - t0
  logging.info("tail-patch: %d queries × top-%d for %d methods in %.1f s (lr %.2e)",
               len(rows), ev.tailpatch_k, len(rankings), t_tail, lr)

  methods = {}
  for m in ev.methods:
    if m not in rankings:
      continue  # A skipped optional baseline (its reason is in the retrieval summary).
    r = rankings[m]
    abs_qk, rel_qk = tp[m]
    methods[m] = report.MethodResult(
        name=m, family=methods_lib.get(m).family,
        query_ids=list(queries.ids), top_ids=r["top_ids"],
        top_scores=np.asarray(r["top_scores"], np.float32), bottom_ids=r["bottom_ids"],
        bottom_scores=np.asarray(r["bottom_scores"], np.float32),
        tailpatch_abs=abs_qk, tailpatch_rel=rel_qk)
  timings = {**_all_timings(ctx.results_dir), **ctx.timings}
  timings["evaluation.tailpatch"] = t_tail
  results = os.path.join(out_dir, "results")
  fs.makedirs(results)
  model_eval = ctx.summary("model_eval")
  metrics = report.write_report(
      results_dir=results, methods=methods, facts=facts, passages=passages,
      predictions=ctx.predictions,
      bucket_order=[b for b, _, _ in config_lib.bucket_ranges(config)],
      timings_s=timings, model_eval=model_eval,
      extra={"tailpatch": {"lr": lr, "k": ev.tailpatch_k, "queries": int(len(rows))},
             "retrieval": ctx.summary("retrieval"), "gradients": ctx.summary("gradients")})
  if "trackstar" in metrics["methods"] and jax.process_count() == 1:
    metrics["trend"] = _trend(ctx, metrics, results)
    wd.write_json(os.path.join(results, "metrics.json"), metrics)
  return metrics


def _trend(ctx, metrics, results: str) -> list[dict[str, Any]]:
  """Model-quality trend over earlier checkpoints plus the final model; plots it."""
  t0 = time.time()
  final_step = metrics["model_eval"]["train_step"]
  points = trend.trend_points(ctx, steps=[s for s in ctx.config.eval.trend_steps
                                          if s != final_step])
  points.append({"step": final_step, "query_accuracy": metrics["model_eval"]["query_accuracy"],
                 "precision_at_10": metrics["methods"]["trackstar"]["precision_at_10"],
                 "mrr": metrics["methods"]["trackstar"]["mrr"],
                 "recall_at_10": metrics["methods"]["trackstar"]["recall_at_10"]})
  figures.plot_trend(points=[{"x": p["query_accuracy"], "y": p["precision_at_10"],
                             "label": f"{p['step']} steps"} for p in points],
                    path=os.path.join(results, "fig_trend.png"))
  metrics["timings_s"]["evaluation.trend"] = time.time() - t0
  return points


def _all_timings(results_dir: str) -> dict[str, float]:
  """Wall time of each stage so far (this run's, else the last run that ran it)."""
  path = os.path.join(results_dir, "timings.json")
  out: dict[str, float] = {}
  if fs.exists(path):
    for run_ in wd.read_json(path)["runs"]:
      out.update(run_)
  return out

"""Stage 'evaluation': attribution metrics, tail-patch influence, tables, plots and
per-method JSONL for every method of `eval.methods` (DESIGN.md §2-3). (The
model-size trend is its own stage, 'trend'.)

All methods are scored on the same **test** queries (`tda.protocol`; the dev
queries tuned R_eval, λ and the damping in the 'gradients' stage): MRR over the
full ranking and recall@10 against the ground-truth entailing passages of each
fact, and tail-patch on the top-k proponents of every test query (or a seeded
sample of `eval.tailpatch_queries` of them; each distinct (query, passage) pair
is tail-patched once), each with a bootstrap 95% CI over the test queries. The
report (`tda.report`) and the comparison with the paper (`tda.paper_comparison`)
are published to `<workdir>/results/`; metrics.json says `"split": "test"` and
records every chosen value with how it was chosen (`protocol`).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

import numpy as np

from tda import config as config_lib
from tda import corpus as corpus_lib
from tda import fs
from tda import hessian
from tda import methods as methods_lib
from tda import metrics as metrics_lib
from tda import paper_comparison
from tda import protocol
from tda import report
from tda import tailpatch
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
  rankings = ctx.rankings
  corpus, queries = ctx.arrays
  if corpus_lib.streamed(config):
    # Only the texts needed (ground truth and every ranked passage) are read.
    needed = {p for f in world.facts for p in f["passage_ids"]}
    for r in rankings.values():
      needed.update(i for ids in r["top_ids"] + r["bottom_ids"] for i in ids)
    passages = ctx.corpus.lookup(needed, missing_ok=True)
    ranked = sorted({i for r in rankings.values() for ids in r["top_ids"] for i in ids})
    tok, _ = corpus_lib.tokenize([passages[i] for i in ranked], vocab=ctx.vocab,
                                 seq_len=config.data.seq_len)
    corpus_tokens_nt, row_of = tok, {pid: k for k, pid in enumerate(ranked)}
  else:
    passages = {p["id"]: p["text"] for p in world.passages}
    corpus_tokens_nt, row_of = corpus.tokens_nt, {pid: i for i, pid in enumerate(corpus.ids)}
  check_ground_truth(facts=world.facts, passage_ids=set(passages))
  facts_by_id = {f["fact_id"]: f for f in world.facts}
  split = ctx.gradients.split()
  test = np.array([i for i, qid in enumerate(queries.ids) if split[qid] == protocol.TEST])
  if not len(test):
    raise ValueError("no test queries: lower eval.dev_fraction")
  facts = [facts_by_id[queries.fact_ids[i]] for i in test]

  t0 = time.time()
  model, state, _ = ctx.trained
  lr = tailpatch.default_lr(config)
  fn = tailpatch.make_batched(model, tailpatch.tailpatch_optimizer(config, lr))
  rows = test[tailpatch_sample(n_queries=len(test), n=ev.tailpatch_queries, seed=config.seed)]
  tp = tailpatch.tailpatch_methods(
      fn=fn, params=state.params, opt_state=state.opt_state,
      corpus_tokens_nt=corpus_tokens_nt, row_of=row_of,
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
    pick = lambda xs: [xs[i] for i in test]
    methods[m] = report.MethodResult(
        name=m, family=methods_lib.get(m).family,
        query_ids=pick(queries.ids), top_ids=pick(r["top_ids"]),
        top_scores=np.asarray(pick(r["top_scores"]), np.float32),
        bottom_ids=pick(r["bottom_ids"]),
        bottom_scores=np.asarray(pick(r["bottom_scores"]), np.float32),
        tailpatch_abs=abs_qk[test], tailpatch_rel=rel_qk[test],
        first_relevant_rank=(pick(r["first_relevant_rank"])
                             if "first_relevant_rank" in r else None))
  timings = {**_all_timings(ctx.results_dir), **ctx.timings}
  timings["evaluation.tailpatch"] = t_tail
  results = os.path.join(out_dir, "results")
  fs.makedirs(results)
  model_eval = ctx.summary("model_eval")
  grads = ctx.summary("gradients")
  choices = protocol_record(config, grads=grads, lr=lr, n_dev=grads.get("dev_queries"),
                            n_test=len(test), n_tailpatched=len(rows),
                            rank_depth=ctx.summary("retrieval").get("rank_depth"))
  metrics = report.write_report(
      results_dir=results, methods=methods, facts=facts, passages=passages,
      predictions=ctx.predictions,
      bucket_order=[b for b, _, _ in config_lib.bucket_ranges(config)],
      timings_s=timings, model_eval=model_eval, n_boot=ev.bootstrap_samples,
      seed=ev.split_seed,
      extra={"split": protocol.TEST, "protocol": choices,
             "tailpatch": {"lr": lr, "k": ev.tailpatch_k, "queries": int(len(rows))},
             "retrieval": ctx.summary("retrieval"), "gradients": grads,
             "diagnostics": {
                 "outlier_norms": outlier_norms(ctx),
                 "r_sample": _diagnostic("r_sample", lambda: r_sample_effect(ctx)),
                 "tailpatch_fit": _diagnostic(
                     "tailpatch_fit", lambda: tailpatch_fit(ctx, tp=tp, rows=rows))}})
  paper_comparison.write(results_dir=results, metrics=metrics)
  return metrics


def outlier_norms(ctx) -> dict[str, Any]:
  """`metrics.norms_by_kind` for each unnormalised gradient table, on the
  in-memory world (whose passages carry their kind), with the training epochs:
  why TRAK does or does not collapse here (`tda.paper_comparison`)."""
  config = ctx.config
  if corpus_lib.streamed(config) or not all("kind" in p for p in ctx.world.passages):
    return {}
  kind_of = {p["id"]: p["kind"] for p in ctx.world.passages}
  rankings = ctx.rankings
  out = {"train_epochs": config.train.steps * config.train.batch_size
                         / max(len(ctx.world.passages), 1), "tables": {}}
  for table, ms in methods_lib.table_groups(config.eval.methods).items():
    if methods_lib.get(table).switches.unit or not any(m in rankings for m in ms):
      continue
    ids, x = ctx.table(table).read_all()
    top = next(rankings[m]["top_ids"] for m in ms if m in rankings)
    out["tables"][table] = {"methods": ms, **metrics_lib.norms_by_kind(
        ids=ids, norms_n=np.linalg.norm(np.asarray(x, np.float64), axis=1),
        kind_of=kind_of, top_ids=top)}
  return out


# The R-sample diagnostic holds the candidates' vectors and R in float64 and runs two
# eigendecompositions on the leader: above these sizes it is skipped (with the reason).
R_SAMPLE_MAX_BLOCK = 8192
R_SAMPLE_MAX_VALUES = 1 << 27  # Candidates × d: 1 GiB a float64 copy.


def _diagnostic(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
  """A diagnostic explains a claim; it must never cost the stage its results: an
  error is logged and recorded as {"skipped": "error: ..."}."""
  try:
    return fn()
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("diagnostic %s failed: %s: %s", name, type(e).__name__, e)
    return {"skipped": f"error: {type(e).__name__}: {e}"}


def tailpatch_fit(ctx, *, tp: dict[str, tuple[np.ndarray, np.ndarray]],
                  rows: np.ndarray) -> dict[str, Any]:
  """Which gradient score follows the measured tail-patch: for each tail-patched test
  query, every distinct (query, passage) pair any method put in its top k (each
  tail-patched once) is scored by each gradient table's final vectors, and the
  Spearman correlation of those scores with the measured absolute tail-patch is
  taken within the query; the mean over the queries where every table has one
  (3+ pairs with distinct values), with a 95% bootstrap CI
  (`metrics.bootstrap_ci`, the run's seed, so tables share resamples). Tail-patch
  measures one optimizer step, so this says which score ranks passages the way that
  step does. In-memory corpora only; else {"skipped": why}."""
  from scipy import stats  # pylint: disable=import-outside-toplevel
  config = ctx.config
  if corpus_lib.streamed(config):
    return {"skipped": "the corpus is streamed"}
  tables = [t for t in methods_lib.table_groups(config.eval.methods)
            if methods_lib.get(t).family == "gradient"]
  if not tables:
    return {"skipped": "no gradient method"}
  rankings, grads = ctx.rankings, ctx.gradients
  pairs: dict[int, dict[str, float]] = {int(q): {} for q in rows}
  for m, (abs_qk, _) in tp.items():
    for q in pairs:
      for pid, v in zip(rankings[m]["top_ids"][q], abs_qk[q]):
        if np.isfinite(v):
          pairs[q][pid] = float(v)
  rho: dict[str, list[float]] = {t: [] for t in tables}
  for t in tables:
    ids, x = ctx.table(t).read_all()
    row_of = {pid: i for i, pid in enumerate(ids)}
    q_final = grads.final_queries(t)
    for q, got in pairs.items():
      pids = list(got)
      v = np.array([got[p] for p in pids])
      if len(pids) < 3 or np.ptp(v) == 0:
        rho[t].append(float("nan"))
        continue
      s = x[[row_of[p] for p in pids]].astype(np.float64) @ q_final[q].astype(np.float64)
      rho[t].append(float(stats.spearmanr(s, v)[0]) if np.ptp(s) > 0 else float("nan"))
  # The queries where every table has a correlation, so tables compare on the same ones.
  both = np.all([np.isfinite(r) for r in rho.values()], axis=0)
  if not both.any():
    return {"skipped": "no tail-patched query has 3 or more pairs with distinct values"}
  rho = {t: list(np.where(both, r, np.nan)) for t, r in rho.items()}
  ev = config.eval
  return {"split": protocol.TEST, "queries": int(both.sum()),
          "pairs": int(sum(len(p) for p in pairs.values())),
          "mean_spearman": {t: float(np.nanmean(r)) for t, r in rho.items()},
          "mean_spearman_ci": {t: list(metrics_lib.bootstrap_ci(
              r, n_boot=ev.bootstrap_samples, seed=ev.split_seed)) for t, r in rho.items()},
          # The paired difference (table − TrackStar) on the same queries.
          "minus_trackstar": ({t: metrics_lib.paired_diff_ci(
              rho["trackstar"], r, n_boot=ev.bootstrap_samples, seed=ev.split_seed)
                               for t, r in rho.items() if t != "trackstar"}
                              if "trackstar" in rho else {}),
          "methods": {t: methods_lib.table_groups(config.eval.methods)[t] for t in tables}}


def r_sample_effect(ctx) -> dict[str, Any]:
  """TRAK's dev MRR with R_train fitted on every candidate (as the run did, when the
  corpus fits in `hessian.train_samples`) and on a seeded random half
  (`tda.hessian.sample_effect`), at each damping of TRAK's dev sweep: whether the
  run's R sample is why TRAK does or does not collapse here
  (`tda.paper_comparison`). On the DEV queries, where the damping was chosen;
  nothing is chosen from it. Needs TRAK and an unnormalised table without R over
  the raw variant (Exp. 1's, which holds the raw vectors of every passage) and an
  in-memory corpus; else {"skipped": why}."""
  config = ctx.config
  methods = list(config.eval.methods)
  if "trak" not in methods or "exp1" not in methods:
    return {"skipped": "needs eval.methods to hold 'trak' and 'exp1'"}
  if corpus_lib.streamed(config):
    return {"skipped": "the corpus is streamed"}
  grads = ctx.gradients
  sw = (grads.summary.get("damping_sweep") or {}).get("trak") or {}
  if not sw.get("candidates"):
    return {"skipped": "no dev damping sweep for trak"}
  d, blocks = grads.summary["d"], [b[1] for b in grads.summary["blocks"]]
  if max(blocks if grads.summary.get("block_diagonal") else [d]) > R_SAMPLE_MAX_BLOCK:
    return {"skipped": f"R's blocks are larger than {R_SAMPLE_MAX_BLOCK}"}
  table = ctx.table("exp1")
  if len(table) * d > R_SAMPLE_MAX_VALUES:
    return {"skipped": f"{len(table)} candidates x d = {d} is over {R_SAMPLE_MAX_VALUES} "
                       "values"}
  split = grads.split()
  qids = grads.query_ids()
  q_raw = grads.queries("raw")
  # The dev queries the sweep used: not those whose gradients were non-finite (the
  # featuriser zeroes their rows and names them).
  bad = set(grads.summary.get("bad_query_ids") or [])
  dev = [i for i, qid in enumerate(qids) if split.get(qid) == protocol.DEV and qid not in bad]
  ids, x = table.read_all()
  _, queries = ctx.arrays
  fact_of = dict(zip(queries.ids, queries.fact_ids))
  facts = {f["fact_id"]: f for f in ctx.world.facts}
  rel = np.array([np.isin(ids, facts[fact_of[qids[i]]]["passage_ids"]) for i in dev],
                 bool).reshape(len(dev), len(ids))
  out = hessian.sample_effect(pool_nd=x, queries_qd=q_raw[dev], relevant_qn=rel,
                              r_as_run=grads.r_train("raw"), dampings=sw["candidates"],
                              block_sizes=blocks if grads.summary.get("block_diagonal")
                              else None, seed=config.eval.split_seed)
  return {"split": protocol.DEV, "trak_damping": sw.get("chosen"),
          "r_train_samples": grads.summary.get("train_samples"), **out}


def protocol_record(config, *, grads: dict[str, Any], lr: float, n_dev, n_test: int,
                    n_tailpatched: int, rank_depth) -> dict[str, Any]:
  """Every value the reported numbers depend on that could have been tuned, with
  how it was chosen (metrics.json `protocol`)."""
  h, ev = config.hessian, config.eval
  return {
      "split": {"dev_fraction": ev.dev_fraction, "split_seed": ev.split_seed,
                "stratified_by": ["bucket", "relation"], "dev_queries": n_dev,
                "test_queries": n_test},
      "reported_on": protocol.TEST,
      "r_eval": "dev queries",
      "lambda": {"value": grads.get("lambda"), **(grads.get("lambda_choice") or {}),
                 "how": ("the paper's rule (tda.hessian.lambda_top_k) on the unnormalised "
                         "dev R_eval and R_train; K fixed by hessian.lambda_top_k_fraction, "
                         "not tuned") if h.lambda_rule == "top_k"
                        else f"fixed by hessian.lambda_ ({h.lambda_rule}), not tuned"},
      "damping": {"value": grads.get("damping"), "sweep": grads.get("damping_sweep"),
                  "how": "per table, the candidate of hessian.damping_candidates with the "
                         "best dev MRR (full ranking of a pool drawn apart from R_train's "
                         "sample, hessian.sweep_pool passages, plus the dev ground truth); "
                         "a best strictly at an end of the grid extends it "
                         "past that end, up to hessian.damping_extend_steps candidates "
                         "(sweep: extended_by, chosen_at_grid_edge)"},
      "d": {"value": grads.get("d"), "train_samples": grads.get("train_samples"),
            "samples_per_dim": grads.get("samples_per_dim"), "r_dim": grads.get("r_dim"),
            "block_diagonal": grads.get("block_diagonal"),
            "how": "fixed by the config (gradients.k_in/k_out, hessian.block_diagonal), "
                   "chosen on dev MRR among settings whose R (or each block of it) has "
                   ">= 4 samples per dimension (scripts/bench_r_estimate.py)"},
      "tailpatch_lr": {"value": lr, "how": ("eval.tailpatch_lr" if ev.tailpatch_lr is not None
                                            else "the training schedule's final LR; not tuned")},
      "tailpatch": {"k": ev.tailpatch_k, "queries": n_tailpatched},
      "mrr": {"rank_depth": rank_depth,
              "how": "rank of the first entailing passage in the full ranking"
                     if not ev.rank_depth else f"ranking {ev.rank_depth} deep"},
      "ci": {"method": "percentile bootstrap over test queries, 95%",
             "samples": ev.bootstrap_samples, "seed": ev.split_seed},
  }


def _all_timings(results_dir: str) -> dict[str, float]:
  """Wall time of each stage so far (this run's, else the last run that ran it)."""
  path = os.path.join(results_dir, "timings.json")
  out: dict[str, float] = {}
  if fs.exists(path):
    for run_ in wd.read_json(path)["runs"]:
      out.update(run_)
  return out

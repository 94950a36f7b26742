"""The paper's trend, as the paper defines it: better models by size.

Chang et al. (2025) compare models of several sizes trained alike and find that
influence (TrackStar) aligns more with attribution as models get better. Here the
attributed model (the train stage's) is the largest size; `trend.sizes` lists
smaller ones, each trained by the 'trend' stage on the same corpus with the same
optimizer, schedule, batch size, number of steps (so the same number of epochs)
and seed. For every size, the model's quality on the queries (greedy accuracy of
the target's first token, mean target log-probability) and TrackStar's
attribution (MRR over the full ranking of the corpus, recall@10, precision@10)
are measured the same way: a fresh optimizer-state-corrected gradient engine,
R_train and R_eval fitted as the 'gradients' stage fits them
(`tda.featurize.fit_whiteners`, `config.hessian` as given, nothing tuned per
size), corpus vectors in memory and exact search. Each number comes with a 95%
bootstrap CI over queries.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from tda import claims
from tda import corpus as corpus_lib
from tda import featurize
from tda import index as index_lib
from tda import metrics
from tda import model_eval
from tda import progress
from tda import protocol
from tda import train as train_lib


@dataclasses.dataclass(frozen=True)
class Size:
  """A model size: its name and the `model` keys it overrides."""
  name: str
  d_model: int
  n_layers: int
  n_heads: int
  d_ff: int


def parse_sizes(specs: Sequence[str]) -> list[Size]:
  """`trend.sizes` entries 'name:d_model:n_layers:n_heads:d_ff' as Sizes.

  Raises:
    ValueError: an entry that is not of that form, or a repeated name.
  """
  out = []
  for spec in specs:
    parts = str(spec).split(":")
    try:
      if len(parts) != 5:
        raise ValueError
      name, dims = parts[0], [int(p) for p in parts[1:]]
      if not name or min(dims) < 1:
        raise ValueError
    except ValueError:
      raise ValueError(f"trend.sizes entry {spec!r} is not "
                       "'name:d_model:n_layers:n_heads:d_ff' with positive ints") from None
    out.append(Size(name, *dims))
  names = [s.name for s in out]
  if len(set(names)) != len(names):
    raise ValueError(f"trend.sizes has repeated names: {names}")
  return out


def size_config(config: ml_collections.ConfigDict, size: Size) -> ml_collections.ConfigDict:
  """`config` with the model of `size`; training keeps every other setting, and
  only the final checkpoint is kept."""
  c = copy.deepcopy(config)
  with c.unlocked():
    c.model.d_model, c.model.n_layers = size.d_model, size.n_layers
    c.model.n_heads, c.model.d_ff = size.n_heads, size.d_ff
    c.model.checkpoint = None
    c.train.checkpoint_every = c.train.steps
    c.train.max_to_keep = 1
  return c


def param_count(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def _ci(values, *, seed: int) -> list[float]:
  """[lo, hi]: the 95% percentile bootstrap CI of the mean over queries."""
  return list(metrics.bootstrap_ci(values, seed=seed))


def measure(ctx, *, config, model, state, label: str, params: int,
            second_moments=None) -> dict[str, Any]:
  """Model quality and TrackStar's attribution for one trained model (V from
  `second_moments` when given, else from `state`'s optimizer state)."""
  if corpus_lib.streamed(config):
    raise ValueError("the trend featurises the whole corpus in memory for each size; with a "
                     f"streamed corpus (data.source={config.data.source!r}) set trend.sizes=()")
  corpus, queries = ctx.arrays
  facts = {f["fact_id"]: f for f in ctx.world.facts}
  t0 = time.time()
  preds = model_eval.evaluate_queries(
      model=model, params=state.params, queries=queries,
      targets=[facts[f]["targets_plaintext"] for f in queries.fact_ids], vocab=ctx.vocab,
      batch_size=config.model_eval.batch_size, max_new_tokens=1)
  eng = featurize.make_engine(config, model=model, state=state, variants=("corrected",),
                              second_moments=second_moments)
  q = eng.featurizer(tokens_nt=queries.tokens_nl, mask_nt=queries.loss_mask_nl, ids=queries.ids)
  c = eng.featurizer(tokens_nt=corpus.tokens_nt,
                     mask_nt=(corpus.tokens_nt != 0).astype(np.float32), ids=corpus.ids)
  # The run's protocol (tda.protocol): R_eval from the dev queries, every number on
  # the test queries; the damping is hessian.damping for every size (not tuned).
  split = ctx.gradients.split()
  dev = np.array([split[i] == protocol.DEV for i in queries.ids])
  test = np.flatnonzero(~dev)
  sample = featurize.hessian_sample(config, len(corpus.ids))
  fit = featurize.fit_whiteners(
      config, methods=["trackstar"], queries={"corrected": q["corrected"][dev]},
      train={"corrected": c["corrected"][sample]},
      block_sizes=[b.dim for b in eng.plan.blocks])
  qv = fit.whiteners.transform(method="trackstar", vectors_nd=q["corrected"][test])
  cv = fit.whiteners.transform(method="trackstar", vectors_nd=c["corrected"])
  # The full ranking: MRR without truncation.
  _, rows = index_lib.exact_search(queries_qd=qv, vectors_nd=cv, k=len(corpus.ids),
                                   chunk_rows=config.index.chunk_rows)
  top_ids = [[corpus.ids[j] for j in r] for r in rows]
  fact_ids = [queries.fact_ids[i] for i in test]
  att = metrics.attribution(top_ids=top_ids,
                            relevant=[set(facts[f]["passage_ids"]) for f in fact_ids])
  preds = [preds[i] for i in test]
  correct = np.array([p["correct"] for p in preds], np.float64)
  logprob = np.array([p["target_logprob"] for p in preds], np.float64)
  p10 = np.array([np.mean([i in set(facts[f]["passage_ids"]) for i in r[:10]])
                  for f, r in zip(fact_ids, top_ids)])
  out = {"size": label, "params": params, "queries": len(preds), "split": protocol.TEST,
         "query_accuracy": float(correct.mean()),
         "query_accuracy_ci": _ci(correct, seed=ctx.config.seed),
         "target_logprob": float(logprob.mean()),
         "mrr": float(np.mean(att["rr"])),
         "mrr_ci": _ci(att["rr"], seed=ctx.config.seed),
         "recall_at_10": float(np.mean(att["hit"])),
         "recall_at_10_ci": _ci(np.asarray(att["hit"], np.float64),
                                              seed=ctx.config.seed),
         "precision_at_10": float(p10.mean()),
         "precision_at_10_ci": _ci(p10, seed=ctx.config.seed),
         "rr": [float(x) for x in att["rr"]], "query_ids": [queries.ids[i] for i in test],
         "measure_s": time.time() - t0}
  logging.info("trend: %s (%d params): accuracy %.3f, TrackStar MRR %.3f (%.1f s)", label,
               params, out["query_accuracy"], out["mrr"], out["measure_s"])
  return out


def train_size(ctx, *, size: Size, folder: str) -> tuple[Any, Any, dict[str, Any]]:
  """Trains `size` (resuming a partial run in `folder`); (model, state, summary)."""
  config = size_config(ctx.config, size)
  corpus, _ = ctx.arrays
  ckpt = os.path.join(folder, size.name)
  t0 = time.time()
  summary = train_lib.train(config, ckpt, tokens_nt=corpus.tokens_nt)
  summary["train_s"] = time.time() - t0
  model, state, _ = train_lib.load_trained(config, ckpt, config.train.steps)
  return config, (model, state), summary


def size_points(ctx, *, folder: str) -> list[dict[str, Any]]:
  """One point per size of `trend.sizes`, smallest first, then the attributed model."""
  points = []
  for size in progress.iterate(parse_sizes(ctx.config.trend.sizes), desc="trend", unit="model"):
    config, (model, state), summary = train_size(ctx, size=size, folder=folder)
    p = measure(ctx, config=config, model=model, state=state, label=size.name,
                params=param_count(state.params))
    points.append({**p, "model": dataclasses.asdict(size), "final_loss": summary["final_loss"],
                   "train_s": summary["train_s"], "steps": config.train.steps})
  model, state, _ = ctx.trained
  m = ctx.config.model
  p = measure(ctx, config=ctx.config, model=model, state=state, label=ctx.config.trend.final_name,
              params=param_count(state.params), second_moments=ctx.second_moments)
  points.append({**p, "model": {"name": ctx.config.trend.final_name, "d_model": m.d_model,
                                "n_layers": m.n_layers, "n_heads": m.n_heads, "d_ff": m.d_ff},
                 "final_loss": ctx.summary("train").get("final_loss"), "train_s": None,
                 "steps": int(state.step)})
  return points


TABLE_COLUMNS = (("size", "Model"), ("params", "Parameters"), ("steps", "Steps"),
                 ("final_loss", "Final train loss"), ("query_accuracy", "Query accuracy"),
                 ("target_logprob", "Mean target log-prob"), ("mrr", "TrackStar MRR"),
                 ("recall_at_10", "TrackStar Recall@10"),
                 ("precision_at_10", "TrackStar Precision@10"))


def _cell(p: dict[str, Any], key: str) -> str:
  v = p.get(key)
  if v is None:
    return "—"
  if isinstance(v, float):
    ci = p.get(f"{key}_ci")
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{v:.3f}"
  return f"{v:,}" if isinstance(v, int) and key == "params" else str(v)


def size_claims(points: list[dict[str, Any]], *, seed: int = 0) -> list[dict[str, Any]]:
  """The paper's trend as orderings judged like `tda.claims`: TrackStar's MRR of each
  size (by parameters) minus the next smaller one's, and largest minus smallest, each with a
  paired bootstrap 95% CI over the same test queries (strict: "larger > smaller")."""
  pts = sorted((p for p in points if p.get("rr") is not None), key=lambda p: p["params"])
  pairs = list(zip(pts, pts[1:]))
  if len(pts) > 2:
    pairs.append((pts[0], pts[-1]))
  out = []
  for small, large in pairs:
    if small.get("query_ids") != large.get("query_ids"):
      raise ValueError(f"trend sizes {small['size']!r} and {large['size']!r} were measured "
                       "on different queries; they cannot be compared per query")
    ci = metrics.paired_diff_ci(small["rr"], large["rr"], seed=seed)
    out.append({"smaller": small["size"], "larger": large["size"], **ci,
                "verdict": claims.verdict(ci, strict=True)})
  return out


def table_markdown(points: list[dict[str, Any]],
                   judged: Sequence[dict[str, Any]] = ()) -> str:
  """The trend as a markdown table, one row per model size, then `judged` (the paper's
  trend judged by paired CIs, `size_claims`) when given."""
  lines = ["# TrackStar attribution by model size (same data, steps and optimizer)", "",
           "Each model is trained for the same number of steps (so epochs) on the same "
           "corpus; values in brackets are 95% bootstrap CIs over the "
           f"{points[0]['queries']} test queries (R_eval from the dev queries). MRR is over "
           "the full ranking of the corpus.", "",
           "| " + " | ".join(h for _, h in TABLE_COLUMNS) + " |",
           "|" + "---|" * len(TABLE_COLUMNS)]
  for p in points:
    lines.append("| " + " | ".join(_cell(p, k) for k, _ in TABLE_COLUMNS) + " |")
  if judged:
    lines += ["", "The paper's trend (influence aligns with attribution as models improve), "
              "as orderings: TrackStar's MRR of the larger model minus the smaller's, "
              "paired bootstrap 95% CI over the same test queries; **holds** when the CI "
              "lies above 0, **differs** when below, **inconclusive** otherwise.", "",
              "| Larger − smaller | MRR difference [95% CI] | Verdict |", "|---|---|---|"]
    for c in judged:
      lines.append(f"| {c['larger']} − {c['smaller']} | {c['diff']:+.3f} "
                   f"[{c['lo']:+.3f}, {c['hi']:+.3f}] | **{c['verdict']}** |")
  return "\n".join(lines) + "\n"


def table_csv(points: list[dict[str, Any]]) -> str:
  """The trend as CSV: each metric with its CI bounds in `<key>_lo`, `<key>_hi`."""
  cols = []
  for k, _ in TABLE_COLUMNS:
    cols.append(k)
    if any(f"{k}_ci" in p for p in points):
      cols += [f"{k}_lo", f"{k}_hi"]
  rows = [",".join(cols)]
  for p in points:
    vals = []
    for col in cols:
      if col.endswith(("_lo", "_hi")) and col[:-3] in dict(TABLE_COLUMNS):
        ci = p.get(f"{col[:-3]}_ci")
        vals.append("" if ci is None else f"{ci[0 if col.endswith('_lo') else 1]:.6g}")
      else:
        v = p.get(col)
        vals.append("" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v)))
    rows.append(",".join(vals))
  return "\n".join(rows) + "\n"

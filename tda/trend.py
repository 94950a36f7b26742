"""The paper's trend "as models improve, influence aligns with attribution".

For earlier checkpoints of the same training run (shorter training = a weaker
model; `eval.trend_steps`) and for the final one, compute the model's query
accuracy and TrackStar's share of top-10 proponents that entail the queried fact
(precision@10), then plot one against the other (`results/fig_trend.png`).
Each checkpoint gets its own optimizer state, R_train/R_eval and whitening, fitted
exactly as the 'gradients' stage fits them (`tda.featurize.fit_whiteners`); the
corpus vectors are computed in memory (no tables), with exact search.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from tda import corpus as corpus_lib
from tda import featurize
from tda import index as index_lib
from tda import metrics
from tda import model_eval


def checkpoint_point(ctx, *, step: int) -> dict[str, Any]:
  """Model quality and TrackStar's precision@10 at one checkpoint."""
  config = ctx.config
  if corpus_lib.streamed(config):
    raise ValueError("eval.trend_steps featurises the whole corpus in memory at each step; "
                     "with a streamed corpus (data.source=%r) set eval.trend_steps=()"
                     % config.data.source)
  model, state, _ = ctx.restore(step)
  corpus, queries = ctx.arrays
  world = ctx.world
  facts = {f["fact_id"]: f for f in world.facts}
  preds = model_eval.evaluate_queries(
      model=model, params=state.params, queries=queries,
      targets=[facts[f]["targets_plaintext"] for f in queries.fact_ids], vocab=ctx.vocab,
      batch_size=config.model_eval.batch_size, max_new_tokens=1)
  eng = featurize.make_engine(config, model=model, state=state, variants=("corrected",))
  q = eng.featurizer(tokens_nt=queries.tokens_nl, mask_nt=queries.loss_mask_nl, ids=queries.ids)
  c = eng.featurizer(tokens_nt=corpus.tokens_nt,
                     mask_nt=(corpus.tokens_nt != 0).astype(np.float32), ids=corpus.ids)
  sample = featurize.hessian_sample(config, len(corpus.ids))
  fit = featurize.fit_whiteners(
      config, methods=["trackstar"], queries={"corrected": q["corrected"]},
      train={"corrected": c["corrected"][sample]},
      block_sizes=[b.dim for b in eng.plan.blocks])
  qv = fit.whiteners.transform(method="trackstar", vectors_nd=q["corrected"])
  cv = fit.whiteners.transform(method="trackstar", vectors_nd=c["corrected"])
  _, rows = index_lib.exact_search(queries_qd=qv, vectors_nd=cv, k=10,
                                   chunk_rows=config.index.chunk_rows)
  top_ids = [[corpus.ids[j] for j in r] for r in rows]
  att = metrics.attribution(top_ids=top_ids,
                            relevant=[set(facts[f]["passage_ids"]) for f in queries.fact_ids])
  return {"step": step, "query_accuracy": float(np.mean([p["correct"] for p in preds])),
          "precision_at_10": att["precision_at_10"], "mrr": att["mrr"],
          "recall_at_10": att["recall_at_10"]}


def trend_points(ctx, *, steps) -> list[dict[str, Any]]:
  out = []
  available = ctx.checkpoint_steps
  for step in steps:
    if step not in available:
      raise ValueError(f"eval.trend_steps has {step}, but the checkpoints kept are "
                       f"{available}: raise train.max_to_keep or pick saved steps")
    t0 = time.time()
    out.append(checkpoint_point(ctx, step=step))
    logging.info("trend: step %d -> %s (%.1f s)", step, out[-1], time.time() - t0)
  return out

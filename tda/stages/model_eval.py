"""Stage 'model_eval': does the trained model know each queried fact?
(`tda.model_eval`: greedy exact match, target probability, greedy continuation.)

Writes `predictions.jsonl` (per query) and publishes `results/model_eval.json`.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from tda import config as config_lib
from tda import fs
from tda import model_eval
from tda import workdir as wd

STAGE = "model_eval"
NEEDS_MODEL = True
PREDICTIONS = "predictions.jsonl"


def fingerprint(ctx) -> dict[str, Any]:
  return {"model_eval": ctx.config.model_eval.to_dict(), "train_step": ctx.checkpoint_step,
          "upstream": ctx.upstream("world", "vocab", "train")}


def run(ctx, out_dir: str) -> dict[str, Any]:
  config = ctx.config
  me = config.model_eval
  model, state, _ = ctx.trained
  _, queries = ctx.arrays
  facts = ctx.world.facts
  by_fact = {f["fact_id"]: f for f in facts}
  t0 = time.time()
  per_query = model_eval.evaluate_queries(
      model=model, params=state.params, queries=queries,
      targets=[by_fact[f]["targets_plaintext"] for f in queries.fact_ids],
      vocab=ctx.vocab, batch_size=me.batch_size, max_new_tokens=me.max_new_tokens,
      num_samples=me.num_samples, temperature=me.temperature, seed=config.seed)
  summary = model_eval.summarize(
      per_query=per_query, facts=facts,
      bucket_order=[b for b, _, _ in config_lib.bucket_ranges(config)])
  summary["wall_s"] = time.time() - t0
  summary["train_step"] = ctx.checkpoint_step
  wd.write_jsonl(os.path.join(out_dir, PREDICTIONS), per_query)
  fs.makedirs(os.path.join(out_dir, "results"))
  wd.write_json(os.path.join(out_dir, "results", "model_eval.json"), summary)
  logging.info("query accuracy %.3f; by bucket %s", summary["query_accuracy"],
               summary["accuracy_by_bucket"])
  return summary


def load(ctx) -> dict[str, dict[str, Any]]:
  """Per-query model results, keyed by example id."""
  rows = wd.read_jsonl(os.path.join(ctx.stage_dir(STAGE), PREDICTIONS))
  return {r["example_id"]: r for r in rows}

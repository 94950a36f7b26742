"""Stage 'retrieval': proponents and opponents of every query, for every method.

Gradient methods search their sharded table (`tda.index`: ScaNN with exact
reordering, or the exact brute force; `index.method`) with the query vectors of
the 'gradients' stage; each table is opened with the meta it must have, so a
table written from another model, seed or d is refused. Baselines (BM25, dense
embeddings) rank the same corpus through `tda.baselines`. Every method's ranking
is committed as `<method>.json`.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np

from tda import baselines
from tda import corpus as corpus_lib
from tda import index as index_lib
from tda import methods as methods_lib
from tda import workdir as wd

STAGE = "retrieval"


def fingerprint(ctx) -> dict[str, Any]:
  return {"index": ctx.config.index.to_dict(),
          "methods": methods_lib.check(ctx.config.eval.methods),
          "upstream": ctx.upstream("world", "vocab", "gradients", "tables")}


def _ranking(ids_top, s_top, ids_bot, s_bot) -> dict[str, Any]:
  return {"top_ids": ids_top, "top_scores": np.asarray(s_top, float).tolist(),
          "bottom_ids": ids_bot, "bottom_scores": np.asarray(s_bot, float).tolist()}


def _drop_excluded(res: index_lib.Retrieval, excluded: set[str], k: int):
  def pick(ids_qk, s_qk):
    out_i, out_s = [], []
    for ids, s in zip(ids_qk, s_qk):
      keep = [j for j, x in enumerate(ids) if x not in excluded][:k]
      out_i.append([ids[j] for j in keep])
      out_s.append([float(s[j]) for j in keep])
    return out_i, out_s
  return (*pick(res.top_ids, res.top_scores_qk), *pick(res.bottom_ids, res.bottom_scores_qk))


def gradient_rankings(ctx, *, k: int) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
  ix = ctx.config.index
  excluded = ctx.excluded_ids
  out, timings = {}, {}
  for table_name, methods in methods_lib.table_groups(ctx.config.eval.methods).items():
    t0 = time.time()
    table = ctx.table(table_name)
    res = index_lib.search_table(
        table=table, queries_qd=ctx.gradients.final_queries(table_name),
        k=min(k + len(excluded), len(table)), method=ix.method,
        index_params=index_lib.index_params_from_config(ix), chunk_rows=ix.chunk_rows)
    ranking = _ranking(*_drop_excluded(res, excluded, k))
    for m in methods:
      out[m] = ranking
    timings[table_name] = time.time() - t0
  return out, timings


def baseline_rankings(ctx, *, methods, k: int) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
  world = ctx.world
  facts_by_id = {f["fact_id"]: f for f in world.facts}
  _, queries = ctx.arrays
  texts = [f"{facts_by_id[f]['inputs_plaintext']} {facts_by_id[f]['targets_plaintext']}"
           for f in queries.fact_ids]
  out, info = {}, {}
  passages = None
  for m in methods:
    if methods_lib.get(m).kind == methods_lib.DENSE:
      ok, reason = baselines.dense_available()
      if not ok:
        logging.warning("skipping the dense baseline: %s", reason)
        info["dense_skipped"] = reason
        continue
    if passages is None:  # BM25 and dense index the whole corpus in memory.
      passages = (corpus_lib.in_memory(ctx.corpus, ctx.config, "the BM25/dense baselines")
                  if corpus_lib.streamed(ctx.config)
                  else [(p["id"], p["text"]) for p in world.passages])
    t0 = time.time()
    r = baselines.run_baseline(method=m, passage_ids=[i for i, _ in passages],
                               passage_texts=[t for _, t in passages],
                               query_texts=texts, k=k)
    out[m] = _ranking(r.top_ids, r.top_scores, r.bottom_ids, r.bottom_scores)
    info[m] = time.time() - t0
  return out, info


def run(ctx, out_dir: str) -> dict[str, Any]:
  config = ctx.config
  k = config.index.k
  rankings, timings = gradient_rankings(ctx, k=k)
  base, info = baseline_rankings(ctx, methods=methods_lib.baselines(config.eval.methods), k=k)
  rankings.update(base)
  _, queries = ctx.arrays
  wd.write_json(os.path.join(out_dir, "query_ids.json"), queries.ids)
  for m, r in rankings.items():
    wd.write_json(os.path.join(out_dir, f"{m}.json"), r)
  return {"methods": sorted(rankings), "k": k, "index_method": config.index.method,
          "timings_s": {**timings, **{m: v for m, v in info.items() if m in rankings}},
          **{k_: v for k_, v in info.items() if k_ not in rankings}}


def load(ctx) -> dict[str, dict[str, Any]]:
  """method -> {top_ids, top_scores, bottom_ids, bottom_scores} over all queries."""
  d = ctx.stage_dir(STAGE)
  return {m: wd.read_json(os.path.join(d, f"{m}.json")) for m in ctx.summary(STAGE)["methods"]}

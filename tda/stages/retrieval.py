"""Stage 'retrieval': proponents and opponents of every query, for every method.

Gradient methods search their sharded table (`tda.index`: ScaNN with exact
reordering, or the exact brute force; `index.method`) with the query vectors of
the 'gradients' stage; each table is opened with the meta it must have, so a
table written from another model, seed or d is refused. Baselines (BM25, dense
embeddings) rank the same corpus through `tda.baselines`. Every method's ranking
is committed as `<method>.json`: the top and bottom `index.k` passages of every
query, and `first_relevant_rank`, the rank of the best-ranked passage that
entails the query's fact in a ranking `eval.rank_depth` deep (0: the whole
corpus, so MRR is exact; 0 in the list = not within the depth).
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
from tda import metrics
from tda import progress
from tda import verify
from tda import workdir as wd

STAGE = "retrieval"


def fingerprint(ctx) -> dict[str, Any]:
  return {"index": ctx.config.index.to_dict(), "rank_depth": ctx.config.eval.rank_depth,
          "methods": methods_lib.check(ctx.config.eval.methods),
          "upstream": ctx.upstream("world", "vocab", "gradients", "tables")}


def _ranking(ids_top, s_top, ids_bot, s_bot, *, k: int, relevant) -> dict[str, Any]:
  """The top/bottom k of deep rankings, and each query's first relevant rank in them."""
  ranks = [metrics.first_correct_rank(proponent_ids=ids, relevant=rel)
           for ids, rel in zip(ids_top, relevant)]
  return {"top_ids": [list(r[:k]) for r in ids_top],
          "top_scores": [np.asarray(r[:k], float).tolist() for r in s_top],
          "bottom_ids": [list(r[:k]) for r in ids_bot],
          "bottom_scores": [np.asarray(r[:k], float).tolist() for r in s_bot],
          "first_relevant_rank": ranks, "depth": int(max(map(len, ids_top), default=0))}


def relevant_sets(ctx) -> list[set[str]]:
  """Per query, the ids of the passages that entail its fact."""
  facts = {f["fact_id"]: f for f in ctx.world.facts}
  return [set(facts[f]["passage_ids"]) for f in ctx.arrays[1].fact_ids]


def depth(ctx) -> int:
  """How deep every method ranks (`eval.rank_depth`; 0: the whole corpus)."""
  n = len(ctx.corpus)
  d = ctx.config.eval.rank_depth
  if d < 0:
    raise ValueError(f"eval.rank_depth must be >= 0, got {d}")
  return max(ctx.config.index.k, min(d, n) if d else n)


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
  deep = depth(ctx)
  relevant = relevant_sets(ctx)
  out, timings = {}, {}
  groups = methods_lib.table_groups(ctx.config.eval.methods)
  for table_name, methods in progress.iterate(groups.items(), total=len(groups),
                                              desc="retrieval: index search", unit="table"):
    t0 = time.time()
    table = ctx.table(table_name)
    res = index_lib.search_table(
        table=table, queries_qd=ctx.gradients.final_queries(table_name),
        k=min(deep + len(excluded), len(table)), method=ix.method,
        index_params=index_lib.index_params_from_config(ix), chunk_rows=ix.chunk_rows)
    ranking = _ranking(*_drop_excluded(res, excluded, deep), k=k, relevant=relevant)
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
                               query_texts=texts, k=min(depth(ctx), len(passages)))
    out[m] = _ranking(r.top_ids, r.top_scores, r.bottom_ids, r.bottom_scores, k=k,
                      relevant=relevant_sets(ctx))
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
  return {"methods": sorted(rankings), "k": k, "rank_depth": depth(ctx),
          "index_method": config.index.method,
          "timings_s": {**timings, **{m: v for m, v in info.items() if m in rankings}},
          **{k_: v for k_, v in info.items() if k_ not in rankings}}


def load(ctx) -> dict[str, dict[str, Any]]:
  """method -> {top_ids, top_scores, bottom_ids, bottom_scores} over all queries."""
  d = ctx.stage_dir(STAGE)
  return {m: verify.read_json(d, f"{m}.json") for m in ctx.summary(STAGE)["methods"]}

"""Stage 'gradients' (small, once): the queries' projected per-example gradients and
a sample of training passages', in the uncorrected and the corrected variant from
one forward/backward (`tda.featurize`); R_train and R_eval per variant; λ; each
method's whitening matrix R^{-1/2} (`tda.hessian`); and each method's final query
vectors, one set per table (methods with identical transforms share a table).

Also commits `coverage.json` (`tda.projection.coverage`: which parameters are
attributed, by kind, and which are not and why), logged on every run.

The protocol (`tda.protocol`): the queries are split into dev and test
(`split.json`); R_eval is estimated from the dev queries only; λ follows the
paper's rule (`tda.hessian`); each R-using table's damping is chosen by its dev
MRR over the pool of the R_train sample and the dev ground truth, every candidate
and its dev score recorded in the summary (`damping_sweep`).

Every process featurises its share of the pool; R_train is summed across
processes; process 0 writes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import jax
import numpy as np

from tda import corpus as corpus_lib
from tda import distributed
from tda import featurize
from tda import fs
from tda import methods as methods_lib
from tda import projection as proj
from tda import protocol
from tda import verify
from tda import workdir as wd

STAGE = "gradients"
ALL_PROCESSES = True
NEEDS_MODEL = True
COVERAGE = "coverage.json"


def fingerprint(ctx) -> dict[str, Any]:
  c = ctx.config
  return {"gradients": c.gradients.to_dict(), "hessian": c.hessian.to_dict(),
          "split": {k: c.eval[k] for k in ("dev_fraction", "split_seed")},
          "methods": methods_lib.gradient(c.eval.methods), "train_step": ctx.checkpoint_step,
          "seq_len": c.data.seq_len, "upstream": ctx.upstream(
              "world", "vocab", "train",
              *(("second_moments",) if c.gradients.v_source == "estimate" else ())),
          **({"corpus": ctx.corpus.fingerprint()} if corpus_lib.streamed(c) else {})}


def run(ctx, out_dir: str) -> dict[str, Any]:
  config = ctx.config
  methods = methods_lib.gradient(config.eval.methods)
  need = [m for m in methods if methods_lib.switches(m).correction]
  if need and not config.gradients.correction:
    raise ValueError(f"gradients.correction is off but methods {need} need it")
  eng = ctx.engine
  cov = proj.coverage(eng.plan, ctx.trained[1].params)
  logging.info("%s", proj.format_coverage(cov))
  _, queries = ctx.arrays
  t0 = time.time()
  q = eng.featurizer(tokens_nt=queries.tokens_nl, mask_nt=queries.loss_mask_nl,
                     ids=queries.ids, desc="gradients: queries")
  t_q = time.time() - t0
  if q["bad_ids"]:
    logging.warning("%d queries have non-finite gradients: %s", len(q["bad_ids"]),
                    q["bad_ids"][:10])
  facts_by_id = {f["fact_id"]: f for f in ctx.world.facts}
  facts_q = [facts_by_id[f] for f in queries.fact_ids]
  split = protocol.query_split(config, facts_q)
  dev_rows = np.setdiff1d(np.flatnonzero(split == protocol.DEV), q["bad_rows"])
  if not len(dev_rows):
    raise ValueError("no dev queries: R_eval and every tuned choice need them; raise "
                     f"eval.dev_fraction (now {config.eval.dev_fraction})")
  # R_train's sample, and the pool the dev sweep ranks: a uniform sample drawn apart
  # from R's plus the dev queries' ground truth where the corpus can place it without
  # reading (`featurize.sweep_pool_sample`; at the default scale both are the whole
  # corpus). Their union is featurised once.
  corpus = ctx.corpus
  sample = featurize.hessian_sample(config, len(corpus))
  gt = {r for d in dev_rows for r in map(corpus.row_of, facts_q[d]["passage_ids"])
        if r is not None}
  pool = np.union1d(featurize.sweep_pool_sample(config, len(corpus)),
                    np.fromiter(gt, np.int64, len(gt)))
  need = np.union1d(sample, pool)
  mine = need[jax.process_index()::jax.process_count()]  # Each process a share.
  t0 = time.time()
  ids, tok = ctx.corpus_rows(mine)  # Read from the corpus (streamed: only these rows).
  p = eng.featurizer(tokens_nt=tok, mask_nt=(tok != 0).astype(np.float32), ids=ids,
                     desc="gradients: R_train sample and dev pool")
  t_p = time.time() - t0
  ok_p = np.setdiff1d(np.arange(len(mine)), p["bad_rows"])
  in_sample = ok_p[np.isin(mine[ok_p], sample)]
  in_pool = ok_p[np.isin(mine[ok_p], pool)]
  variants = methods_lib.variants(methods)
  n_sample = int(distributed.sum_across_processes(np.array([len(in_sample)], np.float64))[0])
  # The dimension each estimated R has: d, or the largest block's with a block-diagonal R.
  r_dim = (max(b.dim for b in eng.plan.blocks) if config.hessian.block_diagonal
           else eng.plan.dim)
  if n_sample < 4 * r_dim:
    logging.warning("R_train is estimated from %d passages for R of dimension %d (fewer than "
                    "4 × that): lower gradients.k_in/k_out or use hessian.block_diagonal",
                    n_sample, r_dim)
  mine_ids = [ids[i] for i in in_pool]
  dev = featurize.DevPool(
      queries={v: q[v][dev_rows] for v in variants},
      pool={v: p[v][in_pool] for v in variants},
      relevant_qp=np.array([np.isin(mine_ids, facts_q[r]["passage_ids"]) for r in dev_rows],
                           bool).reshape(len(dev_rows), len(mine_ids)))
  t0 = time.time()
  fit = featurize.fit_whiteners(
      config, methods=methods, queries={v: q[v][dev_rows] for v in variants},
      train={v: p[v][in_sample] for v in variants},
      block_sizes=[b.dim for b in eng.plan.blocks], dev=dev)
  t_h = time.time() - t0
  if not distributed.is_leader():
    return {}  # Process 0 writes; every process computed the same whiteners.
  whiteners = fit.whiteners
  for v in variants:
    fs.save_npy(os.path.join(out_dir, f"queries_{v}.npy"), q[v])
    fs.save_npy(os.path.join(out_dir, f"r_train_{v}.npy"), fit.r_train[v].astype(np.float32))
    fs.save_npy(os.path.join(out_dir, f"r_eval_{v}.npy"), fit.r_eval[v].astype(np.float32))
  fs.save_npy(os.path.join(out_dir, "query_loss.npy"), q["loss"])
  for table in methods_lib.table_groups(methods):
    w = whiteners.matrices[table]
    if w is not None:
      fs.save_npy(os.path.join(out_dir, f"whitener_{table}.npy"), w)
    final = whiteners.transform(method=table,
                                vectors_nd=q[methods_lib.switches(table).variant])
    fs.save_npy(os.path.join(out_dir, f"queries_final_{table}.npy"), final)
  wd.write_json(os.path.join(out_dir, "query_ids.json"), queries.ids)
  wd.write_json(os.path.join(out_dir, COVERAGE), cov)
  wd.write_json(os.path.join(out_dir, "split.json"),
                {"query_ids": queries.ids, "split": [str(x) for x in split]})
  logging.info("gradients: d=%d, λ=%s, damping %s, queries %.1fs, pool %.1fs, hessian %.1fs",
               eng.plan.dim, whiteners.lam, whiteners.damping, t_q, t_p, t_h)
  return {
      "d": eng.plan.dim, "blocks": [(b.name, b.dim, len(b.members)) for b in eng.plan.blocks],
      "lambda": whiteners.lam, "lambda_choice": whiteners.lambda_info,
      "damping": whiteners.damping, "damping_sweep": fit.sweep,
      "num_queries": len(queries.ids), "dev_queries": int(len(dev_rows)),
      "test_queries": int((split == protocol.TEST).sum()),
      "train_samples": n_sample, "r_dim": r_dim, "samples_per_dim": n_sample / r_dim,
      "block_diagonal": bool(config.hessian.block_diagonal),
      "dev_pool": int(len(pool)),
      "dev_pool_in_r_sample": float(np.isin(pool, sample).mean()) if len(pool) else 0.0,
      "bad_query_ids": q["bad_ids"],
      "bad_sample_ids_process0": p["bad_ids"], "processes": jax.process_count(),
      "correction_members": eng.correction_counts,
      "checkpoint_step": eng.step, "kernel": config.gradients.kernel,
      "timings_s": {"queries": t_q, "train_sample": t_p, "hessian": t_h},
  }


@dataclasses.dataclass
class Outputs:
  """What the stage committed, read back."""
  folder: str
  summary: dict[str, Any]

  @property
  def d(self) -> int:
    return self.summary["d"]

  def whitener(self, table: str) -> np.ndarray | None:
    """R^{-1/2} of a table's methods (None: the methods use no R)."""
    path = os.path.join(self.folder, f"whitener_{table}.npy")
    return verify.load_npy(self.folder, os.path.basename(path)) if fs.exists(path) else None

  def split(self) -> dict[str, str]:
    """query id -> 'dev' | 'test' (`tda.protocol`), as the stage chose it."""
    s = wd.read_json(os.path.join(self.folder, "split.json"))
    return dict(zip(s["query_ids"], s["split"]))

  def query_ids(self) -> list[str]:
    """The queries' ids, in the order of the rows of `queries` and `final_queries`."""
    return wd.read_json(os.path.join(self.folder, "query_ids.json"))

  def queries(self, variant: str) -> np.ndarray:
    """[Q, d] the queries' projected vectors of a variant ('raw' | 'corrected'),
    before any R or normalisation."""
    return verify.load_npy(self.folder, f"queries_{variant}.npy")

  def r_train(self, variant: str) -> np.ndarray:
    """[d, d] the R_train the run fitted for a variant."""
    return verify.load_npy(self.folder, f"r_train_{variant}.npy")

  def final_queries(self, table: str) -> np.ndarray:
    """[Q, d] the queries' final vectors for searching `table`."""
    return verify.load_npy(self.folder, f"queries_final_{table}.npy")


def load(ctx) -> Outputs:
  return Outputs(folder=ctx.stage_dir(STAGE), summary=ctx.summary(STAGE))

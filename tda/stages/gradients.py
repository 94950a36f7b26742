"""Stage 'gradients' (small, once): the queries' projected per-example gradients and
a sample of training passages', in the uncorrected and the corrected variant from
one forward/backward (`tda.featurize`); R_train and R_eval per variant; λ; each
method's whitening matrix R^{-1/2} (`tda.hessian`); and each method's final query
vectors, one set per table (methods with identical transforms share a table).

Also commits `coverage.json` (`tda.projection.coverage`: which parameters are
attributed, by kind, and which are not and why), logged on every run.

Every process featurises its share of the R_train sample; R_train is summed
across processes; process 0 writes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import jax
import numpy as np

from tda import distributed
from tda import featurize
from tda import fs
from tda import methods as methods_lib
from tda import projection as proj
from tda import workdir as wd

STAGE = "gradients"
ALL_PROCESSES = True
NEEDS_MODEL = True
COVERAGE = "coverage.json"


def fingerprint(ctx) -> dict[str, Any]:
  c = ctx.config
  return {"gradients": c.gradients.to_dict(), "hessian": c.hessian.to_dict(),
          "methods": methods_lib.gradient(c.eval.methods), "train_step": ctx.checkpoint_step,
          "seq_len": c.data.seq_len, "upstream": ctx.upstream(
              "world", "vocab", "train",
              *(("second_moments",) if c.gradients.v_source == "estimate" else ()))}


def run(ctx, out_dir: str) -> dict[str, Any]:
  config = ctx.config
  methods = methods_lib.gradient(config.eval.methods)
  need = [m for m in methods if methods_lib.switches(m).correction]
  if need and not config.gradients.correction:
    raise ValueError(f"gradients.correction is off but methods {need} need it")
  eng = ctx.engine
  cov = proj.coverage(eng.plan, ctx.trained[1].params)
  logging.info("%s", proj.format_coverage(cov))
  corpus, queries = ctx.arrays
  t0 = time.time()
  q = eng.featurizer(tokens_nt=queries.tokens_nl, mask_nt=queries.loss_mask_nl,
                     ids=queries.ids)
  t_q = time.time() - t0
  if q["bad_ids"]:
    logging.warning("%d queries have non-finite gradients: %s", len(q["bad_ids"]),
                    q["bad_ids"][:10])
  sample = featurize.hessian_sample(config, len(corpus.ids))
  mine = sample[jax.process_index()::jax.process_count()]  # R_train: each process a share.
  t0 = time.time()
  p = eng.featurizer(tokens_nt=corpus.tokens_nt[mine],
                     mask_nt=(corpus.tokens_nt[mine] != 0).astype(np.float32),
                     ids=[corpus.ids[i] for i in mine])
  t_p = time.time() - t0
  keep_q = np.setdiff1d(np.arange(len(queries.ids)), q["bad_rows"])
  keep_p = np.setdiff1d(np.arange(len(mine)), p["bad_rows"])
  variants = methods_lib.variants(methods)
  t0 = time.time()
  fit = featurize.fit_whiteners(
      config, methods=methods, queries={v: q[v][keep_q] for v in variants},
      train={v: p[v][keep_p] for v in variants},
      block_sizes=[b.dim for b in eng.plan.blocks])
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
  logging.info("gradients: d=%d, λ=%s, queries %.1fs, R sample %.1fs, hessian %.1fs",
               eng.plan.dim, whiteners.lam, t_q, t_p, t_h)
  return {
      "d": eng.plan.dim, "blocks": [(b.name, b.dim, len(b.members)) for b in eng.plan.blocks],
      "lambda": whiteners.lam, "num_queries": len(queries.ids),
      "train_samples": int(len(sample)), "bad_query_ids": q["bad_ids"],
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
    return fs.load_npy(path) if fs.exists(path) else None

  def final_queries(self, table: str) -> np.ndarray:
    """[Q, d] the queries' final vectors for searching `table`."""
    return fs.load_npy(os.path.join(self.folder, f"queries_final_{table}.npy"))


def load(ctx) -> Outputs:
  return Outputs(folder=ctx.stage_dir(STAGE), summary=ctx.summary(STAGE))

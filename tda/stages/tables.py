"""Stage 'tables' (the corpus pass, DESIGN.md §4): every passage once through the
gradient kernel; each gradient method's final vector (whitened, unit) goes to its
table (`tda.tables`: sharded zarr3, one commit record per shard).

The expensive part (the kernel) is shared by all methods: they differ only in the
cheap downstream transform, and methods with identical transforms share one
table. Each process featurises the shards it owns; an interrupted run resumes at
the first uncommitted shard (RESUMABLE). Rows whose gradient is NaN/Inf are
logged with their example id, written as zero vectors and listed in the summary
(`excluded_ids`); retrieval never returns them.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import numpy as np

from tda import config as config_lib
from tda import distributed
from tda import hessian
from tda import methods as methods_lib
from tda import progress
from tda import tables as tables_lib
from tda import workdir as wd

STAGE = "tables"
ALL_PROCESSES = True
RESUMABLE = True
NEEDS_MODEL = True


def fingerprint(ctx) -> dict[str, Any]:
  c = ctx.config
  return {"tables": c.tables.to_dict(), "gradients": c.gradients.to_dict(),
          "methods": methods_lib.gradient(c.eval.methods), "seq_len": c.data.seq_len,
          "upstream": ctx.upstream("world", "vocab", "train", "gradients")}


def meta(ctx, table: str) -> dict[str, Any]:
  """What a table is computed from; queries are refused against other tables."""
  c = ctx.config
  return {"method": table, "config_hash": config_lib.config_hash(
              c, "gradients", "hessian", "model", "train", "world", "data"),
          "checkpoint_step": ctx.checkpoint_step, "projection_seed": c.gradients.seed,
          "d": ctx.gradients.d}


def run(ctx, out_dir: str) -> dict[str, Any]:
  config = ctx.config
  groups = methods_lib.table_groups(config.eval.methods)
  corpus, _ = ctx.arrays
  eng = ctx.engine
  t = config.tables
  pidx, nproc = jax.process_index(), jax.process_count()
  writers = {name: tables_lib.TableWriter(
      path=os.path.join(out_dir, name), d=eng.plan.dim, dtype=t.dtype,
      rows_per_shard=t.rows_per_shard, meta=meta(ctx, name),
      process_index=pidx, num_processes=nproc) for name in groups}
  whiteners = {name: ctx.gradients.whitener(name) for name in groups}
  n = len(corpus.ids)
  rps = t.rows_per_shard
  n_shards = -(-n // rps)
  bad_ids: list[str] = []
  t0, rows_done = time.time(), 0
  mine = range(pidx, n_shards, nproc)
  todo = [s for s in mine if not all(s in w.committed for w in writers.values())]
  bar = progress.start(total=sum(min((s + 1) * rps, n) - s * rps for s in todo),
                       desc="tables", unit="passage")
  for s in todo:
    lo, hi = s * rps, min((s + 1) * rps, n)
    tok = corpus.tokens_nt[lo:hi]
    ids = corpus.ids[lo:hi]
    f = eng.featurizer(tokens_nt=tok, mask_nt=(tok != 0).astype(np.float32), ids=ids)
    bad_ids += f["bad_ids"]
    for name, w in writers.items():
      spec = methods_lib.switches(name)
      x = hessian.apply(vectors_nd=f[spec.variant], whitener=whiteners[name], unit=spec.unit)
      x[f["bad_rows"]] = 0.0
      w.write(x, ids, start_row=lo)
    rows_done += hi - lo
    bar.update(hi - lo)
  bar.close()
  if bad_ids:
    logging.warning("%d passages have non-finite gradients (zeroed, excluded from "
                    "retrieval): %s", len(bad_ids), bad_ids[:10])
  for w in writers.values():
    w.close()
  wd.write_json(os.path.join(out_dir, f"excluded.{pidx}.json"), bad_ids)
  wall = time.time() - t0
  distributed.barrier("tda-tables-written")
  if not distributed.is_leader():
    return {}
  if nproc > 1:
    for name in groups:
      tables_lib.finalize_table(path=os.path.join(out_dir, name), num_shards=n_shards)
  bad_ids = sum((wd.read_json(os.path.join(out_dir, f"excluded.{i}.json"))
                 for i in range(nproc)), [])
  return {"tables": dict(groups), "rows": n, "d": eng.plan.dim, "dtype": t.dtype,
          "excluded_ids": bad_ids, "processes": nproc,
          "featurised_rows_this_run_process0": rows_done, "wall_s": wall,
          "rows_per_s_process0": rows_done / max(wall, 1e-9)}


REPAIR = ("To recompute only the bad shard(s): python -m tda.verify --workdir={workdir} "
          "--repair (deletes them and reopens the tables stage), then rerun the tables stage.")


def load(ctx, name: str) -> tables_lib.Table:
  """The committed table `name`, opened with the meta it must have; every shard is
  checked against its commit record as it is read (and unit norms, if unit)."""
  return tables_lib.Table.open(os.path.join(ctx.stage_dir(STAGE), name),
                               expect=meta(ctx, name),
                               unit_norm=methods_lib.switches(name).unit,
                               advice=REPAIR.format(workdir=ctx.workdir))


def excluded_ids(ctx) -> set[str]:
  """Passages whose gradients were non-finite (never returned by retrieval)."""
  return set(ctx.summary(STAGE)["excluded_ids"])

"""Stage 'tables' (the corpus pass, DESIGN.md §4): every passage once through the
gradient kernel; each gradient method's final vector (whitened, unit) goes to its
table (`tda.tables`: sharded zarr3, one commit record per shard).

The expensive part (the kernel) is shared by all methods: they differ only in the
cheap downstream transform, and methods with identical transforms share one
table. The corpus is read through `ctx.corpus` (`tda.corpus`: the world in memory,
or a streamed tfds/seqio/JSONL source), one shard of `tables.rows_per_shard` rows
at a time, so memory does not grow with the corpus. Each process reads and
featurises only the shards it owns; an interrupted run resumes at the first
uncommitted shard (RESUMABLE), and per-shard notes (truncations, non-finite
rows) are written before a shard commits, so the summary counts every shard. Rows whose gradient is NaN/Inf are
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
from tda import corpus as corpus_lib
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
  fp = {"tables": c.tables.to_dict(), "gradients": c.gradients.to_dict(),
        "methods": methods_lib.gradient(c.eval.methods), "seq_len": c.data.seq_len,
        "upstream": ctx.upstream("world", "vocab", "train", "gradients")}
  if corpus_lib.streamed(c):
    fp["corpus"] = ctx.corpus.fingerprint()
  return fp


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
  corpus = ctx.corpus
  eng = ctx.engine
  t = config.tables
  pidx, nproc = jax.process_index(), jax.process_count()
  writers = {name: tables_lib.TableWriter(
      path=os.path.join(out_dir, name), d=eng.plan.dim, dtype=t.dtype,
      rows_per_shard=t.rows_per_shard, meta=meta(ctx, name),
      process_index=pidx, num_processes=nproc) for name in groups}
  whiteners = {name: ctx.gradients.whitener(name) for name in groups}
  n = len(corpus)
  rps = t.rows_per_shard
  n_shards = -(-n // rps)
  bad_ids: list[str] = []
  t0, rows_done = time.time(), 0
  # This process's shards only, one at a time: memory does not grow with the corpus.
  todo = [(s, lo, hi) for s, lo, hi in corpus.shards(rps, pidx, nproc)
          if not all(s in w.committed for w in writers.values())]
  bar = progress.start(total=sum(hi - lo for _, lo, hi in todo), desc="tables",
                       unit="passage")
  for s, lo, hi in todo:
    rows = corpus.tokens(lo, hi, vocab=ctx.vocab, seq_len=config.data.seq_len)
    tok, ids = rows.tokens_nt, rows.ids
    f = eng.featurizer(tokens_nt=tok, mask_nt=(tok != 0).astype(np.float32), ids=ids)
    bad_ids += f["bad_ids"]
    # Before the shard commits, so a resumed run that skips it still counts it.
    wd.write_json(os.path.join(out_dir, f"shard_notes.{s}.json"),
                  {"truncated": rows.n_truncated, "excluded_ids": f["bad_ids"]})
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
  wall = time.time() - t0
  distributed.barrier("tda-tables-written")
  if not distributed.is_leader():
    return {}
  if nproc > 1:
    for name in groups:
      tables_lib.finalize_table(path=os.path.join(out_dir, name), num_shards=n_shards)
  notes = [wd.read_json(os.path.join(out_dir, f"shard_notes.{s}.json"))
           for s in range(n_shards)]
  bad_ids = sum((x["excluded_ids"] for x in notes), [])
  n_truncated = sum(x["truncated"] for x in notes)
  if n_truncated:
    logging.warning("tables: %d of %d passages exceed data.seq_len=%d tokens (EOS included) "
                    "and were truncated", n_truncated, n, config.data.seq_len)
  return {"tables": dict(groups), "rows": n, "d": eng.plan.dim, "dtype": t.dtype,
          "corpus": corpus.fingerprint(), "n_truncated_passages": n_truncated,
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

"""The pipeline: runs the configured stages in order over one workdir.

    world ─► vocab ─► train ─► second_moments (V: checkpoint | estimate) ─► model_eval
          ─► gradients (queries, R) ─► tables ─► retrieval ─► evaluation ─► viewer

Each stage is a module of `tda.stages` behind one protocol (see there); this is
the only place that drives it, once for all stages: fingerprint → skip if
committed with the same fingerprint (refuse if committed from another setup) →
run into `<stage>/` → commit by writing its marker last (`tda.workdir`) → publish the
stage's `results/` files into `<workdir>/results/`. An interrupted run resumes;
a finished one costs nothing to rerun. Per-stage wall times accumulate in
`<workdir>/results/timings.json`.

Multi-process jobs: a stage runs on process 0 only unless it declares
ALL_PROCESSES; process 0 prepares and commits, with barriers around both.
"""

from __future__ import annotations

import logging
import os
import time

import jax
import ml_collections

from tda import context as context_lib
from tda import distributed
from tda import errors
from tda import faults
from tda import fs
from tda import methods as methods_lib
from tda import stages as stages_lib
from tda import workdir as wd


def stages_of(config: ml_collections.ConfigDict) -> list:
  """The stage modules `config.stages` selects, in pipeline order."""
  if config.stages.strip() == "all":
    return list(stages_lib.STAGES)
  names = [s.strip() for s in config.stages.split(",") if s.strip()]
  unknown = [s for s in names if s not in stages_lib.NAMES]
  if unknown:
    raise errors.UserError(f"unknown stage(s) {unknown} in config.stages; known: "
                     f"{list(stages_lib.NAMES)}")
  return [s for s in stages_lib.STAGES if s.STAGE in names]


def run_stage(ctx: context_lib.Context, stage) -> bool:
  """Runs one stage under the protocol; returns False when it was skipped."""
  name, leader = stage.STAGE, distributed.is_leader()
  fingerprint = stage.fingerprint(ctx)
  skip = wd.check_fingerprint(ctx.workdir, name, fingerprint)
  if not skip:
    if jax.process_count() > 1 and getattr(stage, "NEEDS_MODEL", False):
      ctx.trained  # Restoring is collective: every process restores, once.
    resumable = getattr(stage, "RESUMABLE", False)
    if leader:
      wd.begin(ctx.workdir, name, fingerprint, resumable=resumable)
    distributed.barrier(f"tda-begin-{name}")
    summary = None
    if leader or getattr(stage, "ALL_PROCESSES", False):
      summary = stage.run(ctx, wd.stage_dir(ctx.workdir, name))
    faults.point(name, "commit")
    distributed.barrier(f"tda-ran-{name}")
    if leader:
      wd.commit(ctx.workdir, name, fingerprint, summary)
  if leader:
    results = os.path.join(wd.stage_dir(ctx.workdir, name), "results")
    if fs.isdir(results) and (not skip or not fs.isdir(ctx.results_dir)):
      wd.publish(results, ctx.results_dir)
  distributed.barrier(f"tda-stage-{name}")
  return not skip


def verify_skipped(ctx: context_lib.Context, stage) -> None:
  """A stage named in `config.stages` but committed already is verified instead of
  silently skipped: every byte of it and of the stages before it (what it reads),
  each stage once per run (`tda.verify.verify_stage`).

  Raises:
    verify.ArtefactCorrupted: a stage's files (or a table shard) differ from their
      commit records; the message names each difference.
  """
  from tda import verify  # pylint: disable=g-import-not-at-top
  done = ctx.cached("verified_stages", set)
  for s in stages_lib.NAMES[:stages_lib.NAMES.index(stage.STAGE) + 1]:
    if s in done or wd.committed(ctx.workdir, s) is None:
      continue
    v = verify.verify_stage(ctx.workdir, s)
    done.add(s)
    logging.info("verify (stage '%s' was named and is committed): %s", stage.STAGE, v.line())
    if v.status == "FAILED":
      raise verify.ArtefactCorrupted(
          f"stage '{stage.STAGE}' is committed, but what it was computed from no longer "
          f"matches its commit record: {v.line()}. See python -m tda.verify "
          f"--workdir={ctx.workdir} (--repair for table shards).")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Runs every configured stage; returns this run's per-stage wall times."""
  logging.info("tda: process %d of %d, %d local / %d global devices (%s)",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].platform)
  stages = stages_of(config)
  methods_lib.check(config.eval.methods)
  fs.check_scheme(workdir)
  fs.makedirs(workdir)
  ctx = context_lib.Context(config=config, workdir=workdir)
  named = config.stages != "all"
  for stage in stages:
    t0 = time.time()
    logging.info("stage %s ...", stage.STAGE)
    ran = run_stage(ctx, stage)
    if named and not ran and distributed.is_leader():
      verify_skipped(ctx, stage)
    ctx.timings[stage.STAGE] = round(time.time() - t0, 3)
    logging.info("stage %s %s in %.1f s", stage.STAGE, "done" if ran else "skipped (committed)",
                 ctx.timings[stage.STAGE])
  if not distributed.is_leader():
    return ctx.timings
  fs.makedirs(ctx.results_dir)
  path = os.path.join(ctx.results_dir, "timings.json")
  history = wd.read_json(path) if fs.exists(path) else {"runs": []}
  history["runs"].append(ctx.timings)
  history["last"] = ctx.timings
  wd.write_json(path, history)
  return ctx.timings

"""The pipeline: runs the configured stages in order over one workdir.

    world ─► vocab ─► train ─► model_eval ─► gradients (queries, R) ─► tables
          ─► retrieval ─► evaluation ─► viewer

Every stage commits its output atomically (`tda.workdir`) and is skipped when
already committed from the same inputs, so an interrupted run resumes and a
finished one costs nothing to rerun. Per-stage wall times accumulate in
`<workdir>/results/timings.json`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from typing import Any

import jax
import ml_collections

from tda import config as config_lib
from tda import distributed
from tda import workdir as wd


@dataclasses.dataclass
class Context:
  """What later stages read from earlier ones (loaded lazily, once)."""
  config: ml_collections.ConfigDict
  workdir: str
  timings: dict[str, float] = dataclasses.field(default_factory=dict)
  _cache: dict[str, Any] = dataclasses.field(default_factory=dict)

  def get(self, key: str, make):
    if key not in self._cache:
      self._cache[key] = make()
    return self._cache[key]

  @property
  def world(self):
    from tda import world
    return self.get("world", lambda: world.load_world(self.workdir))

  @property
  def vocab_path(self) -> str:
    from tda import data
    return self.get("vocab_path", lambda: data.build_vocab(self.config, self.workdir))

  @property
  def vocab(self):
    from tda import data
    return self.get("vocab", lambda: data.get_vocabulary(self.vocab_path))

  @property
  def arrays(self):
    from tda import data
    return self.get("arrays", lambda: data.load_world(self.config, self.workdir, self.vocab_path))

  @property
  def trained(self):
    from tda import train
    return self.get("trained", lambda: train.load_trained(self.config, self.workdir))


def stages_of(config: ml_collections.ConfigDict) -> list[str]:
  stages = [s.strip() for s in config.stages.split(",") if s.strip()]
  unknown = [s for s in stages if s not in config_lib.ALL_STAGES]
  if unknown:
    raise ValueError(f"unknown stage(s) {unknown} in config.stages; known: "
                     f"{list(config_lib.ALL_STAGES)}")
  return [s for s in config_lib.ALL_STAGES if s in stages]


@contextlib.contextmanager
def _timed(ctx: Context, stage: str):
  t0 = time.time()
  logging.info("stage %s ...", stage)
  yield
  ctx.timings[stage] = round(time.time() - t0, 3)
  logging.info("stage %s done in %.1f s", stage, ctx.timings[stage])


def _stage_world(ctx: Context):
  from tda import world
  return world.build_world(ctx.config, ctx.workdir)


def _stage_vocab(ctx: Context):
  return ctx.vocab_path


def _stage_train(ctx: Context):
  from tda import train
  fingerprint = train.fingerprint(ctx.config)
  if wd.committed(ctx.workdir, train.STAGE) is not None:
    if wd.check_fingerprint(ctx.workdir, train.STAGE, fingerprint):
      return None
  corpus, _ = ctx.arrays
  summary = train.train(ctx.config, ctx.workdir, tokens_nt=corpus.tokens_nt)
  summary["n_truncated_passages"] = corpus.n_truncated
  train.commit(ctx.workdir, fingerprint, summary)
  return summary


def _stage_model_eval(ctx: Context):
  from tda import model_eval
  return model_eval.run_stage(ctx)


def _stage_gradients(ctx: Context):
  from tda import featurize
  return featurize.run_gradients_stage(ctx)


def _stage_tables(ctx: Context):
  from tda import featurize
  return featurize.run_tables_stage(ctx)


def _stage_retrieval(ctx: Context):
  from tda import retrieval
  return retrieval.run_stage(ctx)


def _stage_evaluation(ctx: Context):
  from tda import evaluation
  return evaluation.run_stage(ctx)


def _stage_viewer(ctx: Context):
  from tda import viewer
  return viewer.write_viewer(workdir=ctx.workdir)


# Stages every process runs (each its share); the others run on process 0 only.
_ALL_PROCESSES = ("gradients", "tables")
_NEEDS_MODEL = ("model_eval", "gradients", "evaluation")

_STAGES = {"world": _stage_world, "vocab": _stage_vocab, "train": _stage_train,
           "model_eval": _stage_model_eval, "gradients": _stage_gradients,
           "tables": _stage_tables, "retrieval": _stage_retrieval,
           "evaluation": _stage_evaluation, "viewer": _stage_viewer}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Runs every configured stage; returns this run's per-stage wall times."""
  logging.info("tda: process %d of %d, %d local / %d global devices (%s)",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].platform)
  os.makedirs(workdir, exist_ok=True)
  ctx = Context(config=config, workdir=workdir)
  for stage in stages_of(config):
    with _timed(ctx, stage):
      if jax.process_count() > 1 and stage in _NEEDS_MODEL and stage != "train":
        ctx.trained  # Restoring is collective: every process restores, once.
      if stage in _ALL_PROCESSES or distributed.is_leader():
        _STAGES[stage](ctx)
    distributed.barrier(f"tda-stage-{stage}")
  if not distributed.is_leader():
    return ctx.timings
  results = os.path.join(workdir, "results")
  os.makedirs(results, exist_ok=True)
  path = os.path.join(results, "timings.json")
  history = wd.read_json(path) if os.path.exists(path) else {"runs": []}
  history["runs"].append(ctx.timings)
  history["last"] = ctx.timings
  wd.write_json(path, history)
  return ctx.timings

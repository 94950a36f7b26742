"""Stage 'second_moments': where the optimizer correction's V comes from.

`gradients.v_source='checkpoint'` (default): the checkpoint's own optimizer state;
nothing is computed, the summary records that. `'estimate'` (checkpoints without an
optimizer state): Adafactor-style second-moment statistics of per-example gradients
over a seeded sample of `gradients.v_estimate_samples` corpus passages
(`tda.v_estimate`), written to `v_estimate.npz`; `ctx.second_moments` reads it back
as an optax state and `ctx.engine` corrects with it.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from tda import model as model_lib
from tda import v_estimate

STAGE = "second_moments"
NEEDS_MODEL = True
ESTIMATE = "v_estimate.npz"
SOURCES = ("checkpoint", "estimate")


def _source(config) -> str:
  src = config.gradients.v_source
  if src not in SOURCES:
    raise ValueError(f"gradients.v_source must be one of {SOURCES}, got {src!r}")
  return src


def fingerprint(ctx) -> dict[str, Any]:
  c = ctx.config
  fp = {"v_source": _source(c), "train_step": ctx.checkpoint_step,
        "upstream": ctx.upstream("train")}
  if fp["v_source"] == "estimate":
    fp.update({"v_estimate_samples": c.gradients.v_estimate_samples, "seed": c.seed,
               "optimizer": c.train.optimizer,
               "min_dim_size_to_factor": c.train.min_dim_size_to_factor,
               "seq_len": c.data.seq_len,
               "upstream": ctx.upstream("world", "vocab", "train")})
  return fp


def run(ctx, out_dir: str) -> dict[str, Any]:
  config = ctx.config
  if _source(config) == "checkpoint":
    return {"v_source": "checkpoint", "checkpoint_step": ctx.checkpoint_step,
            "note": "the checkpoint's optimizer state is used; nothing estimated"}
  model, state, _ = ctx.trained
  rows = v_estimate.sample_rows(config, len(ctx.corpus))
  _, tokens_nt = ctx.corpus_rows(rows)  # Streamed corpora: only these rows are read.
  factored = config.train.optimizer == "adafactor"
  t0 = time.time()
  stats = v_estimate.estimate(
      model=model, params=state.params, tokens_nt=tokens_nt,
      batch_size=config.gradients.batch_size,
      min_dim_size_to_factor=config.train.min_dim_size_to_factor, factored=factored,
      length_bucket=config.gradients.length_bucket)
  wall = time.time() - t0
  v_estimate.save(os.path.join(out_dir, ESTIMATE), stats, factored=factored)
  n_factored = sum(v.shape != (1,) for v in stats["v_row"].values())
  logging.info("second_moments: V estimated on %d passages in %.1f s (%d factored, %d full)",
               len(rows), wall, n_factored, len(stats["v"]) - n_factored)
  return {"v_source": "estimate", "checkpoint_step": ctx.checkpoint_step,
          "samples": int(len(rows)), "factored": factored,
          "factored_params": int(n_factored), "full_params": int(len(stats["v"]) - n_factored),
          "num_params": model_lib.count_params(state.params), "wall_s": wall}


def load(ctx):
  """The optax state to read V from (None: the checkpoint's own optimizer state)."""
  if _source(ctx.config) == "checkpoint":
    return None
  return v_estimate.load(os.path.join(ctx.stage_dir(STAGE), ESTIMATE))

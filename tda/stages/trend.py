"""Stage 'trend': the paper's trend by model size (`tda.trend`).

Trains each smaller size of `trend.sizes` exactly like the attributed model (same
corpus, optimizer, schedule, batch size, steps and seed), then measures every
size, the attributed model included, the same way: query accuracy and TrackStar's
attribution over the full ranking, with 95% bootstrap CIs over queries. Publishes
`results/fig_trend.png`, `results/trend.md` (with the paper's trend judged by
paired CIs, `tda.trend.size_claims`; also in the summary's `claims`) and
`results/trend.csv`.

Resumable: a size's interrupted training resumes from its checkpoint. With
`trend.sizes = ()`, or an adopted `model.checkpoint` (not trained here, so no
size can be trained alike), nothing is trained or measured. Single-process only
(in a multi-process job it commits a summary saying it was skipped).
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax

from tda import figures
from tda import fs
from tda import train as train_lib
from tda import trend
from tda import workdir as wd

STAGE = "trend"
NEEDS_MODEL = True
RESUMABLE = True


def fingerprint(ctx) -> dict[str, Any]:
  c = ctx.config
  return {"trend": c.trend.to_dict(), "train": train_lib.fingerprint(c),
          "gradients": c.gradients.to_dict(), "hessian": c.hessian.to_dict(),
          "model_eval.batch_size": c.model_eval.batch_size, "seed": c.seed,
          "upstream": ctx.upstream("world", "vocab", "train", "second_moments", "gradients")}


def run(ctx, out_dir: str) -> dict[str, Any]:
  sizes = trend.parse_sizes(ctx.config.trend.sizes)  # Bad entries fail before training.
  if not sizes:
    return {"points": [], "skipped": "trend.sizes is empty"}
  if ctx.config.model.checkpoint:
    return {"points": [], "skipped": "model.checkpoint: the attributed model was not trained "
                                     "here, so no smaller size can be trained alike"}
  if jax.process_count() > 1:
    return {"points": [], "skipped": "multi-process job: the trend runs single-process"}
  t0 = time.time()
  points = trend.size_points(ctx, folder=os.path.join(out_dir, "models"))
  results = os.path.join(out_dir, "results")
  fs.makedirs(results)
  figures.plot_trend(points=points, path=os.path.join(results, "fig_trend.png"))
  judged = trend.size_claims(points, seed=ctx.config.seed)
  wd.write_text(os.path.join(results, "trend.md"), trend.table_markdown(points, judged))
  wd.write_text(os.path.join(results, "trend.csv"), trend.table_csv(points))
  return {"points": points, "claims": judged, "timings_s": {"trend": time.time() - t0}}


def load(ctx) -> list[dict[str, Any]]:
  """The committed trend points, smallest model first."""
  return ctx.summary(STAGE)["points"]

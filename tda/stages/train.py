"""Stage 'train': trains the model on the world's corpus (`tda.train`).

Writes `checkpoints/` (orbax: params, the full optimizer state, step and data
position). Resumable: an interrupted run continues from its newest checkpoint,
with exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import os
from typing import Any

from tda import train as train_lib

STAGE = "train"
RESUMABLE = True
CHECKPOINTS = "checkpoints"


def fingerprint(ctx) -> dict[str, Any]:
  return {**train_lib.fingerprint(ctx.config), "upstream": ctx.upstream("world", "vocab")}


def run(ctx, out_dir: str) -> dict[str, Any]:
  corpus, _ = ctx.arrays
  summary = train_lib.train(ctx.config, os.path.join(out_dir, CHECKPOINTS),
                            tokens_nt=corpus.tokens_nt)
  summary["n_truncated_passages"] = corpus.n_truncated
  return summary


def checkpoint_dir(ctx) -> str:
  """The committed checkpoints' folder."""
  return os.path.join(ctx.stage_dir(STAGE), CHECKPOINTS)

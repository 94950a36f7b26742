"""The pipeline's stages, one module each, in run order.

Every stage module exposes the one protocol `tda.pipeline` drives:

  STAGE          its name (the folder `<workdir>/<STAGE>/` it commits);
  fingerprint(ctx) -> dict
                 what its output depends on (config sections, upstream stages);
  run(ctx, out_dir) -> dict
                 computes its outputs into `out_dir` and returns its summary
                 (committed as `summary.json`); files under `out_dir/results/`
                 are published to `<workdir>/results/`;
  load(ctx, ...) how later stages read its outputs, through `tda.context`;

and, optionally, ALL_PROCESSES (every process runs it, each its share; default:
process 0 only), RESUMABLE (partial output survives an interruption and is
resumed) and NEEDS_MODEL (restores the checkpoint, a collective in multi-process
jobs). A new stage is one module here plus one line in `STAGES`.
"""

from tda.stages import evaluation
from tda.stages import gradients
from tda.stages import model_eval
from tda.stages import retrieval
from tda.stages import second_moments
from tda.stages import tables
from tda.stages import train
from tda.stages import trend
from tda.stages import viewer
from tda.stages import vocab
from tda.stages import world

STAGES = (world, vocab, train, second_moments, model_eval, gradients, tables, retrieval,
          evaluation, viewer, trend)
NAMES = tuple(s.STAGE for s in STAGES)

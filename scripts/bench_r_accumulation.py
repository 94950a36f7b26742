"""R_train accumulated on device in float32 vs the float64 reference, on a real run.

For a finished default run (its world, vocabulary and final checkpoint, read
only), featurises the R_train sample (`featurize.hessian_sample`, the rows the
'gradients' stage uses), accumulates R = Σ φφᵀ with `tda.hessian.autocorrelation`
(`hessian.r_accumulate` on a mesh of this process's devices, float32) and in
float64 numpy, and prints per variant: d, rows, devices, the largest entrywise
difference, its ratio to `hessian.r_error_bound`, the relative Frobenius error,
and the relative difference of R^{-1/2} at `hessian.damping`.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 \
        python scripts/bench_r_accumulation.py --workdir=W
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tda import context as context_lib  # pylint: disable=g-import-not-at-top
from tda import featurize
from tda import hessian
from tda import methods as methods_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished default run (read only).",
                               required=True)
_CONFIG = config_flags.DEFINE_config_file("config", "configs/trackstar_tiny.py",
                                          "The run's config file.", lock_config=True)


def main(_):
  config = _CONFIG.value
  ctx = context_lib.Context(config=config, workdir=_WORKDIR.value)
  model, state, _ = ctx.trained
  eng = featurize.make_engine(config, model=model, state=state)
  corpus = ctx.corpus
  rows = featurize.hessian_sample(config, len(corpus))
  ids, tok = ctx.corpus_rows(rows)
  p = eng.featurizer(tokens_nt=tok, mask_nt=(tok != 0).astype(np.float32), ids=ids)
  ok = np.setdiff1d(np.arange(len(ids)), p["bad_rows"])
  print(f"devices {len(jax.local_devices())}; mesh {dict(hessian.r_mesh().shape)}")
  print("variant      d   rows  max|dR|      max|dR|/bound  rel_frob     rel_dW(R^-1/2)")
  for v in methods_lib.variants(methods_lib.gradient(config.eval.methods)):
    x = p[v][ok]
    r, n = hessian.autocorrelation(vectors_nd=x)
    ref = x.astype(np.float64).T @ x.astype(np.float64)
    diff = np.abs(r - ref)
    bound = hessian.r_error_bound(r_dd=ref, n=n)
    w = hessian.inv_sqrt(r_dd=r / n, damping=config.hessian.damping)
    w_ref = hessian.inv_sqrt(r_dd=ref / n, damping=config.hessian.damping)
    print(f"{v:10} {x.shape[1]:5d} {n:6d}  {diff.max():.3e}    {(diff / bound).max():.4f}"
          f"         {np.linalg.norm(r - ref) / np.linalg.norm(ref):.3e}    "
          f"{np.linalg.norm(w - w_ref) / np.linalg.norm(w_ref):.3e}")


if __name__ == "__main__":
  app.run(main)

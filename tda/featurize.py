"""The gradient engine of one checkpoint: the projection plan and matrices, the
optimizer correction, and the featurizer that runs a kernel over many examples;
and the fit of R and each method's whitening from featurised vectors.

Used by the 'gradients' and 'tables' stages and the model-quality trend, so all
three compute G(z) the same way.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from tda import correction as corr_lib
from tda import distributed
from tda import gradients as grad_lib
from tda import hessian
from tda import methods as methods_lib
from tda import projection as proj
from tda import sharding


@dataclasses.dataclass
class Engine:
  """Everything the kernels need, built once per run from the checkpoint."""
  plan: proj.Plan
  featurizer: grad_lib.Featurizer
  step: int
  correction_counts: dict[str, int]


def plan_from_config(config, param_shapes) -> proj.Plan:
  """The projection plan the `gradients` config section asks for, over these params."""
  g = config.gradients
  return proj.make_plan(param_shapes=param_shapes, pooling=g.pooling, k_in=g.k_in,
                        k_out=g.k_out, layers_per_block=g.layers_per_block,
                        groups=g.groups, embed_block=g.embed_block)


def make_engine(config, *, model, state, variants=None) -> Engine:
  """The kernel set-up for one checkpoint (model, params and optimizer state)."""
  g = config.gradients
  plan = plan_from_config(config, state.params)
  mats = proj.plan_matrices(seed=g.seed, plan=plan)
  corrs = (corr_lib.member_corrections(opt_state=state.opt_state, plan=plan, eps=g.eps,
                                       adam_v=g.adam_v) if g.correction else None)
  feat = grad_lib.Featurizer(model=model, params=state.params, plan=plan, mats=mats,
                             corrs=corrs,
                             # Per process: each featurises its own rows on its own devices.
                             mesh=sharding.make_mesh(config, devices=jax.local_devices()),
                             batch_size=g.batch_size, kernel=g.kernel,
                             bucket=g.length_bucket, variants=variants)
  return Engine(plan=plan, featurizer=feat, step=state.step,
                correction_counts=corr_lib.describe(corrs) if corrs else {})


def hessian_sample(config, n: int) -> np.ndarray:
  """The sorted, seeded rows of an n-passage corpus that R_train is estimated on."""
  rng = np.random.default_rng(config.seed)
  return np.sort(rng.choice(n, size=min(config.hessian.train_samples, n), replace=False))


@dataclasses.dataclass
class Fit:
  """R_train and R_eval per variant (mean autocorrelations) and the whiteners."""
  r_train: dict[str, np.ndarray]
  r_eval: dict[str, np.ndarray]
  whiteners: hessian.Whiteners


def fit_whiteners(config, *, methods, queries: dict[str, np.ndarray],
                  train: dict[str, np.ndarray], block_sizes=None) -> Fit:
  """R_train (summed over every process's share of the sample), R_eval and each
  method's R^{-1/2}, from featurised vectors per variant (`config.hessian`).

  Args:
    config: the run config.
    methods: gradient method names.
    queries: variant -> [Q, d] query vectors (finite rows only).
    train: variant -> [n, d] this process's share of the R_train sample.
    block_sizes: projection block sizes, used when `hessian.block_diagonal`.
  """
  r_train, r_eval = {}, {}
  for v in methods_lib.variants(methods):
    s, cnt = hessian.autocorrelation(vectors_nd=train[v])
    total = distributed.sum_across_processes(np.append(s.ravel(), cnt))
    r_train[v] = total[:-1].reshape(s.shape) / max(total[-1], 1)
    s, cnt = hessian.autocorrelation(vectors_nd=queries[v])
    r_eval[v] = s / max(cnt, 1)
  h = config.hessian
  whiteners = hessian.build_whiteners(
      methods=methods, r_train=r_train, r_eval=r_eval,
      lam="auto" if h.lambda_auto else h.lambda_, damping=h.damping,
      top_k=h.auto_top_k, overlap=h.auto_overlap,
      block_sizes=block_sizes if h.block_diagonal else None)
  return Fit(r_train=r_train, r_eval=r_eval, whiteners=whiteners)

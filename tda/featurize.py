"""The gradient engine of one checkpoint: the projection plan and matrices, the
optimizer correction, and the featurizer that runs a kernel over many examples;
and the fit of R and each method's whitening from featurised vectors.

Used by the 'gradients' and 'tables' stages and the model-quality trend, so all
three compute G(z) the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import jax
import numpy as np

from tda import correction as corr_lib
from tda import distributed
from tda import gradients as grad_lib
from tda import hessian
from tda import methods as methods_lib
from tda import model as model_lib
from tda import progress
from tda import projection as proj
from tda import protocol
from tda import sharding


def correction_shardings(corrs, *, plan: proj.Plan, params, mesh, strict: bool = False):
  """NamedShardings for the correction records: a `FullCorrection` the size of its
  parameter is split as that parameter (`sharding.param_shardings`); the factored
  scales (vectors) and anything else are replicated."""
  if corrs is None:
    return None
  p_shardings = sharding.param_shardings(params, mesh, strict=strict)
  rep = sharding.replicated(mesh)
  by_name = {m.name: m for m in plan.members}
  out = {}
  for name, c in corrs.items():
    m = by_name[name]
    if (isinstance(c, corr_lib.FullCorrection)
        and tuple(c.inv_sqrt_v.shape) == tuple(m.shape)):
      out[name] = corr_lib.FullCorrection(
          inv_sqrt_v=model_lib.param_at(p_shardings, m.path))
    else:
      out[name] = jax.tree.map(lambda _: rep, c)
  return out


def sharded_kernel(fn, *, param_shardings, corr_shardings):
  """`fn(params, mats, corrs, tokens, mask)` that first all-gathers the DATA-split
  (FSDP) axes of params and corrections (`sharding.gathered`); MODEL stays split.
  The Featurizer jits this and `tda.compile_check` lowers it: one layout."""
  p_compute = jax.tree.map(sharding.gathered, param_shardings)
  c_compute = (None if corr_shardings is None
               else jax.tree.map(sharding.gathered, corr_shardings))

  @functools.wraps(fn)  # Keeps the kernel's name (compile logs and events name it).
  def run(params, mats, corrs, tokens_bt, mask_bt, loss_rows=None):
    params = jax.lax.with_sharding_constraint(params, p_compute)
    if corrs is not None:
      corrs = jax.lax.with_sharding_constraint(corrs, c_compute)
    return fn(params, mats, corrs, tokens_bt, mask_bt, loss_rows=loss_rows)

  return run


class Featurizer:
  """Runs a gradient kernel over many examples: length buckets, fixed batch shapes
  (examples longest first, each batch as long as its longest bucket, only the last
  batch padded with empty rows, so nothing recompiles: one program per bucket, and
  for query-like masks one per `loss_rows`), sharding over the data axis, and
  NaN/Inf rows flagged by example id instead of returned.

  Params (and corrections) are placed by `sharding.param_shardings` on `mesh`;
  already-sharded arrays (`tda.train.load_trained`) are used where they are.
  """

  def __init__(self, *, model, params, plan: proj.Plan, mats, corrs, mesh,
               batch_size: int, kernel: str = "factored", bucket: int = 32,
               variants: tuple[str, ...] | None = None, strict: bool = False):
    if kernel not in ("factored", "reference"):
      raise ValueError(f"gradients.kernel must be 'factored' or 'reference', got {kernel!r}")
    self.plan, self.mesh, self.bucket = plan, mesh, bucket
    self.batch_size = sharding.pad_to_multiple(batch_size, mesh)
    make = (grad_lib.make_factored_kernel if kernel == "factored"
            else grad_lib.make_reference_kernel)
    fn = make(model=model, plan=plan, has_corrections=corrs is not None, variants=variants)
    self._batch_sharding = sharding.batch_sharding(mesh, 2)
    p_shardings = sharding.param_shardings(params, mesh, strict=strict)
    c_shardings = correction_shardings(corrs, plan=plan, params=params, mesh=mesh,
                                       strict=strict)
    # A no-op for arrays already in these shardings.
    self._params = jax.device_put(params, p_shardings)
    self._mats = jax.device_put(mats, sharding.replicated(mesh))
    self._corr = None if corrs is None else jax.device_put(corrs, c_shardings)
    self._fn = jax.jit(sharded_kernel(fn, param_shardings=p_shardings,
                                      corr_shardings=c_shardings),
                       static_argnames=("loss_rows",))
    self._shapes: set[tuple[int, ...]] = set()

  @property
  def compiled_shapes(self) -> int:
    """How many distinct (batch, length, loss rows) shapes the kernel has been
    run at (each is one compilation)."""
    return len(self._shapes)

  def run_batch(self, tokens_bt, mask_bt) -> dict[str, Any]:
    """The kernel on one batch; a batch whose rows carry loss on few positions
    (queries: their target tokens) runs the LM head on those only
    (`tda.gradients.loss_rows_for`; the same vectors)."""
    rows = grad_lib.loss_rows_for(tokens_bt, mask_bt)
    self._shapes.add(tuple(np.shape(tokens_bt)) + (rows,))
    put = lambda a: jax.device_put(a, self._batch_sharding)
    return self._fn(self._params, self._mats, self._corr, put(tokens_bt), put(mask_bt),
                    loss_rows=rows)

  def __call__(self, *, tokens_nt, mask_nt, ids, desc: str | None = None) -> dict[str, Any]:
    """Vectors for every example, in input order (`desc`: show a progress line).

    Returns:
      dict with 'raw' (and 'corrected') float32 [N, d] and 'loss' [N]; rows that
      came out non-finite are zeroed and listed in 'bad_ids' / 'bad_rows'.
    """
    tokens_nt = np.asarray(tokens_nt)
    mask_nt = np.asarray(mask_nt)
    n, t_max = tokens_nt.shape
    if n == 0:
      raise ValueError("no examples to featurise")
    lengths = (tokens_nt != 0).shape[1] - np.argmax((tokens_nt != 0)[:, ::-1], axis=1)
    lengths = np.where((tokens_nt != 0).any(1), lengths, 2)
    padded = model_lib.bucket_lengths(lengths, multiple=self.bucket, max_len=t_max)
    # Longest first, cut into batches of `batch_size` rows, each as long as its first
    # row's bucket: a bucket's last rows share a batch with the next (shorter) bucket's
    # instead of padding rows, so only the overall last batch is partial, and the
    # batch lengths are still bucket lengths (no new shapes to compile).
    order = np.lexsort((np.arange(n), -padded))
    out: dict[str, Any] = {}
    bs = self.batch_size
    bar = progress.start(total=n, desc=desc or "", unit="example", enabled=bool(desc))
    for s in range(0, n, bs):
      idx = order[s:s + bs]
      t = int(padded[idx[0]])
      tok = np.zeros((bs, t), np.int32)
      msk = np.zeros((bs, t), np.float32)
      tok[:len(idx)] = tokens_nt[idx, :t]
      msk[:len(idx)] = mask_nt[idx, :t]
      res = self.run_batch(tok, msk)
      for k, v in res.items():
        if k not in out:
          out[k] = np.zeros((n,) + v.shape[1:], np.float32)
        out[k][idx] = np.asarray(v)[:len(idx)]
      bar.update(len(idx))
    bar.close()
    finite = np.ones(n, bool)
    for k, v in out.items():
      finite &= np.isfinite(v.reshape(n, -1)).all(axis=1)
    bad = np.flatnonzero(~finite)
    for k in out:
      out[k][bad] = 0.0
    out["bad_rows"] = bad
    out["bad_ids"] = [ids[i] for i in bad]
    return out


@dataclasses.dataclass
class Engine:
  """Everything the kernels need, built once per run from the checkpoint."""
  plan: proj.Plan
  featurizer: Featurizer
  step: int
  correction_counts: dict[str, int]


def plan_from_config(config, param_shapes) -> proj.Plan:
  """The projection plan the `gradients` config section asks for, over these params."""
  g = config.gradients
  return proj.make_plan(param_shapes=param_shapes, pooling=g.pooling, k_in=g.k_in,
                        k_out=g.k_out, layers_per_block=g.layers_per_block,
                        groups=g.groups, embed_block=g.embed_block)


def make_engine(config, *, model, state, variants=None, second_moments=None) -> Engine:
  """The kernel set-up for one checkpoint (model, params and optimizer state).

  Args:
    config: the run config (`gradients` section).
    model: the model.
    state: the checkpoint's TrainState.
    variants: the vector variants to compute (None: all).
    second_moments: an optax state to read V from instead of `state.opt_state`
      (`gradients.v_source='estimate'`: `tda.v_estimate.load`); None: the checkpoint's.
  """
  g = config.gradients
  plan = plan_from_config(config, state.params)
  mats = proj.plan_matrices(seed=g.seed, plan=plan)
  # The corrections' reductions (e.g. mean(v_row)) run on gathered statistics, so
  # they sum in the same order whatever the FSDP split.
  v_state = state.opt_state if second_moments is None else second_moments
  corrs = (corr_lib.member_corrections(opt_state=sharding.gather(v_state),
                                       plan=plan, eps=g.eps, adam_v=g.adam_v)
           if g.correction else None)
  feat = Featurizer(model=model, params=state.params, plan=plan, mats=mats,
                    corrs=corrs,
                    # Per process: each featurises its own rows on its own devices
                    # (the mesh `tda.train.load_trained` restores onto).
                    mesh=sharding.process_mesh(config),
                    batch_size=g.batch_size, kernel=g.kernel,
                    bucket=g.length_bucket, variants=variants,
                    strict=sharding.strict(config))
  return Engine(plan=plan, featurizer=feat, step=state.step,
                correction_counts=corr_lib.describe(corrs) if corrs else {})


def hessian_sample(config, n: int) -> np.ndarray:
  """The sorted, seeded rows of an n-passage corpus that R_train is estimated on."""
  rng = np.random.default_rng(config.seed)
  return np.sort(rng.choice(n, size=min(config.hessian.train_samples, n), replace=False))


def sweep_pool_sample(config, n: int) -> np.ndarray:
  """The sorted, seeded rows of an n-passage corpus the dev damping sweep ranks
  (with the dev queries' ground truth): `hessian.sweep_pool` rows drawn uniformly and
  independently of R_train's sample (`hessian_sample`), so that, as among the whole
  corpus the test queries are ranked over, a share train_samples / n of the pool
  lies in R's sample. (A pool that was R's sample would put every ranked passage
  inside it, where whitened norms are bounded by leverage, while the ground truth
  and, at scale, nearly every candidate lie outside: `tda.hessian.sample_effect`.)
  The whole corpus when it has at most `hessian.sweep_pool` passages."""
  rng = np.random.default_rng([config.seed, 17])
  return np.sort(rng.choice(n, size=min(config.hessian.sweep_pool, n), replace=False))


@dataclasses.dataclass
class DevPool:
  """What the dev sweep scores: dev query vectors and this process's share of a
  passage pool (`sweep_pool_sample` plus the dev queries' ground-truth passages).

  Attributes:
    queries: variant -> [Qd, d] dev query vectors.
    pool: variant -> [P_local, d] this process's pool vectors.
    relevant_qp: [Qd, P_local] whether pool passage p entails dev query q's fact.
  """
  queries: dict[str, np.ndarray]
  pool: dict[str, np.ndarray]
  relevant_qp: np.ndarray


@dataclasses.dataclass
class Fit:
  """R_train and R_eval per variant (mean autocorrelations), the whiteners, and
  the dev sweep (table -> {"candidates", "dev_mrr", "chosen"}; {} without one)."""
  r_train: dict[str, np.ndarray]
  r_eval: dict[str, np.ndarray]
  whiteners: hessian.Whiteners
  sweep: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)


def dev_ranks(*, queries_qd: np.ndarray, pool_pd: np.ndarray,
              relevant_qp: np.ndarray) -> np.ndarray:
  """Exact first-relevant ranks of the dev queries over the whole pool, with each
  process holding a share of the pool (`tda.protocol.first_relevant_rank`, summed
  across processes)."""
  s = np.asarray(queries_qd, np.float64) @ np.asarray(pool_pd, np.float64).T
  rel = np.asarray(relevant_qp, bool)
  best_local = np.where(rel, s, -np.inf).max(axis=1, initial=-np.inf)
  per_proc = np.full((jax.process_count(), len(s)), -1e300)
  per_proc[jax.process_index()] = np.maximum(best_local, -1e300)
  best = distributed.sum_across_processes(
      np.where(np.arange(jax.process_count())[:, None] == jax.process_index(), per_proc, 0.0))
  best = best.max(axis=0)
  counts = np.stack([((s >= best[:, None]) & ~rel).sum(1), rel.any(1)]).astype(np.float64)
  counts = distributed.sum_across_processes(counts)
  return np.where(counts[1] > 0, 1 + counts[0], 0).astype(np.int64)


def fit_whiteners(config, *, methods, queries: dict[str, np.ndarray],
                  train: dict[str, np.ndarray], block_sizes=None,
                  dev: DevPool | None = None) -> Fit:
  """R_train (summed over every process's share of the sample), R_eval and each
  method's R^{-1/2}, from featurised vectors per variant (`config.hessian`).

  Args:
    config: the run config.
    methods: gradient method names.
    queries: variant -> [Q, d] the vectors R_eval is estimated on (the dev
      queries; finite rows only).
    train: variant -> [n, d] this process's share of the R_train sample.
    block_sizes: projection block sizes, used when `hessian.block_diagonal`.
    dev: the dev pool; with it, each table's damping is the candidate of
      `hessian.damping_candidates` with the best dev MRR (the first on ties); a best
      candidate strictly at an end of the grid (`tda.protocol.grid_edge`) extends
      the grid past that end by the end's ratio, up to
      `hessian.damping_extend_steps` candidates, and an added candidate is chosen
      only if strictly better. Every candidate's dev MRR is recorded (grid sorted),
      with `extended_by` and `chosen_at_grid_edge` (still at an end after the
      extensions; a warning is logged when set). Without it, `hessian.damping`.
  """
  r_train, r_eval = {}, {}
  # R_train on the global mesh: every process adds its share of the sample and the
  # mesh's collectives sum them (the step `tda.compile_check` compiles). R_eval on
  # this process's devices: every process holds all the dev queries.
  everyone, mine = sharding.r_mesh(), sharding.r_mesh(jax.local_devices())
  for v in methods_lib.variants(methods):
    s, cnt = hessian.autocorrelation(vectors_nd=train[v], mesh=everyone)
    s /= max(cnt, 1)
    r_train[v] = s
    s, cnt = hessian.autocorrelation(vectors_nd=queries[v], mesh=mine)
    s /= max(cnt, 1)
    r_eval[v] = s
  h = config.hessian
  prep = hessian.prepare(methods=methods, r_train=r_train, r_eval=r_eval,
                         lambda_rule=h.lambda_rule, lam=h.lambda_,
                         top_k_fraction=h.lambda_top_k_fraction,
                         block_sizes=block_sizes if h.block_diagonal else None)
  if dev is None:
    return Fit(r_train, r_eval, prep.whiteners(h.damping))
  user = [float(x) for x in h.damping_candidates]
  if not user:
    raise ValueError("hessian.damping_candidates is empty")
  extend = int(h.damping_extend_steps)
  if extend < 0:
    raise ValueError(f"hessian.damping_extend_steps must be >= 0, got {extend}")
  # In R's eigenbasis (`hessian.Eigen.rotate`): the dev vectors are rotated once per
  # R and rescaled per candidate, the same norms and inner products as R^{-1/2}x
  # without forming R^{-1/2} per candidate (2 d³ each: 5 PFLOP per host for nine
  # candidates at d = 65,536).
  rotated: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}

  def dev_mrr(t: str, c: float | None) -> float:
    v, unit = methods_lib.switches(t).variant, methods_lib.switches(t).unit
    if c is None:
      q, p = dev.queries[v], dev.pool[v]
    else:
      key = hessian.r_key(t)
      eig = prep.eigs[key]
      if key not in rotated:
        rotated[key] = eig.rotate(dev.queries[v]), eig.rotate(dev.pool[v])
      sc = eig.scales(c)
      q, p = rotated[key][0] * sc, rotated[key][1] * sc
    ranks = dev_ranks(queries_qd=hessian.apply_np(vectors_nd=q, whitener=None, unit=unit),
                      pool_pd=hessian.apply_np(vectors_nd=p, whitener=None, unit=unit),
                      relevant_qp=dev.relevant_qp)
    return protocol.mrr_from_ranks(ranks)

  chosen, sweep = {}, {}
  for t, ms in methods_lib.table_groups(methods).items():
    if hessian.r_key(t)[1] == methods_lib.R_NONE:
      # No R: the damping does not matter; scored once.
      sweep[t] = {"methods": ms, "candidates": [], "dev_mrr": [], "chosen": None,
                  "dev_mrr_chosen": dev_mrr(t, None), "chosen_at_grid_edge": None,
                  "extended_by": 0}
      for m in ms:
        chosen[m] = h.damping
      continue
    scores_of: dict[float, float] = {}
    for c in user:
      if c not in scores_of:
        scores_of[c] = dev_mrr(t, c)
    # The best of the grid as given (the first in its order on ties).
    best = user[int(np.argmax([scores_of[c] for c in user]))]

    def grid():
      cands = sorted(scores_of)
      scores = [scores_of[c] for c in cands]
      return cands, scores, protocol.grid_edge(cands, scores, cands.index(best))

    # The best strictly above its neighbour at an end of the grid: the dev optimum may
    # lie beyond it, so the grid grows past that end by the end's own ratio, one
    # candidate at a time, while the best stays at the end, up to
    # `hessian.damping_extend_steps` candidates. An added candidate becomes the choice
    # only if its dev MRR is strictly higher (a tie keeps the earlier one). Only dev
    # MRR decides.
    cands, scores, edge = grid()
    added = 0
    while edge and added < extend:
      end, nxt = (cands[-1], cands[-2]) if edge == "largest" else (cands[0], cands[1])
      if end <= 0 or nxt <= 0:
        break  # No ratio to step by (a zero damping at the end).
      c = float(f"{end * (end / nxt):.12g}")  # 12 digits: no drift from the products.
      scores_of[c] = dev_mrr(t, c)
      if scores_of[c] > scores_of[best]:
        best = c
      added += 1
      cands, scores, edge = grid()
    if edge:
      logging.warning("damping of %s: the grid's %s candidate (%g x mean eigenvalue) has the "
                      "best dev MRR after %d extension(s); the dev optimum may lie beyond it",
                      t, edge, best, added)
    sweep[t] = {"methods": ms, "candidates": cands, "dev_mrr": scores, "chosen": best,
                "dev_mrr_chosen": scores_of[best], "chosen_at_grid_edge": edge,
                "extended_by": added}
    for m in ms:
      chosen[m] = best
  del rotated
  return Fit(r_train, r_eval, prep.whiteners(chosen), sweep)

"""Stages 'gradients' and 'tables': run the gradient kernel over queries and corpus.

'gradients' (small, once): the queries' projected per-example gradients and a
sample of training passages', both in the uncorrected and the corrected variant
from one forward/backward; R_train and R_eval per variant; λ; each method's
whitening matrix R^{-1/2}; and each method's final query vectors.

'tables' (the corpus pass, DESIGN.md §4): every passage once through the kernel;
each gradient method's final vector (whitened, unit) goes to its own sharded table.
The expensive part (the kernel) is shared by all methods: they differ only in the
cheap downstream transform. Methods with identical transforms share one table.
Each process featurises the shards it owns; a restarted job resumes at the
first uncommitted shard.

Rows whose gradient is NaN/Inf are logged with their example id, counted, and
written as zero vectors listed in the table's meta (`excluded_ids`); retrieval
never returns them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import jax
import numpy as np

from tda import config as config_lib
from tda import correction as corr_lib
from tda import distributed
from tda import gradients as grad_lib
from tda import hessian
from tda import methods as methods_lib
from tda import model as model_lib
from tda import projection as proj
from tda import sharding
from tda import tables as tables_lib
from tda import train as train_lib
from tda import workdir as wd

GRADIENTS, TABLES = "gradients", "tables"


def gradient_methods(config) -> list[str]:
  return methods_lib.gradient(config.eval.methods)


class Featurizer:
  """Runs a gradient kernel over many examples: length buckets, fixed batch shapes
  (a padded last batch, so nothing recompiles), sharding over the data axis, and
  NaN/Inf rows flagged by example id instead of returned."""

  def __init__(self, *, model, params, plan: proj.Plan, mats, corrs, mesh,
               batch_size: int, kernel: str = "factored", bucket: int = 32,
               variants: tuple[str, ...] | None = None):
    if kernel not in ("factored", "reference"):
      raise ValueError(f"gradients.kernel must be 'factored' or 'reference', got {kernel!r}")
    self.plan, self.mesh, self.bucket = plan, mesh, bucket
    self.batch_size = sharding.pad_to_multiple(batch_size, mesh)
    make = (grad_lib.make_factored_kernel if kernel == "factored"
            else grad_lib.make_reference_kernel)
    fn = make(model=model, plan=plan, has_corrections=corrs is not None, variants=variants)
    self._batch_sharding = sharding.batch_sharding(mesh, 2)
    rep = sharding.replicated(mesh)
    self._params = jax.device_put(params, sharding.param_shardings(params, mesh))
    self._mats = jax.device_put(mats, rep)
    self._corr = jax.device_put(corrs, rep)
    self._fn = jax.jit(fn)
    self._shapes: set[tuple[int, ...]] = set()

  @property
  def compiled_shapes(self) -> int:
    """How many distinct (batch, length) shapes the kernel has been run at (each
    is one compilation)."""
    return len(self._shapes)

  def run_batch(self, tokens_bt, mask_bt) -> dict[str, Any]:
    self._shapes.add(tuple(np.shape(tokens_bt)))
    put = lambda a: jax.device_put(a, self._batch_sharding)
    return self._fn(self._params, self._mats, self._corr, put(tokens_bt), put(mask_bt))

  def __call__(self, *, tokens_nt, mask_nt, ids) -> dict[str, Any]:
    """Vectors for every example, in input order.

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
    order = np.lexsort((np.arange(n), padded))
    out: dict[str, Any] = {}
    bs = self.batch_size
    for t in np.unique(padded):
      rows = order[padded[order] == t]
      for s in range(0, len(rows), bs):
        idx = rows[s:s + bs]
        tok = np.zeros((bs, t), np.int32)
        msk = np.zeros((bs, t), np.float32)
        tok[:len(idx)] = tokens_nt[idx, :t]
        msk[:len(idx)] = mask_nt[idx, :t]
        res = self.run_batch(tok, msk)
        for k, v in res.items():
          if k not in out:
            out[k] = np.zeros((n,) + v.shape[1:], np.float32)
          out[k][idx] = np.asarray(v)[:len(idx)]
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


def make_engine(config, *, model, state, variants=None) -> Engine:
  """The kernel set-up for one checkpoint (model, params and optimizer state)."""
  g = config.gradients
  plan = plan_from_config(config, state.params)
  mats = proj.plan_matrices(seed=g.seed, plan=plan)
  corrs = (corr_lib.member_corrections(opt_state=state.opt_state, plan=plan, eps=g.eps,
                                       adam_v=g.adam_v) if g.correction else None)
  feat = Featurizer(model=model, params=state.params, plan=plan, mats=mats,
                    corrs=corrs,
                    # Per process: each featurises its own rows on its own devices.
                    mesh=sharding.make_mesh(config, devices=jax.local_devices()),
                    batch_size=g.batch_size, kernel=g.kernel,
                    bucket=g.length_bucket, variants=variants)
  return Engine(plan=plan, featurizer=feat, step=state.step,
                correction_counts=corr_lib.describe(corrs) if corrs else {})


def engine(ctx) -> Engine:
  """The run's engine (final checkpoint), built once and shared by the stages."""
  def make():
    model, state, _ = ctx.trained
    return make_engine(ctx.config, model=model, state=state,
                       variants=tuple(_variants(ctx.config)) or None)
  return ctx.get("engine", make)


def _fingerprint(ctx) -> dict[str, Any]:
  c = ctx.config
  return {"gradients": c.gradients.to_dict(), "hessian": c.hessian.to_dict(),
          "methods": gradient_methods(c), "train": train_lib.fingerprint(c),
          "train_step": train_lib.latest_step(ctx.workdir), "world": c.world.to_dict(),
          "seq_len": c.data.seq_len}


def _variants(config) -> list[str]:
  """The gradient variants the configured methods need."""
  return methods_lib.variants(config.eval.methods)


def _need_correction(methods) -> bool:
  return any(methods_lib.switches(m).correction for m in methods)


def run_gradients_stage(ctx) -> dict[str, Any]:
  config, workdir = ctx.config, ctx.workdir
  methods = gradient_methods(config)
  if _need_correction(methods) and not config.gradients.correction:
    raise ValueError("gradients.correction is off but methods "
                     f"{[m for m in methods if methods_lib.switches(m).correction]} need it")
  fingerprint = _fingerprint(ctx)
  sdir = wd.stage_dir(workdir, GRADIENTS)
  if wd.check_fingerprint(workdir, GRADIENTS, fingerprint):
    return wd.read_json(os.path.join(sdir, "summary.json"))
  eng = engine(ctx)
  corpus, queries = ctx.arrays
  t0 = time.time()
  q = eng.featurizer(tokens_nt=queries.tokens_nl, mask_nt=queries.loss_mask_nl,
                     ids=queries.ids)
  t_q = time.time() - t0
  if q["bad_ids"]:
    logging.warning("%d queries have non-finite gradients: %s", len(q["bad_ids"]),
                    q["bad_ids"][:10])
  rng = np.random.default_rng(config.seed)
  n = len(corpus.ids)
  sample = np.sort(rng.choice(n, size=min(config.hessian.train_samples, n), replace=False))
  mine = sample[jax.process_index()::jax.process_count()]  # R_train: each process a share.
  t0 = time.time()
  p = eng.featurizer(tokens_nt=corpus.tokens_nt[mine],
                     mask_nt=(corpus.tokens_nt[mine] != 0).astype(np.float32),
                     ids=[corpus.ids[i] for i in mine])
  t_p = time.time() - t0
  keep_q = np.setdiff1d(np.arange(len(queries.ids)), q["bad_rows"])
  keep_p = np.setdiff1d(np.arange(len(mine)), p["bad_rows"])
  r_train, r_eval = {}, {}
  for v in _variants(config):
    s, cnt = hessian.autocorrelation(vectors_nd=p[v][keep_p])
    total = distributed.sum_across_processes(np.append(s.ravel(), cnt))
    r_train[v] = total[:-1].reshape(s.shape) / max(total[-1], 1)
    s, cnt = hessian.autocorrelation(vectors_nd=q[v][keep_q])
    r_eval[v] = s / max(cnt, 1)
  h = config.hessian
  t0 = time.time()
  whiteners = hessian.build_whiteners(
      methods=methods, r_train=r_train, r_eval=r_eval,
      lam="auto" if h.lambda_auto else h.lambda_, damping=h.damping,
      top_k=h.auto_top_k, overlap=h.auto_overlap,
      block_sizes=[b.dim for b in eng.plan.blocks] if h.block_diagonal else None)
  t_h = time.time() - t0
  if not distributed.is_leader():
    return {}  # Process 0 commits; every process computed the same whiteners.
  summary = {
      "d": eng.plan.dim, "blocks": [(b.name, b.dim, len(b.members)) for b in eng.plan.blocks],
      "lambda": whiteners.lam, "num_queries": len(queries.ids),
      "train_samples": int(len(sample)), "bad_query_ids": q["bad_ids"],
      "bad_sample_ids_process0": p["bad_ids"], "processes": jax.process_count(),
      "correction_members": eng.correction_counts,
      "checkpoint_step": eng.step, "kernel": config.gradients.kernel,
      "timings_s": {"queries": t_q, "train_sample": t_p, "hessian": t_h},
  }
  with wd.atomic_stage(workdir, GRADIENTS, fingerprint) as tmp:
    for v in _variants(config):
      np.save(os.path.join(tmp, f"queries_{v}.npy"), q[v])
      np.save(os.path.join(tmp, f"r_train_{v}.npy"), r_train[v].astype(np.float32))
      np.save(os.path.join(tmp, f"r_eval_{v}.npy"), r_eval[v].astype(np.float32))
    np.save(os.path.join(tmp, "query_loss.npy"), q["loss"])
    for table, ms in methods_lib.table_groups(methods).items():
      w = whiteners.matrices[table]
      if w is not None:
        np.save(os.path.join(tmp, f"whitener_{table}.npy"), w)
      final = whiteners.transform(method=table, vectors_nd=q[methods_lib.switches(table).variant])
      np.save(os.path.join(tmp, f"queries_final_{table}.npy"), final)
    wd.write_json(os.path.join(tmp, "query_ids.json"), queries.ids)
    wd.write_json(os.path.join(tmp, "summary.json"), summary)
  logging.info("gradients: d=%d, λ=%s, queries %.1fs, R sample %.1fs, hessian %.1fs",
               eng.plan.dim, whiteners.lam, t_q, t_p, t_h)
  return summary


def _load_whitener(workdir: str, table: str) -> np.ndarray | None:
  path = os.path.join(wd.stage_dir(workdir, GRADIENTS), f"whitener_{table}.npy")
  return np.load(path) if os.path.exists(path) else None


def table_meta(ctx, table: str) -> dict[str, Any]:
  """What a table is computed from; queries are refused against other tables."""
  c = ctx.config
  return {"method": table, "config_hash": config_lib.config_hash(
              c, "gradients", "hessian", "model", "train", "world", "data"),
          "checkpoint_step": train_lib.latest_step(ctx.workdir),
          "projection_seed": c.gradients.seed,
          "d": wd.read_json(os.path.join(wd.stage_dir(ctx.workdir, GRADIENTS),
                                         "summary.json"))["d"]}


def table_path(workdir: str, table: str) -> str:
  return os.path.join(wd.stage_dir(workdir, TABLES), table)


def run_tables_stage(ctx) -> dict[str, Any]:
  config, workdir = ctx.config, ctx.workdir
  methods = gradient_methods(config)
  groups = methods_lib.table_groups(methods)
  fingerprint = {**_fingerprint(ctx), "tables": config.tables.to_dict()}
  sdir = wd.stage_dir(workdir, TABLES)
  if wd.committed(workdir, TABLES) is not None:
    wd.check_fingerprint(workdir, TABLES, fingerprint)
    return wd.read_json(os.path.join(sdir, "summary.json"))
  os.makedirs(sdir, exist_ok=True)
  corpus, _ = ctx.arrays
  eng = engine(ctx)
  t = config.tables
  pidx, nproc = jax.process_index(), jax.process_count()
  writers = {name: tables_lib.TableWriter(
      path=table_path(workdir, name), d=eng.plan.dim, dtype=t.dtype,
      rows_per_shard=t.rows_per_shard, meta=table_meta(ctx, name),
      process_index=pidx, num_processes=nproc) for name in groups}
  whiteners = {name: _load_whitener(workdir, name) for name in groups}
  n = len(corpus.ids)
  rps = t.rows_per_shard
  n_shards = -(-n // rps)
  bad_ids: list[str] = []
  t0, rows_done = time.time(), 0
  for s in range(pidx, n_shards, nproc):
    lo, hi = s * rps, min((s + 1) * rps, n)
    if all(s in w.committed for w in writers.values()):
      continue
    tok = corpus.tokens_nt[lo:hi]
    ids = corpus.ids[lo:hi]
    f = eng.featurizer(tokens_nt=tok, mask_nt=(tok != 0).astype(np.float32), ids=ids)
    bad_ids += f["bad_ids"]
    for name, w in writers.items():
      spec = methods_lib.switches(name)
      x = hessian.apply(vectors_nd=f[spec.variant], whitener=whiteners[name], unit=spec.unit)
      x[f["bad_rows"]] = 0.0
      w.write(x, ids, start_row=lo)
    rows_done += hi - lo
  if bad_ids:
    logging.warning("%d passages have non-finite gradients (zeroed, excluded from "
                    "retrieval): %s", len(bad_ids), bad_ids[:10])
  for w in writers.values():
    w.close()
  wd.write_json(os.path.join(sdir, f"excluded.{pidx}.json"), bad_ids)
  wall = time.time() - t0
  distributed.barrier("tda-tables-written")
  if not distributed.is_leader():
    return {}
  if nproc > 1:
    for name in groups:
      tables_lib.finalize_table(path=table_path(workdir, name), num_shards=n_shards)
  bad_ids = sum((wd.read_json(os.path.join(sdir, f"excluded.{i}.json")) for i in range(nproc)), [])
  summary = {"tables": {name: ms for name, ms in groups.items()}, "rows": n,
             "d": eng.plan.dim, "dtype": t.dtype, "excluded_ids": bad_ids,
             "processes": nproc, "featurised_rows_this_run_process0": rows_done,
             "wall_s": wall, "rows_per_s_process0": rows_done / max(wall, 1e-9)}
  wd.write_json(os.path.join(sdir, "summary.json"), summary)
  wd.write_json(os.path.join(sdir, wd.MARKER), {"fingerprint": fingerprint})
  return summary

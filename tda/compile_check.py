"""Compile the scale path for a TPU pod without a TPU: `python -m tda.compile_check`.

    python -m tda.compile_check --config=configs/trackstar_8b.py --topology=v5e-256 \
        [--batch_per_chip=N] [--search_batch] [--json] [--output=R.json]

Lowers and compiles, on *compile-only* TPU devices (`jax.experimental.topologies`,
needs the `.[tpu]` extra, libtpu pinned by `jax[tpu]==0.10.2`) of a slice in
`tda.topology.TOPOLOGIES`, the programs a corpus-scale run repeats, one step
function each, each on the devices the run gives it: the gradient kernel and the
search on one process's (host's) chips with the config's mesh, as every process of
the run featurises and searches its own shards (`sharding.process_mesh`, so the
config's MODEL axis must fit one host; libtpu compiles v5e programs only for a whole
slice, so these compile on the one-host slice of the same chips,
`topology.host_slice`: v5e-4 for v5e-256, v4-8 for v4-128); the R step on R's mesh
over every chip of the slice:

  * `gradients` (`check_gradients`): the factored per-example gradient kernel
    (`tda.gradients.make_factored_kernel`, wrapped by `featurize.sharded_kernel`) at
    the full sequence length, parameters sharded by `tda.sharding.param_shardings`
    (the rules `tda.train.load_trained` restores with: tensor-parallel over MODEL,
    FSDP over DATA, gathered over DATA in the kernel), corrections by
    `featurize.correction_shardings`, the batch over DATA — the layout the
    `Featurizer` uses. Parameters, optimizer state and corrections are only
    `jax.eval_shape`d: nothing of the model is ever allocated.
  * `queries` (`check_queries`): the same kernel as query batches run it, one
    length bucket long (`gradients.length_bucket`) with the LM head on the target
    rows only (`loss_rows`, `tda.gradients.loss_rows_for`), same layout and batch.
  * `r_step` (`check_r_step`): one accumulation step of R = Σ φφᵀ (DESIGN.md §2),
    `tda.hessian.r_accumulate` itself (the step the 'gradients' stage accumulates
    R_train with), R [d, d] float32 sharded 2-D as P(DATA, MODEL) on R's own mesh
    (`sharding.r_mesh`: MODEL = one host's chips; 65,536² f32 = 16 GiB in all, a
    64 MiB tile per chip on v5e-256), the φ rows arriving as the kernel
    emits them, P(DATA); and R's copy to the hosts after the last step
    (`tda.hessian.rows_replicated`, one DATA shard of rows replicated a step).
  * `scoring` (`check_scoring`): one chunk of exact search, `tda.index._chunk_topk`
    itself, on a 1-D DATA mesh over one process's chips (as `tda.index` builds it):
    queries replicated, table rows split over chips, local top-k then a merge.

It also reports `eigh_plan` (`tda.hessian.eigh_plan`): R's bytes per chip while it
is accumulated, and the eigendecomposition's placement (each host, LAPACK) with the
host's peak memory phase by phase and FLOPs at the config's d (65,536 for the 8B
config: 96 GiB per host); 0 bytes per chip.

Per program it reports XLA's per-chip memory (`memory_analysis()`) against the
chip's HBM and per-chip FLOPs (`cost_analysis()`: the SPMD-partitioned module, so
per chip; our model is an unrolled Python loop of layers, not a `scan`, so every
layer is counted; with `model.remat` the recomputed forward is counted too). A
program that does not fit fails to compile with RESOURCE_EXHAUSTED; that is
reported as `fits: False`, and `--search_batch` (`search_gradient_batch`) finds
the largest gradient batch that fits by doubling then bisection.

Without libtpu, `topology='cpu'` compiles on the host's (forced) CPU devices:
argument and output sizes are right, temporaries and OOM are not (tests only).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import time
from typing import Any, Callable

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tda import cli
from tda import correction as corr_lib
from tda import featurize
from tda import gradients as grad_lib
from tda import hessian
from tda import model as model_lib
from tda import projection as proj
from tda import sharding
from tda import topology as topology_lib
from tda import workdir as workdir_lib

GIB = 1 << 30
STEPS = ("gradients", "queries", "r_step", "scoring")


def libtpu_version() -> str | None:
  """The installed libtpu's version, or None when the `.[tpu]` extra is absent."""
  from importlib import metadata
  for dist in ("libtpu", "libtpu-nightly"):
    try:
      return metadata.version(dist)
    except metadata.PackageNotFoundError:
      pass
  return None


def process_devices(name: str) -> list[jax.Device]:
  """The devices of one process (host) of slice `name`: where the run's per-process
  programs (featurisation, search) execute; compile-only devices of the one-host
  slice of the same chips (`topology.host_slice`), or the host's CPUs."""
  return topology_devices(name=name if name == topology_lib.CPU else
                          topology_lib.host_slice(name))


def topology_devices(*, name: str) -> list[jax.Device]:
  """Compile-only devices of a TPU slice (no TPU needed), or the host's CPUs."""
  if name == topology_lib.CPU:
    return jax.devices("cpu")
  topo = topology_lib.get(name)
  if libtpu_version() is None:
    raise RuntimeError(f"topology {name!r} needs libtpu: pip install -e '.[tpu]'")
  # libtpu otherwise probes GCE metadata and takes a per-machine lockfile that any
  # other JAX process with libtpu installed may already hold.
  for k, v in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
               ("TPU_ACCELERATOR_TYPE", topo.accelerator_type),
               ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
    os.environ.setdefault(k, v)
  from jax.experimental import topologies
  desc = topologies.get_topology_desc(
      platform="tpu", topology_name=topo.topology_name,
      chip_config_name=topo.chip_config_name, chips_per_host_bounds=(2, 2, 1),
      num_slices=1, wrap=topo.wrap)
  return list(desc.devices)


# --- Abstract inputs -------------------------------------------------------------

def _abstract(tree, shardings):
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      tree, shardings)


def model_and_plan(config: ml_collections.ConfigDict):
  """(model, abstract params, projection plan) as `tda.featurize` builds them."""
  model = model_lib.Transformer(model_lib.model_config(config))
  params = model_lib.param_shapes(model, config.data.seq_len)
  return model, params, featurize.plan_from_config(config, params)


def gradient_inputs(*, config: ml_collections.ConfigDict, mesh: Mesh, batch: int,
                    seq_len: int | None = None):
  """(kernel, abstract args) of the factored kernel, as `tda.featurize` builds them.

  Parameter, optimizer-state and correction shapes all come from `jax.eval_shape`;
  their shardings are the run's (`sharding.param_shardings`,
  `featurize.correction_shardings`), and the kernel is `featurize.sharded_kernel`.
  `seq_len`: the batch's length (default the config's sequence length).
  """
  g = config.gradients
  seq_len = seq_len or config.data.seq_len
  model, params, plan = model_and_plan(config)
  mats = jax.eval_shape(lambda: proj.plan_matrices(seed=g.seed, plan=plan))
  corrs = None
  if g.correction:
    from tda import train as train_lib
    tx = train_lib.make_optimizer(config)
    corrs = jax.eval_shape(lambda p: corr_lib.member_corrections(
        opt_state=tx.init(p), plan=plan, eps=g.eps, adam_v=g.adam_v), params)
  # The layout a run uses: `tda.train.load_trained` restores params (and optimizer
  # state) into `sharding.param_shardings`; the Featurizer places corrections by
  # `featurize.correction_shardings` and runs `featurize.sharded_kernel`.
  strict = sharding.strict(config)
  p_shardings = sharding.param_shardings(params, mesh, strict=strict)
  c_shardings = featurize.correction_shardings(corrs, plan=plan, params=params, mesh=mesh,
                                               strict=strict)
  kernel = featurize.sharded_kernel(
      grad_lib.make_factored_kernel(model=model, plan=plan,
                                    has_corrections=corrs is not None),
      param_shardings=p_shardings, corr_shardings=c_shardings)
  rep = sharding.replicated(mesh)
  rows = sharding.batch_sharding(mesh, 2)
  args = (_abstract(params, p_shardings),
          _abstract(mats, jax.tree.map(lambda _: rep, mats)),
          None if corrs is None else _abstract(corrs, c_shardings),
          jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=rows),
          jax.ShapeDtypeStruct((batch, seq_len), jnp.float32, sharding=rows))
  info = {"params": model_lib.count_params(params), "d": plan.dim,
          "seq_len": seq_len, "blocks": len(plan.blocks),
          "corrections": None if corrs is None else dict(
              collections.Counter(c.kind for c in corrs.values()))}
  return kernel, args, info


def lower_gradients(*, config, mesh: Mesh, batch: int, seq_len: int | None = None,
                    loss_rows: int | None = None):
  """The Featurizer's jitted kernel, lowered: passages (`loss_rows` None) or
  query-like batches (the LM head on `loss_rows` positions an example)."""
  kernel, args, info = gradient_inputs(config=config, mesh=mesh, batch=batch,
                                       seq_len=seq_len)
  out = NamedSharding(mesh, P(sharding.DATA))  # Rows stay where their examples were.
  fn = jax.jit(kernel, out_shardings=out, static_argnames=("loss_rows",))
  return fn.lower(*args, loss_rows=loss_rows), info


def lower_r_step(*, mesh: Mesh, d: int, batch: int, dtype=jnp.float32):
  """The run's R step itself (`tda.hessian.r_accumulate`), on `hessian.r_arguments`."""
  dp, rows = hessian.r_shapes(mesh=mesh, d=d, rows=batch)
  return hessian.r_accumulate.lower(*hessian.r_arguments(mesh=mesh, d=dp, rows=rows,
                                                         dtype=dtype),
                                    **hessian.r_step_options(mesh))


def lower_r_to_host(*, mesh: Mesh, d: int):
  """One step of the run's copy of R to the hosts (`tda.hessian.r_to_host`: one
  DATA shard of R's rows, replicated), the same jitted function object."""
  dp, _ = hessian.r_shapes(mesh=mesh, d=d, rows=1)
  r_abs, _ = hessian.r_arguments(mesh=mesh, d=dp, rows=mesh.shape[sharding.DATA])
  return hessian.rows_replicated(mesh).lower(r_abs, 0, dp // mesh.shape[sharding.DATA])


def lower_scoring(*, devices, d: int, queries: int, chunk_rows: int, k: int):
  """One chunk of `tda.index` exact search: the real `_chunk_topk`, 1-D DATA mesh."""
  from tda import index
  mesh = Mesh(np.asarray(devices), (sharding.DATA,))
  rep = NamedSharding(mesh, P())
  chunk = -(-chunk_rows // len(devices)) * len(devices)
  s = lambda shape, dt, sh=rep: jax.ShapeDtypeStruct(shape, dt, sharding=sh)
  args = (s((queries, k), jnp.float32), s((queries, k), jnp.int32),
          s((queries, d), jnp.float32),
          s((chunk, d), jnp.float32, NamedSharding(mesh, P(sharding.DATA, None))),
          s((), jnp.int32), s((), jnp.int32))
  return index._chunk_topk.lower(*args, k=k, mesh=mesh), chunk


# --- Compile and measure -----------------------------------------------------------

def is_oom(err: BaseException) -> bool:
  msg = str(err)
  return "RESOURCE_EXHAUSTED" in msg or "Ran out of memory" in msg


def hbm_limit_from_error(msg: str) -> float | None:
  """The HBM bytes XLA may use per chip, as its compile-time OOM message states it.

  v5e reports "... available HBM (15.75G)"; v4 "Used 31.04G of 30.75G hbm".
  """
  m = (re.search(r"available HBM \(([\d.]+)G\)", msg) or
       re.search(r"Used [\d.]+G of ([\d.]+)G hbm", msg))
  return float(m.group(1)) * GIB if m else None


def compile_report(lowered, *, hbm_bytes: float | None) -> dict[str, Any]:
  """Compiles; per-chip memory and FLOPs, or `fits: False` with XLA's reason."""
  t0 = time.time()
  try:
    compiled = lowered.compile()
  except Exception as e:  # XLA raises JaxRuntimeError; only OOM is a result.
    if not is_oom(e):
      raise
    line = next((l for l in str(e).splitlines() if "RESOURCE_EXHAUSTED" in l or
                 "memory" in l), str(e)[:300])
    return {"fits": False, "error": line.strip()[:400], "compile_s": time.time() - t0,
            "hbm_available_bytes": hbm_limit_from_error(str(e))}
  ma = compiled.memory_analysis()
  mem = {f: int(getattr(ma, f + "_size_in_bytes", 0) or 0)
         for f in ("argument", "output", "temp", "generated_code", "alias")}
  total = mem["argument"] + mem["output"] + mem["temp"] + mem["generated_code"] - mem["alias"]
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older JAX: one dict per module.
    cost = cost[0] if cost else {}
  out = {"fits": True if hbm_bytes is None else total <= hbm_bytes,
         "memory_bytes": mem, "total_bytes": total,
         "hbm_bytes": hbm_bytes,
         "hbm_fraction": None if not hbm_bytes else total / hbm_bytes,
         "flops": float(cost.get("flops", 0.0)) if cost else None,
         "bytes_accessed": float(cost.get("bytes accessed", 0.0)) if cost else None,
         "compile_s": time.time() - t0}
  return out


def search_largest(*, fits: Callable[[int], bool], start: int = 1, limit: int = 1 << 16,
                   guess: Callable[[int, int | None], int | None] | None = None
                   ) -> tuple[int, list[tuple[int, bool]]]:
  """Largest n in [1, limit] with fits(n), assuming monotonicity: doubling, then bisection.

  Args:
    fits: the (expensive) probe.
    start: first n probed.
    limit: largest n considered.
    guess: optional `guess(lo, hi) -> n`: the next probe given the largest n known to
      fit (lo, 0 if none) and the smallest known not to (hi, None if none), e.g. a
      linear fit of memory; used when it falls strictly between them, so the
      search still ends, and each probe costs a full compile.

  Returns (largest, trials); largest is 0 when even n = 1 does not fit.
  """
  trials = []
  lo, hi = 0, None  # lo fits (0 trivially), hi does not.
  n = max(1, min(start, limit))
  while True:
    ok = fits(n)
    trials.append((n, ok))
    if ok:
      lo = n
    else:
      hi = n
    top = limit + 1 if hi is None else hi
    if top - lo <= 1:
      return lo, trials
    g = guess(lo, hi) if guess is not None else None
    if g is not None and lo < g < top:
      n = g
    elif hi is None:
      n = min(2 * lo, limit)
    else:
      n = (lo + hi) // 2


@dataclasses.dataclass(frozen=True)
class _Target:
  """What every step compiles against: the config on a slice's mesh."""
  config: ml_collections.ConfigDict
  devices: list[jax.Device]
  mesh: Mesh
  hbm: float | None              # Per-chip HBM bytes; None on the host's CPUs.
  log: Callable[[str], None]

  @property
  def chips(self) -> int:
    return len(self.devices)

  @property
  def n_data(self) -> int:
    return self.mesh.shape.get(sharding.DATA, 1)


def check_gradients(target: _Target, *, batch: int, step: str = "gradients",
                    seq_len: int | None = None,
                    loss_rows: int | None = None) -> dict[str, Any]:
  """The factored gradient kernel at `batch` examples a step on one process's chips,
  `seq_len` tokens long (default the config's), the LM head on `loss_rows` rows an
  example (None: every row); `step` names it in the log."""
  n = target.chips
  target.log(f"{step}: batch {batch}" + (f" x {seq_len} tokens" if seq_len else "")
             + (f", head on {loss_rows} rows" if loss_rows else "")
             + f" on one process's {n} chips")
  lowered, info = lower_gradients(config=target.config, mesh=target.mesh, batch=batch,
                                  seq_len=seq_len, loss_rows=loss_rows)
  rep = compile_report(lowered, hbm_bytes=target.hbm)
  rep.update(info, batch=batch, batch_per_chip=batch / n,
             batch_per_data_shard=batch // target.n_data, loss_rows=loss_rows)
  target.log(f"{step}: " + (f"{rep['total_bytes'] / GIB:.2f} GiB/chip" if rep["fits"]
                            else "does not fit") + f" ({rep['compile_s']:.0f} s)")
  return rep


def query_shape(config: ml_collections.ConfigDict) -> tuple[int, int | None]:
  """(length, loss_rows) of the run's shortest query batch: one length bucket, with
  a one-token target (`tda.gradients.loss_rows_for`); loss_rows None when queries
  that short run the full head."""
  t = min(config.gradients.length_bucket, config.data.seq_len)
  tokens = np.ones((1, t), np.int32)
  mask = np.zeros((1, t), np.float32)
  mask[:, -1] = 1.0
  return t, grad_lib.loss_rows_for(tokens, mask)


def check_queries(target: _Target, *, batch: int) -> dict[str, Any]:
  """The kernel as queries run it (`check_gradients` at `query_shape`): one length
  bucket, the LM head on their target rows (`loss_rows`)."""
  t, rows = query_shape(target.config)
  return check_gradients(target, batch=batch, step="queries", seq_len=t, loss_rows=rows)


def search_gradient_batch(target: _Target, *, first: dict[str, Any]) -> dict[str, Any]:
  """The largest gradient batch that compiles in HBM, from `check_gradients`'s report."""
  n_data, hbm = target.n_data, target.hbm
  start = first["batch"] // n_data
  used = {}  # shards -> per-chip bytes of the probes that fit.
  limit_bytes = [hbm or 0.0]  # What XLA says it can use, once an OOM tells us.
  if first["fits"]:
    used[start] = first["total_bytes"]

  def fits(shards):
    if shards == start:  # Compiled already.
      return first["fits"]
    r = compile_report(lower_gradients(config=target.config, mesh=target.mesh,
                                       batch=shards * n_data)[0], hbm_bytes=hbm)
    if r["fits"]:
      used[shards] = r["total_bytes"]
    elif r.get("hbm_available_bytes"):
      limit_bytes[0] = min(limit_bytes[0], r["hbm_available_bytes"])
    target.log(f"  batch {shards * n_data}: " + (
        f"fits, {r['total_bytes'] / GIB:.2f} GiB/chip" if r["fits"] else
        "does not fit") + f" ({r['compile_s']:.0f} s)")
    return r["fits"]

  def guess(lo, hi):
    # Memory grows ~linearly with the batch: extrapolate to the HBM from the two
    # largest probes that fit, and aim one below the boundary's far side.
    if hbm is None or len(used) < 2:
      return None
    (n0, b0), (n1, b1) = sorted(used.items())[-2:]
    slope = (b1 - b0) / (n1 - n0)
    if slope <= 0:
      return None
    pred = n1 + int((limit_bytes[0] - b1) // slope)
    return pred + 1 if pred == lo else pred

  best, trials = search_largest(fits=fits, start=max(1, start), guess=guess)
  return {"unit": "examples per DATA shard", "largest_batch": best * n_data,
          "largest_batch_per_chip": best * n_data / target.chips,
          "largest_batch_per_data_shard": best,
          "trials_batch": [(t * n_data, ok) for t, ok in trials]}


def check_r_step(target: _Target, *, d: int, r_batch: int,
                 devices: list[jax.Device] | None = None) -> dict[str, Any]:
  """One R accumulation step over `r_batch` φ rows (rounded up to the DATA axis), on
  R's own mesh over `devices` (default the target's), as the run builds it."""
  mesh = sharding.r_mesh(devices or target.devices)
  dp, rb = hessian.r_shapes(mesh=mesh, d=d, rows=r_batch)
  target.log(f"r_step: R [{dp}, {dp}] float32 over P(data, model) of the R mesh "
             f"{dict(mesh.shape)}, {rb} rows")
  rep = compile_report(lower_r_step(mesh=mesh, d=d, batch=rb), hbm_bytes=target.hbm)
  rep.update(d=d, d_padded=dp, rows=rb, function="tda.hessian.r_accumulate",
             r_sharding="P('data', 'model')", phi_sharding="P('data', None)",
             r_mesh=dict(mesh.shape))
  # R's copy to the hosts after the last step: one DATA shard of rows at a time.
  rep["to_host"] = compile_report(lower_r_to_host(mesh=mesh, d=d),
                                  hbm_bytes=target.hbm)
  rep["to_host"]["function"] = "tda.hessian.rows_replicated"
  rep["fits"] = rep["fits"] and rep["to_host"]["fits"]
  return rep


def check_scoring(target: _Target, *, d: int, queries: int) -> dict[str, Any]:
  """One chunk of exact search for `queries` queries."""
  index_cfg = target.config.index
  lowered, chunk = lower_scoring(devices=target.devices, d=d, queries=queries,
                                 chunk_rows=index_cfg.chunk_rows, k=index_cfg.k)
  target.log(f"scoring: {queries} queries x {chunk} rows, top-{index_cfg.k}")
  rep = compile_report(lowered, hbm_bytes=target.hbm)
  rep.update(d=d, queries=queries, chunk_rows=chunk, k=index_cfg.k,
             rows_sharding="P('data', None) over a 1-D mesh of one process's chips")
  return rep


def eigh_plan(config: ml_collections.ConfigDict, *, mesh: Mesh, d: int) -> dict[str, Any]:
  """`tda.hessian.eigh_plan` for the config on this mesh (analytic: the
  eigendecomposition runs on the hosts, see there)."""
  from tda import methods as methods_lib
  methods = methods_lib.gradient(config.eval.methods)
  blocks = ([b.dim for b in model_and_plan(config)[2].blocks]
            if config.hessian.block_diagonal else None)
  uses_r = [t for t in methods_lib.table_groups(methods)
            if hessian.r_key(t)[1] != methods_lib.R_NONE]
  processes = len({dev.process_index for dev in mesh.devices.flat})
  return hessian.eigh_plan(d=d, block_sizes=blocks, mesh_shape=dict(mesh.shape),
                           variants=len(methods_lib.variants(methods)),
                           tables=max(1, len(uses_r)),
                           sweep_rows=-(-config.hessian.sweep_pool // processes))


def check(*, config: ml_collections.ConfigDict, topology_name: str,
          batch_per_chip: float = 1.0, search_batch: bool = False,
          steps: tuple[str, ...] = STEPS, r_batch: int = 4096, queries: int = 1024,
          log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
  """Compiles the scale path for a topology; returns the report (see module doc).

  Args:
    config: the experiment config (mesh, model, gradients, index sections).
    topology_name: a key of `tda.topology.TOPOLOGIES`, or 'cpu' (host devices,
      tests only).
    batch_per_chip: gradient examples per chip and step; one process's batch
      (its chips × this) is rounded up to a multiple of the DATA axis (the
      Featurizer's rule).
    search_batch: also find the largest gradient batch that compiles in HBM.
    steps: which programs to compile (of STEPS).
    r_batch: φ rows per R step (rounded up to a multiple of the DATA axis).
    queries: queries scored per search step.
    log: progress sink.
  """
  unknown = set(steps) - set(STEPS)
  if unknown:
    raise ValueError(f"unknown steps {sorted(unknown)}; known: {', '.join(STEPS)}")
  if batch_per_chip <= 0:
    raise ValueError(f"batch_per_chip must be > 0, got {batch_per_chip}")
  topo = None if topology_name == topology_lib.CPU else topology_lib.get(topology_name)
  devices = topology_devices(name=topology_name)
  # The run featurises and searches per process, each on its own host's chips with
  # the config's mesh (`sharding.process_mesh`); only R spans every chip.
  host = process_devices(topology_name)
  if topology_name != topology_lib.CPU:
    per_host = collections.Counter(d.process_index for d in devices)
    if set(per_host.values()) != {len(host)}:
      raise ValueError(f"{topology_name}'s hosts hold {sorted(set(per_host.values()))} chips, "
                       f"its one-host slice {topology_lib.host_slice(topology_name)} "
                       f"{len(host)}")
  mesh = sharding.make_mesh(config, devices=host)
  target = _Target(config=config, devices=host, mesh=mesh,
                   hbm=None if topo is None else topo.hbm_gib * GIB, log=log)
  report: dict[str, Any] = {
      "config": config.name, "topology": topology_name,
      "device_kind": devices[0].device_kind, "chips": len(devices),
      "processes": len(devices) // len(host), "process_chips": len(host),
      "mesh": dict(mesh.shape), "hbm_gib": None if topo is None else topo.hbm_gib,
      "peak_bf16_tflops": None if topo is None else topo.peak_bf16_tflops,
      "libtpu": libtpu_version(), "jax": jax.__version__, "steps": {}}
  d = None
  batch = sharding.pad_to_multiple(max(1, round(batch_per_chip * target.chips)), mesh)
  if "gradients" in steps:
    grad = report["steps"]["gradients"] = check_gradients(target, batch=batch)
    d = grad["d"]
    if search_batch:
      report["batch_search"] = search_gradient_batch(target, first=grad)
  if "queries" in steps:
    report["steps"]["queries"] = check_queries(target, batch=batch)
  if d is None:
    d = model_and_plan(config)[2].dim
  if "r_step" in steps:
    report["steps"]["r_step"] = check_r_step(target, d=d, r_batch=r_batch, devices=devices)
  report["eigh_plan"] = eigh_plan(config, mesh=sharding.r_mesh(devices), d=d)
  if "scoring" in steps:
    report["steps"]["scoring"] = check_scoring(target, d=d, queries=queries)
  return report


def _size(n: float) -> str:
  return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / (1 << 20):.1f} MiB"


def format_report(report: dict[str, Any]) -> str:
  lines = [f"{report['config']} on {report['topology']} ({report['chips']} x "
           f"{report['device_kind']}; {report.get('processes', 1)} process(es) of "
           f"{report.get('process_chips', report['chips'])} chips, each featurising and "
           f"searching on its own with mesh {report['mesh']}; HBM/chip "
           f"{report['hbm_gib']} GiB; jax {report['jax']}, libtpu {report['libtpu']})"]
  for name, r in report["steps"].items():
    if not r["fits"]:
      why = r.get("error") or (f"compiles, but needs {_size(r['total_bytes'])} per chip "
                               f"of {report['hbm_gib']} GiB HBM")
      lines.append(f"  {name:9s} DOES NOT FIT: {why}")
      continue
    m = r["memory_bytes"]
    lines.append(
        f"  {name:9s} per chip: args {_size(m['argument'])}, out {_size(m['output'])}, "
        f"temp {_size(m['temp'])}, code {_size(m['generated_code'])}, alias "
        f"{_size(m['alias'])} = {_size(r['total_bytes'])}"
        + (f" ({100 * r['hbm_fraction']:.0f}% of HBM)" if r["hbm_fraction"] else "")
        + f"; {r['flops'] / 1e12:.4g} TFLOP/chip; compiled in {r['compile_s']:.1f} s")
    if "to_host" in r:
      t = r["to_host"]
      lines.append(f"  {'':9s} then to the hosts ({t['function']}, one DATA shard of rows a "
                   "step): " + (f"{_size(t['total_bytes'])} per chip" if t["fits"] else
                                f"DOES NOT FIT: {t.get('error', '')}"))
  if "eigh_plan" in report:
    e = report["eigh_plan"]
    lines.append(
        f"  eigh plan: R [{e['d']}, {e['d']}] accumulated on chip ({_size(e['r_bytes_per_chip'])}"
        f"/chip, {_size(e['r_bytes_total'])} in all); eigendecomposition on each host "
        f"({e['blocks']} block(s) of {e['largest_block']}, {e['dtype']}): 0 B/chip, "
        f"{_size(e['r_to_host_bytes_per_chip'])}/chip while R moves to the hosts; host peak "
        f"{_size(e['host_bytes_total'])} (phase {e['host_peak_phase']}: "
        + ", ".join(f"{k} {_size(v)}" for k, v in e["host_bytes_by_phase"].items())
        + f"); {e['eigh_flops'] / 1e12:.3g} TFLOP the eigendecomposition, "
        f"{e['host_flops_total'] / 1e12:.3g} TFLOP on the host in all")
  if "batch_search" in report:
    b = report["batch_search"]
    lines.append(f"  largest gradient batch that fits: {b['largest_batch']} a process "
                 f"= {b['largest_batch_per_chip']:g}/chip "
                 f"({b['largest_batch_per_data_shard']}/data shard); trials "
                 f"{b['trials_batch']}")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  with cli.stdout_to_stderr(f.json):
    report = check(config=f.config, topology_name=f.topology,
                   batch_per_chip=f.batch_per_chip, search_batch=f.search_batch,
                   steps=tuple(f.steps), r_batch=f.r_batch, queries=f.queries,
                   log=logging.info)
    if f.output:
      workdir_lib.write_json(f.output, report)
  if f.json:
    cli.print_json(report)
  else:
    print(format_report(report))


def _define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                  lock_config=True)
  flags.DEFINE_string("topology", "v5e-256", f"One of {', '.join(topology_lib.TOPOLOGIES)}, "
                      f"or {topology_lib.CPU!r} (tests only).")
  flags.DEFINE_float("batch_per_chip", 1.0, "Gradient examples per chip and step.")
  flags.DEFINE_bool("search_batch", False, "Find the largest gradient batch that fits.")
  flags.DEFINE_list("steps", list(STEPS), "Programs to compile.")
  flags.DEFINE_integer("queries", 1024, "Queries per scoring step.")
  flags.DEFINE_integer("r_batch", 4096, "φ rows per R accumulation step.")
  cli.define_json_flag()
  flags.DEFINE_string("output", None, "Also write the JSON report here (tda.plan reads it).")
  flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
  _define_flags()
  app.run(main)

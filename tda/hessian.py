"""Gauss-Newton Hessian approximation R, its inverse square root, and the method
transforms built from them (DESIGN.md §2).

R is the autocorrelation ΦᵀΦ/n of projected (and, per method, corrected)
per-example gradients: R_train over a sample of training passages, R_eval over
the dev queries (never the scored test queries; `tda.protocol`). TrackStar mixes
the unnormalised matrices, R = λ R_eval + (1 − λ) R_train, as the paper does.

λ by the paper's rule (`hessian.lambda_rule='top_k'`): the task-specific term
should downweight only the few directions every query shares (the prompt
template, the relation), about the top 1,000 of 65,536 in the paper. In R_eval's
eigenbasis (eigenvalues e_i, vectors u_i) let t_i = u_iᵀ R_train u_i; the mixed R
weighs direction i more by R_eval than by R_train when λ e_i > (1 − λ) t_i, i.e.
λ > 1 / (1 + e_i / t_i). λ = 1 / (1 + ρ_K), ρ_K the K-th largest ratio e_i / t_i,
so exactly the K directions most specific to the queries are dominated by R_eval
(K = `lambda_top_k_fraction` × d, at least 1). The rule is invariant to the scale
of either matrix: scaling R_eval by c rescales λ/(1 − λ) by 1/c. 'fixed' uses
`hessian.lambda_` on the unnormalised matrices; 'fixed_normalised' (a labelled
variant, not the paper's) first scales both to unit mean eigenvalue.

R^{-1/2} = U diag((μ + δ)^-1/2) Uᵀ by eigendecomposition, δ = damping × mean
eigenvalue; full d × d or block-diagonal over projection blocks. The damping of
every R-using method is chosen on dev queries from `hessian.damping_candidates`,
extended past an end that holds the best (`hessian.damping_extend_steps`;
`tda.featurize.fit_whiteners`); the eigendecomposition is shared by every
candidate, and the sweep works in its eigenbasis (`Eigen.rotate`, `Eigen.scales`):
the dev vectors are rotated once and rescaled per candidate, and R^{-1/2} is formed
once, for the chosen damping.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from tda import methods as methods_lib
from tda import protocol
from tda import sharding

LAMBDA_RULES = ("top_k", "fixed", "fixed_normalised")

R_CHUNK = 4096          # φ rows per accumulation step.
F32_UNIT_ROUNDOFF = 2.0 ** -24


def _r_accumulate(r_dd, x_nd, *, gathered):
  """R += xᵀx over a batch of rows, accumulated in float32.

  The rows arrive split over DATA; `gathered` (the mesh, replicated) first
  all-gathers them, so each device forms its own R tile from all rows with no
  further communication. Left to itself XLA instead forms a [d, d / |MODEL|]
  partial product per device and all-reduces it: on v5e-256 at d = 65,536, 4 GiB
  of temporaries and of traffic a step, against 0.5 GiB gathered."""
  x = jax.lax.with_sharding_constraint(x_nd.astype(jnp.float32), gathered)
  return r_dd + jnp.dot(x.T, x, preferred_element_type=jnp.float32)


# The one R accumulation step: the run calls it (`autocorrelation`) and
# `tda.compile_check` compiles it, on arguments placed by `r_arguments`: R by
# `sharding.r_sharding` (P(DATA, MODEL)), the rows by `sharding.batch_sharding`
# (P(DATA)), and `r_step_options`. R is donated, so each step updates the sharded
# array in place.
r_accumulate = jax.jit(_r_accumulate, donate_argnums=0, static_argnames=("gathered",))


def r_step_options(mesh) -> dict[str, Any]:
  """`r_accumulate`'s static options on `mesh`."""
  return {"gathered": sharding.replicated(mesh)}


def r_mesh(mesh=None):
  """The mesh R is accumulated on: `mesh`, or this process's devices
  (`sharding.r_mesh`)."""
  return mesh if mesh is not None else sharding.r_mesh(jax.local_devices())


def r_shapes(*, mesh, d: int, rows: int):
  """(padded d, rows per step) for R [d, d] over `rows` φ rows a step on `mesh`."""
  side = sharding.r_side_multiple(mesh.shape)
  dp = -(-d // side) * side
  return dp, sharding.pad_to_multiple(max(1, rows), mesh)


def r_arguments(*, mesh, d: int, rows: int, dtype=jnp.float32):
  """`r_accumulate`'s abstract arguments (R [d, d] float32, φ [rows, d]) with their
  shardings; d and rows must divide as `r_shapes` pads them."""
  return (jax.ShapeDtypeStruct((d, d), jnp.float32, sharding=sharding.r_sharding(mesh)),
          jax.ShapeDtypeStruct((rows, d), dtype, sharding=sharding.batch_sharding(mesh, 2)))


HOST_FLOAT64_MAX = 2048
"""R matrices on the host are float64 up to this side and float32 above it (a
65,536² matrix is then 16 GiB, not 32); `eigen` decomposes blocks likewise."""


def host_dtype(side: int):
  return np.float64 if side <= HOST_FLOAT64_MAX else np.float32


def _mesh_processes(mesh) -> list[int]:
  return sorted({dev.process_index for dev in mesh.devices.flat})


def _local_rows(xs, shape) -> int:
  """How many of a [rows, d] array's rows sharded by `xs` this process holds."""
  spans = {(i[0].start or 0, shape[0] if i[0].stop is None else i[0].stop)
           for i in xs.addressable_devices_indices_map(shape).values()}
  return sum(b - a for a, b in spans)


def r_to_host(r_dd, d: int) -> np.ndarray:
  """R [dp, dp] on the mesh -> [d, d] numpy (`host_dtype`) on every process.

  Fully addressable (one process): read directly. Otherwise R is copied to every
  host one DATA shard of rows at a time (a static row slice replicated over the
  mesh), so no chip ever holds more than dp / |DATA| rows of it (65,536² on
  v5e-256's 64 × 4 R mesh: 256 MiB a step, 64 steps), and each host assembles R
  once, float32.
  """
  dt = host_dtype(d)
  if r_dd.is_fully_addressable:
    return np.asarray(r_dd)[:d, :d].astype(dt)
  mesh = r_dd.sharding.mesh
  dp = r_dd.shape[0]
  step = dp // mesh.shape.get(sharding.DATA, 1)
  out = np.empty((d, d), dt)
  for s in range(0, d, step):
    rows = _r_rows(r_dd, s, step)  # [step, dp], replicated: every host has it.
    part = np.asarray(rows.addressable_shards[0].data)
    out[s:s + step] = part[:min(step, d - s), :d]
  return out


def _slice_rows(r_dd, start: int, size: int):
  return jax.lax.slice_in_dim(r_dd, start, start + size, axis=0)


@functools.lru_cache(maxsize=8)
def rows_replicated(mesh):
  """A static row slice of R, replicated over `mesh` (`r_to_host`)."""
  return jax.jit(_slice_rows, static_argnums=(1, 2), out_shardings=sharding.replicated(mesh))


def _r_rows(r_dd, start: int, size: int):
  return rows_replicated(r_dd.sharding.mesh)(r_dd, start, size)


def autocorrelation(*, vectors_nd: np.ndarray, chunk: int = R_CHUNK,
                    mesh=None) -> tuple[np.ndarray, int]:
  """(Σ φφᵀ [d, d], n) over the rows of every process `mesh` spans, accumulated
  on device, sharded over `mesh`.

  R lives on the mesh as one float32 array sharded by `sharding.r_sharding`
  (padded to a side that divides it); each step `r_accumulate`s a block of rows
  placed over DATA (zero-padded: zero rows add nothing). On a mesh over several
  processes (the run's global R mesh, `sharding.r_mesh()`), every process
  calls this with its own share of the rows: each step's block is assembled from
  every process's rows (`jax.make_array_from_process_local_data`) and the mesh's
  collectives sum R, in an order fixed by the topology; all processes take the
  same number of steps. R then comes to every host once (`r_to_host`). Returns
  (the sum over all rows, the total row count), in `host_dtype(d)`.

  Numerics: float32 accumulation. Against the float64 sum of the same float32 rows,
  each entry is within `r_error_bound` (first-order γ_m = m u, u = 2^-24,
  m = chunk + ⌈n / chunk⌉ terms in any summation order, times Σ_k |φ_ki φ_kj|
  ≤ sqrt(R_ii R_jj) by Cauchy–Schwarz).
  """
  x = np.asarray(vectors_nd)
  n, d = x.shape
  mesh = r_mesh(mesh)
  procs = _mesh_processes(mesh)
  if len(procs) == 1:
    if procs[0] != jax.process_index():
      raise ValueError("autocorrelation: the mesh holds none of this process's devices")
    counts = np.array([[n, d]])
  else:
    if procs != list(range(jax.process_count())):
      raise ValueError(f"autocorrelation: a mesh over processes {procs} must span all "
                       f"{jax.process_count()} processes")
    from jax.experimental import multihost_utils
    counts = np.asarray(multihost_utils.process_allgather(np.array([n, d], np.int64)))
    counts = counts.reshape(len(procs), 2)
    if len(set(counts[:, 1].tolist())) != 1:
      raise ValueError(f"autocorrelation: processes have rows of different widths "
                       f"{counts[:, 1].tolist()}")
    owners = collections.defaultdict(set)
    for idx, dev in np.ndenumerate(mesh.devices):
      owners[idx[list(mesh.axis_names).index(sharding.DATA)]].add(dev.process_index)
    if any(len(p) > 1 for p in owners.values()):
      raise ValueError("autocorrelation: a DATA shard of this mesh spans several processes "
                       "(its MODEL axis crosses processes); use sharding.r_mesh()")
  n_max = int(counts[:, 0].max())
  # `chunk` rows a step in all (what `tda.compile_check` compiles), each process
  # supplying the share its devices hold.
  dp, rows = r_shapes(mesh=mesh, d=d, rows=min(chunk, len(procs) * max(n_max, 1)))
  rs, xs = sharding.r_sharding(mesh), sharding.batch_sharding(mesh, 2)
  local = _local_rows(xs, (rows, dp))
  r = jnp.zeros((dp, dp), jnp.float32, device=rs)
  for s in range(0, n_max, local):
    block = np.zeros((local, dp), x.dtype)
    block[:max(0, min(local, n - s)), :d] = x[s:s + local]
    placed = (jax.device_put(block, xs) if len(procs) == 1 else
              jax.make_array_from_process_local_data(xs, block, (rows, dp)))
    r = r_accumulate(r, placed, **r_step_options(mesh))
  return r_to_host(r, d), int(counts[:, 0].sum())


def r_error_bound(*, r_dd: np.ndarray, n: int, chunk: int = R_CHUNK,
                  steps: int | None = None) -> np.ndarray:
  """[d, d] bound on |`autocorrelation` − the float64 sum| entrywise (its docstring):
  γ_m sqrt(R_ii R_jj), γ_m = m u / (1 − m u), m = b + steps, b = min(chunk, n) rows
  a step, steps = ⌈n / b⌉ unless given (processes with unequal shares take more)."""
  b = max(1, min(chunk, n))
  m = b + (-(-n // b) if steps is None else steps)
  gamma = m * F32_UNIT_ROUNDOFF / (1 - m * F32_UNIT_ROUNDOFF)
  diag = np.maximum(np.diag(np.asarray(r_dd, np.float64)), 0.0)
  return gamma * (1 + gamma) * np.sqrt(np.outer(diag, diag))


def normalized(r_dd: np.ndarray) -> np.ndarray:
  """R scaled to unit mean eigenvalue."""
  tr = np.trace(r_dd) / r_dd.shape[0]
  if not np.isfinite(tr) or tr <= 0:
    raise ValueError("autocorrelation matrix has zero or non-finite trace")
  return r_dd / tr


def mix(*, r_train: np.ndarray, r_eval: np.ndarray, lam: float,
        normalise: bool = False) -> np.ndarray:
  """λ R_eval + (1 − λ) R_train (each first scaled to unit mean eigenvalue if `normalise`)."""
  if not 0.0 <= lam <= 1.0:
    raise ValueError(f"λ must be in [0, 1], got {lam}")
  if normalise:
    r_eval, r_train = normalized(r_eval), normalized(r_train)
  return lam * r_eval + (1.0 - lam) * r_train


def top_k_of(d: int, fraction: float) -> int:
  """K = round(fraction × d), at least 1 (the paper: 1,000 of 65,536)."""
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"hessian.lambda_top_k_fraction must be in (0, 1], got {fraction}")
  return max(1, int(round(fraction * d)))


def lambda_top_k(*, r_train: np.ndarray, r_eval: np.ndarray,
                 top_k: int) -> tuple[float, dict[str, Any]]:
  """The paper's λ rule on the unnormalised matrices (module docstring).

  Returns:
    (λ, {"top_k", "rho_k" (the K-th largest e_i / t_i), "dominated" (how many
    of R_eval's eigen-directions the mixed R weighs more by R_eval)}).
  """
  d = r_eval.shape[0]
  if r_train.shape != (d, d):
    raise ValueError(f"R_train {r_train.shape} and R_eval {r_eval.shape} differ in shape")
  top_k = int(min(max(top_k, 1), d))
  dt = host_dtype(d)
  e, u = scipy.linalg.eigh(_symmetric(r_eval, dt), driver="evd", overwrite_a=True,
                           check_finite=False)
  # t_i = u_iᵀ R_train u_i: one matrix product (d³ flops through BLAS).
  t = np.einsum("di,di->i", u, np.asarray(r_train, dt) @ u).astype(np.float64)
  e = e.astype(np.float64)
  scale = max(float(np.trace(r_train)) / d, 1e-300)
  rho = np.maximum(e, 0.0) / np.maximum(t, 1e-12 * scale)
  rho_k = float(np.sort(rho)[::-1][top_k - 1])
  if not np.isfinite(rho_k) or rho_k <= 0:
    raise ValueError(f"R_eval has fewer than K={top_k} directions with positive variance "
                     "(too few dev queries?); lower hessian.lambda_top_k_fraction")
  lam = 1.0 / (1.0 + rho_k)
  dominated = int((lam * np.maximum(e, 0) > (1 - lam) * t * (1 + 1e-9)).sum())
  return float(lam), {"top_k": top_k, "rho_k": rho_k, "dominated": dominated}


def choose_lambda(*, r_train: np.ndarray, r_eval: np.ndarray, rule: str, lam: float,
                  top_k_fraction: float) -> tuple[float, dict[str, Any]]:
  """λ and how it was chosen, per `hessian.lambda_rule`."""
  if rule not in LAMBDA_RULES:
    raise ValueError(f"hessian.lambda_rule must be one of {LAMBDA_RULES}, got {rule!r}")
  if rule == "top_k":
    value, info = lambda_top_k(r_train=r_train, r_eval=r_eval,
                               top_k=top_k_of(r_eval.shape[0], top_k_fraction))
    return value, {"rule": rule, "top_k_fraction": top_k_fraction, **info}
  if not 0.0 <= lam <= 1.0:
    raise ValueError(f"hessian.lambda_ must be in [0, 1], got {lam}")
  return float(lam), {"rule": rule}


def mixed_r(*, r_train: np.ndarray, r_eval: np.ndarray, lam: float, rule: str) -> np.ndarray:
  return mix(r_train=r_train, r_eval=r_eval, lam=lam, normalise=rule == "fixed_normalised")


@dataclasses.dataclass
class Eigen:
  """Eigendecomposition of R, per diagonal block: [(offset, w, U)]."""
  d: int
  blocks: list[tuple[int, np.ndarray, np.ndarray]]

  def scales(self, damping: float) -> np.ndarray:
    """[d] (μ + δ)^{-1/2} per eigenvalue μ, block by block, δ = damping × the
    block's mean eigenvalue: R^{-1/2} = U diag(scales) Uᵀ."""
    if not damping >= 0:
      raise ValueError(f"damping must be >= 0, got {damping}")
    out = []
    for _, w, _ in self.blocks:
      w = np.maximum(w, 0.0)
      w = w + damping * max(w.sum() / len(w), 1e-30)
      out.append(np.maximum(w, 1e-300) ** -0.5)
    return np.concatenate(out)

  def rotate(self, x_nd: np.ndarray) -> np.ndarray:
    """[n, d] Uᵀx per block (in the eigenvectors' dtype). Since U is orthogonal,
    R^{-1/2}x and scales ⊙ Uᵀx have the same norms and inner products, so a damping
    sweep rotates its vectors once and rescales them per candidate (O(n d)) instead
    of forming R^{-1/2} per candidate (2 d³)."""
    x = np.asarray(x_nd)
    out = np.empty(x.shape, np.result_type(*(u.dtype for _, _, u in self.blocks)))
    for s, _, u in self.blocks:
      out[:, s:s + len(u)] = x[:, s:s + len(u)].astype(u.dtype) @ u
    return out

  def inv_sqrt(self, damping: float) -> np.ndarray:
    """(R + δI)^{-1/2} per block, δ = damping × the block's mean eigenvalue."""
    scales = self.scales(damping)
    out = None if len(self.blocks) == 1 else np.zeros((self.d, self.d), host_dtype(self.d))
    for s, _, u in self.blocks:
      b = len(u)
      blk = (u * scales[s:s + b].astype(u.dtype)) @ u.T
      if out is None:  # One block: the product is R^{-1/2} (no second d × d copy).
        return blk.astype(host_dtype(self.d), copy=False)
      out[s:s + b, s:s + b] = blk
    return out


def _symmetric(a: np.ndarray, dtype) -> np.ndarray:
  """(a + aᵀ) / 2 as a new Fortran-ordered array of `dtype` (LAPACK's order, so
  `scipy.linalg.eigh(..., overwrite_a=True)` decomposes it in place, no copy)."""
  a = np.asarray(a)
  out = np.asfortranarray(a, dtype=dtype) if a.dtype != dtype else np.array(a, order="F")
  out += a.T
  out *= 0.5
  return out


def eigen(*, r_dd: np.ndarray, block_sizes: Sequence[int] | None = None) -> Eigen:
  """Eigendecomposition of the symmetrised R per diagonal block: LAPACK's divide
  and conquer (`syevd`: the eigenvectors overwrite the symmetrised copy; its
  workspace is ~2 b² elements) in float64 for blocks up to `HOST_FLOAT64_MAX`,
  float32 above (damping keeps the damped matrix well conditioned, so float32
  suffices there, and the b³ work and b² memory halve)."""
  d = r_dd.shape[0]
  if block_sizes is None:
    block_sizes = [d]
  if sum(block_sizes) != d:
    raise ValueError(f"block sizes sum to {sum(block_sizes)}, not d={d}")
  blocks, s = [], 0
  for b in block_sizes:
    blk = _symmetric(r_dd[s:s + b, s:s + b], host_dtype(b))
    w, u = scipy.linalg.eigh(blk, driver="evd", overwrite_a=True, check_finite=False)
    del blk
    blocks.append((s, w.astype(np.float64), u))
    s += b
  return Eigen(d, blocks)


def eigh_plan(*, d: int, block_sizes: Sequence[int] | None, mesh_shape: Mapping[str, int],
              variants: int = 2, tables: int = 1, sweep_rows: int = 0) -> dict[str, Any]:
  """Where and in how much memory and work R and its eigendecomposition live at
  dimension d.

  R is accumulated on the global R mesh (`sharding.r_mesh`; `r_accumulate`: a
  float32 tile of the padded [d, d] per chip; the mesh's collectives sum every
  process's rows), then copied to every host once, one DATA shard of rows at a time
  (`r_to_host`: dp² / |DATA| float32 per chip while it moves). Each host then
  chooses λ, eigendecomposes (LAPACK syevd via scipy), sweeps the damping on the dev
  pool in R's eigenbasis and forms R^{-1/2} once, in host memory, not HBM.
  Host matrices are s = 8 bytes an entry up to `HOST_FLOAT64_MAX`, 4 above
  (`host_dtype`). The host's peak is the largest of its phases, each counting what
  is alive then (M = s d², one d × d matrix; B = s_b b², the largest block):
    inputs: R_train and R_eval per variant (2 · variants · M), plus each table's
      mixed R (tables · M) once λ is chosen;
    λ (the paper's rule, `lambda_top_k`): inputs + R_eval's symmetrised copy,
      its eigenvectors and R_train times them (3 M);
    eigh: inputs + mixed R + the symmetrised block, which syevd overwrites with
      the eigenvectors, and syevd's workspace (~2 B): 3 B
      + the eigenvectors of the blocks already done (< M);
    sweep (the mixed R freed): inputs + the eigenvectors (~M) + the rotated dev
      vectors and one rescaled copy (2 · sweep_rows · d · s_b);
    R^{-1/2}: inputs + the eigenvectors (~M) + one scaled block (B) + R^{-1/2}
      (M, and a float32 copy when s = 8).

  Args:
    d: R's dimension; block_sizes: the diagonal blocks (None: one d × d block);
    mesh_shape: axis -> size of the mesh R is accumulated on;
    variants: gradient variants estimated (raw, corrected); tables: R-using tables;
    sweep_rows: dev queries + dev pool rows this process holds in the sweep.
  """
  blocks = list(block_sizes) if block_sizes else [d]
  chips = int(np.prod(list(mesh_shape.values())))
  side = sharding.r_side_multiple(mesh_shape)
  dp = -(-d // side) * side
  b = max(blocks)
  s = np.dtype(host_dtype(d)).itemsize
  sb = np.dtype(host_dtype(b)).itemsize
  m, blk = s * d * d, sb * b * b
  inputs = 2 * variants * m
  phases = {"lambda": inputs + 3 * m,
            "eigh": inputs + tables * m + 3 * blk + sb * (d * d - b * b),
            "sweep": inputs + sb * d * d + 2 * sweep_rows * d * sb,
            "inv_sqrt": inputs + sb * d * d + blk + m + (4 * d * d if s == 8 else 0)}
  peak = max(phases.items(), key=lambda kv: kv[1])
  eigh_flops = float(sum(9 * x ** 3 for x in blocks))  # syevd with vectors: ~9 b³.
  return {"d": d, "blocks": len(blocks), "largest_block": b,
          "dtype": np.dtype(host_dtype(b)).name,
          "where": "host (scipy.linalg.eigh, LAPACK syevd), every process",
          "r_accumulation": "tda.hessian.r_accumulate on the global R mesh "
                            "(sharding.r_mesh), float32, P('data', 'model'); summed "
                            "across processes by the mesh",
          "r_bytes_per_chip": 4 * dp * dp // chips, "r_bytes_total": 4 * dp * dp,
          "r_to_host_bytes_per_chip": 4 * dp * dp // mesh_shape.get(sharding.DATA, 1),
          "eigh_bytes_per_chip": 0,
          "host_bytes_by_phase": phases, "host_peak_phase": peak[0],
          "eigh_host_bytes_peak": 3 * blk, "host_bytes_inputs": inputs + tables * m,
          "host_bytes_total": peak[1],
          # λ's eigendecomposition (d³ ~9) and R_train times its vectors (2 d³), each
          # table's (9 b³ per block), the sweep's rotation (2 rows d b) and R^{-1/2}
          # (2 b³ per block).
          "eigh_flops": eigh_flops,
          "host_flops_total": float(11 * d ** 3 + tables * (eigh_flops + sum(
              2 * x ** 3 + 2 * sweep_rows * x * x for x in blocks)))}


def inv_sqrt(*, r_dd: np.ndarray, damping: float,
             block_sizes: Sequence[int] | None = None) -> np.ndarray:
  """(R + δI)^{-1/2}, δ = damping × mean eigenvalue; block-diagonal if block_sizes."""
  return eigen(r_dd=r_dd, block_sizes=block_sizes).inv_sqrt(damping)


def r_key(method: str) -> tuple[str, str]:
  """(variant, R kind): methods with the same key whiten with the same R."""
  spec = methods_lib.switches(method)
  return spec.variant, spec.r


@dataclasses.dataclass
class Whiteners:
  """Per-method whitening matrices (None: no R), λ and what chose them."""
  matrices: dict[str, np.ndarray | None]
  lam: float | None
  lambda_info: dict[str, Any] = dataclasses.field(default_factory=dict)
  damping: dict[str, float] = dataclasses.field(default_factory=dict)

  def transform(self, *, method: str, vectors_nd: np.ndarray) -> np.ndarray:
    return apply(vectors_nd=vectors_nd, whitener=self.matrices[method],
                 unit=methods_lib.switches(method).unit)


def r_matrices(*, methods: Sequence[str], r_train: dict[str, np.ndarray],
               r_eval: dict[str, np.ndarray], lambda_rule: str, lam: float,
               top_k_fraction: float) -> tuple[dict[tuple[str, str], np.ndarray],
                                               float | None, dict[str, Any]]:
  """The R of every (variant, R kind) the methods use, and λ (chosen on the
  corrected variant, else the raw one, and used for every mixed R)."""
  out: dict[tuple[str, str], np.ndarray] = {}
  chosen, info = None, {}
  for name in methods:
    key = r_key(name)
    if key[1] == methods_lib.R_NONE or key in out:
      continue
    v = key[0]
    if key[1] == methods_lib.R_TRAIN:
      out[key] = r_train[v]
      continue
    if chosen is None:
      ref = methods_lib.CORRECTED if methods_lib.CORRECTED in r_eval else v
      chosen, info = choose_lambda(r_train=r_train[ref], r_eval=r_eval[ref], rule=lambda_rule,
                                   lam=lam, top_k_fraction=top_k_fraction)
    out[key] = mixed_r(r_train=r_train[v], r_eval=r_eval[v], lam=chosen, rule=lambda_rule)
  return out, chosen, info


@dataclasses.dataclass
class Prepared:
  """Each (variant, R kind)'s eigendecomposition and λ: whiteners for any damping
  cost one matrix product per R (`whiteners`)."""
  methods: list[str]
  eigs: dict[tuple[str, str], Eigen]
  lam: float | None
  lambda_info: dict[str, Any]

  def whiteners(self, damping: float | Mapping[str, float]) -> Whiteners:
    """damping: one value for every method, or method -> value."""
    cache: dict[tuple[str, str, float], np.ndarray] = {}
    out, used = {}, {}
    for name in self.methods:
      key = r_key(name)
      if key[1] == methods_lib.R_NONE:
        out[name] = None
        continue
      dmp = float(damping[name] if isinstance(damping, Mapping) else damping)
      if key + (dmp,) not in cache:
        cache[key + (dmp,)] = self.eigs[key].inv_sqrt(dmp).astype(np.float32, copy=False)
      out[name] = cache[key + (dmp,)]
      used[name] = dmp
    return Whiteners(out, self.lam, self.lambda_info, used)


def prepare(*, methods: Sequence[str], r_train: dict[str, np.ndarray],
            r_eval: dict[str, np.ndarray], lambda_rule: str = "top_k", lam: float = 0.9,
            top_k_fraction: float = 1000 / 65536,
            block_sizes: Sequence[int] | None = None) -> Prepared:
  """λ and one eigendecomposition per (variant, R) the methods use.

  Args:
    methods: gradient method names (`tda.methods`).
    r_train, r_eval: per variant ('raw'/'corrected'), mean autocorrelations
      (R_eval from dev queries).
    lambda_rule, lam, top_k_fraction: see `choose_lambda`.
    block_sizes: block-diagonal R over these blocks (None: full).
  """
  rs, chosen, info = r_matrices(methods=methods, r_train=r_train, r_eval=r_eval,
                                lambda_rule=lambda_rule, lam=lam,
                                top_k_fraction=top_k_fraction)
  eigs = {k: eigen(r_dd=r, block_sizes=block_sizes) for k, r in rs.items()}
  return Prepared(list(methods), eigs, chosen, info)


def build_whiteners(*, methods: Sequence[str], r_train: dict[str, np.ndarray],
                    r_eval: dict[str, np.ndarray], damping: float | Mapping[str, float],
                    lambda_rule: str = "top_k", lam: float = 0.9,
                    top_k_fraction: float = 1000 / 65536,
                    block_sizes: Sequence[int] | None = None) -> Whiteners:
  """Whitening matrix per method (`prepare(...).whiteners(damping)`)."""
  return prepare(methods=methods, r_train=r_train, r_eval=r_eval, lambda_rule=lambda_rule,
                 lam=lam, top_k_fraction=top_k_fraction,
                 block_sizes=block_sizes).whiteners(damping)


def apply_np(*, vectors_nd: np.ndarray, whitener: np.ndarray | None, unit: bool) -> np.ndarray:
  """`apply` in numpy float64 (small sweeps: no compilation per shape)."""
  y = np.asarray(vectors_nd, np.float64)
  if whitener is not None:
    y = y @ np.asarray(whitener, np.float64)
  if unit:
    y = y / np.maximum(np.linalg.norm(y, axis=-1, keepdims=True), 1e-30)
  return y


@jax.jit
def _whiten_unit(x_nd, w_dd):
  y = x_nd.astype(jnp.float32) @ w_dd
  return y / jnp.maximum(jnp.linalg.norm(y, axis=-1, keepdims=True), 1e-30)


@jax.jit
def _whiten(x_nd, w_dd):
  return x_nd.astype(jnp.float32) @ w_dd


@jax.jit
def _unit(x_nd):
  x = x_nd.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-30)


def apply(*, vectors_nd, whitener: np.ndarray | None, unit: bool) -> np.ndarray:
  """G = unit(R^{-1/2} φ) (or parts of it). R^{-1/2} is symmetric, so x @ W."""
  x = jnp.asarray(vectors_nd)
  if whitener is not None:
    y = _whiten_unit(x, whitener) if unit else _whiten(x, whitener)
  else:
    y = _unit(x) if unit else x.astype(jnp.float32)
  return np.array(y)  # A writable copy.


def sample_effect(*, pool_nd: np.ndarray, queries_qd: np.ndarray, relevant_qn: np.ndarray,
                  r_as_run: np.ndarray, dampings: Sequence[float],
                  block_sizes: Sequence[int] | None = None, seed: int = 0,
                  top: int = 10, top_norm_fraction: float = 0.05) -> dict[str, Any]:
  """What R_train's sample does to an unnormalised R-method (TRAK): the same scores
  with R fitted on every candidate versus on a seeded random half of them.

  A candidate inside R's sample has a whitened squared norm of at most n times its
  leverage; one outside it can carry unbounded energy in R's small-eigenvalue
  directions, which an unnormalised score then rewards. At scale R comes from a small
  sample and nearly every candidate is outside it; a corpus smaller than
  `hessian.train_samples` puts every candidate inside. A diagnostic: it chooses
  nothing.

  Args:
    pool_nd: [N, d] the candidates' raw (unwhitened, unnormalised) vectors.
    queries_qd: [Q, d] the queries' raw vectors.
    relevant_qn: [Q, N] whether candidate n entails query q's fact.
    r_as_run: [d, d] the R_train the run used.
    dampings: the dampings to score (× mean eigenvalue, `Eigen.scales`).
    block_sizes: R's diagonal blocks (None: full R).
    seed: seeds the half.
    top: the retrieved depth the shares are measured at.
    top_norm_fraction: the share of highest whitened norms `top_in_highest_norms`
      counts.

  Returns:
    {"half": size of the half R is fitted on, "unwhitened_mrr": MRR without R,
    "by_damping": [{"damping", "mrr_as_run", "mrr_half", "out_of_sample_share_top",
    "top_in_highest_norms", "norm_out_over_in"}]}: with R from the half, the share
    of the other half among the top `top` (0.5 if the sample did not matter), the
    share of the top held by the `top_norm_fraction` highest whitened norms, and the
    median whitened norm outside the sample over inside it.
  """
  pool_nd = np.asarray(pool_nd, np.float64)
  queries_qd = np.asarray(queries_qd, np.float64)
  relevant_qn = np.asarray(relevant_qn, bool)
  n = len(pool_nd)
  if n < 4 or relevant_qn.shape != (len(queries_qd), n):
    raise ValueError(f"need >= 4 candidates and relevant [Q, N] = {(len(queries_qd), n)}, "
                     f"got {n} candidates and {relevant_qn.shape}")
  in_half = np.zeros(n, bool)
  in_half[np.random.default_rng([seed, 11]).permutation(n)[: n // 2]] = True
  half = pool_nd[in_half]
  eig = {"as_run": eigen(r_dd=np.asarray(r_as_run, np.float64), block_sizes=block_sizes),
         "half": eigen(r_dd=half.T @ half / len(half), block_sizes=block_sizes)}
  rot = {k: (e.rotate(queries_qd), e.rotate(pool_nd)) for k, e in eig.items()}

  def mrr(scores_qn):
    return protocol.mrr_from_ranks(protocol.first_relevant_rank(
        scores_qn=scores_qn, relevant_qn=relevant_qn))

  rows = []
  k = min(top, n)
  for c in dampings:
    row: dict[str, Any] = {"damping": float(c)}
    for name, e in eig.items():
      sc = e.scales(float(c))
      q, p = rot[name][0] * sc, rot[name][1] * sc
      s_qn = q @ p.T
      row[f"mrr_{name}"] = mrr(s_qn)
      if name == "half":
        top_qk = np.argsort(-s_qn, axis=1, kind="stable")[:, :k]
        norms = np.linalg.norm(p, axis=1)
        highest = np.argsort(-norms, kind="stable")[:max(1, int(round(top_norm_fraction * n)))]
        row["out_of_sample_share_top"] = float((~in_half[top_qk]).mean())
        row["top_in_highest_norms"] = float(np.isin(top_qk, highest).mean())
        row["norm_out_over_in"] = float(np.median(norms[~in_half]) / np.median(norms[in_half]))
    rows.append(row)
  return {"half": int(in_half.sum()), "candidates": n, "queries": len(queries_qd),
          "top": k, "top_norm_fraction": top_norm_fraction,
          "unwhitened_mrr": mrr(queries_qd @ pool_nd.T), "by_damping": rows}

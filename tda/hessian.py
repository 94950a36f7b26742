"""Gauss-Newton Hessian approximation R, its inverse square root, and the method
transforms built from them (DESIGN.md §2).

R is the autocorrelation ΦᵀΦ/n of projected (and, per method, corrected)
per-example gradients: R_train over a sample of training passages, R_eval over the
queries. Before mixing, each is scaled to unit mean eigenvalue (trace/d = 1), so λ
weighs their *shapes*, not the very different gradient norms of queries and
passages: R = λ R̂_eval + (1 − λ) R̂_train.

Automatic λ (`lambda_='auto'`): the task-specific R exists to downweight the
directions every query shares (the prompt template, the relation), which carry no
information about which fact is asked. We take the smallest λ on a grid for which
the top-K eigen-directions of R_eval lie inside the top-K eigen-directions of the
mixed R (subspace overlap ‖U_evalᵀ U_mixed‖²_F / K ≥ `overlap`), so R^{-1/2}
downweights them at least as strongly as the training set's own top-K directions.

R^{-1/2} = U diag((μ + δ)^-1/2) Uᵀ by eigendecomposition, with damping δ =
`damping` × mean eigenvalue; full d × d or block-diagonal over projection blocks.

Damping default (1.0 × the mean eigenvalue): R estimated from fewer examples than
d is rank-deficient, and a weak damping then amplifies the directions the sample
never saw by up to δ^-1/2 — sample noise. With δ at the mean eigenvalue,
R^{-1/2} only shrinks directions whose eigenvalue exceeds the mean: a soft
downweighting of the dominant, shared components, which is what R is for (the
paper's rule downweights the top ~1,000 of 65K components). Measured on one
trained model of the default world (d = 2,880, R_train from all 1,401 passages),
TrackStar's MRR (λ = 0.9) for δ = 1e-3, 1e-2, 0.1, 1.0: 0.19, 0.32, 0.44, 0.48.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from tda import methods as methods_lib

@jax.jit
def _gram(x_nd):
  x = x_nd.astype(jnp.float32)
  return x.T @ x


def autocorrelation(*, vectors_nd: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, int]:
  """(Σ φφᵀ [d, d] float64, n) over rows, accumulated chunk by chunk.

  Sums (not means) so processes and chunks reduce by addition.
  """
  d = vectors_nd.shape[1]
  acc = np.zeros((d, d), np.float64)
  for s in range(0, len(vectors_nd), chunk):
    acc += np.asarray(_gram(jnp.asarray(vectors_nd[s:s + chunk])), np.float64)
  return acc, len(vectors_nd)


def normalized(r_dd: np.ndarray) -> np.ndarray:
  """R scaled to unit mean eigenvalue."""
  tr = np.trace(r_dd) / r_dd.shape[0]
  if not np.isfinite(tr) or tr <= 0:
    raise ValueError("autocorrelation matrix has zero or non-finite trace")
  return r_dd / tr


def mix(*, r_train: np.ndarray, r_eval: np.ndarray, lam: float) -> np.ndarray:
  if not 0.0 <= lam <= 1.0:
    raise ValueError(f"hessian.lambda_ must be in [0, 1] or 'auto', got {lam}")
  return lam * normalized(r_eval) + (1.0 - lam) * normalized(r_train)


def _top_eigvecs(r_dd: np.ndarray, k: int) -> np.ndarray:
  d = r_dd.shape[0]
  _, u = scipy.linalg.eigh(r_dd.astype(np.float32), subset_by_index=[d - k, d - 1])
  return u


def auto_lambda(*, r_train: np.ndarray, r_eval: np.ndarray, top_k: int,
                overlap: float = 0.9,
                grid: Sequence[float] = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)) -> float:
  """Smallest λ on `grid` whose mixed R keeps R_eval's top-K subspace on top."""
  top_k = int(min(max(top_k, 1), r_eval.shape[0]))
  u_eval = _top_eigvecs(normalized(r_eval), top_k)
  for lam in grid:
    u_mix = _top_eigvecs(mix(r_train=r_train, r_eval=r_eval, lam=lam), top_k)
    if np.sum((u_eval.T @ u_mix) ** 2) / top_k >= overlap:
      return float(lam)
  return float(grid[-1])


def inv_sqrt(*, r_dd: np.ndarray, damping: float,
             block_sizes: Sequence[int] | None = None) -> np.ndarray:
  """(R + δI)^{-1/2}, δ = damping × mean eigenvalue; block-diagonal if block_sizes."""
  d = r_dd.shape[0]
  if block_sizes is None:
    block_sizes = [d]
  if sum(block_sizes) != d:
    raise ValueError(f"block sizes sum to {sum(block_sizes)}, not d={d}")
  out = np.zeros_like(r_dd, dtype=np.float64)
  s = 0
  for b in block_sizes:
    # float64 while cheap; float32 for large blocks, where the d^3 work dominates
    # (damping keeps the damped matrix well conditioned, so float32 suffices there).
    blk = r_dd[s:s + b, s:s + b].astype(np.float64 if b <= 2048 else np.float32)
    blk = 0.5 * (blk + blk.T)
    w, u = scipy.linalg.eigh(blk, driver="evd")
    w, u = w.astype(np.float64), u.astype(np.float64)
    w = np.maximum(w, 0.0) + damping * max(np.trace(blk) / b, 1e-30)
    out[s:s + b, s:s + b] = (u * w ** -0.5) @ u.T
    s += b
  return out


@dataclasses.dataclass
class Whiteners:
  """Per-method whitening matrices (None: no R) plus what chose them."""
  matrices: dict[str, np.ndarray | None]
  lam: float | None

  def transform(self, *, method: str, vectors_nd: np.ndarray) -> np.ndarray:
    return apply(vectors_nd=vectors_nd, whitener=self.matrices[method],
                 unit=methods_lib.switches(method).unit)


def build_whiteners(*, methods: Sequence[str], r_train: dict[str, np.ndarray],
                    r_eval: dict[str, np.ndarray], lam: float | str, damping: float,
                    top_k: int, overlap: float,
                    block_sizes: Sequence[int] | None) -> Whiteners:
  """Whitening matrix per method; shared R^{-1/2} computed once per (variant, R).

  Args:
    methods: gradient method names (`tda.methods`).
    r_train, r_eval: per variant ('raw'/'corrected'), mean autocorrelations.
    lam: λ or 'auto' (module docstring); auto is chosen on the corrected variant.
    damping, top_k, overlap, block_sizes: see `inv_sqrt`, `auto_lambda`.
  """
  cache: dict[tuple[str, str], np.ndarray] = {}
  chosen = None
  out = {}
  for name in methods:
    spec = methods_lib.switches(name)
    if spec.r == methods_lib.R_NONE:
      out[name] = None
      continue
    key = (spec.variant, spec.r)
    if key not in cache:
      if spec.r == methods_lib.R_TRAIN:
        r = normalized(r_train[spec.variant])
      else:
        if chosen is None:
          chosen = (auto_lambda(r_train=r_train[spec.variant], r_eval=r_eval[spec.variant],
                                top_k=top_k, overlap=overlap)
                    if lam == "auto" else float(lam))
        r = mix(r_train=r_train[spec.variant], r_eval=r_eval[spec.variant], lam=chosen)
      cache[key] = inv_sqrt(r_dd=r, damping=damping, block_sizes=block_sizes).astype(np.float32)
    out[name] = cache[key]
  return Whiteners(out, chosen)


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

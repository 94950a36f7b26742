"""The optimizer's second moment V estimated from per-example gradients, for
checkpoints that come without their optimizer state (`gradients.v_source='estimate'`).

Estimator. Over a seeded sample S of the training corpus, with g_z the gradient of
example z's mean token loss (sum of its token NLLs / its number of loss tokens):

  * a parameter Adafactor factors (2-D or more, second-largest axis
    >= `train.min_dim_size_to_factor`, the rule of optax's `scale_by_factored_rms`):
      v_row = mean_{z∈S} mean_{d0}(g_z² + 1e-30),  v_col = mean_{z∈S} mean_{d1}(g_z² + 1e-30),
    with (d1, d0) = `tda.correction.factored_axes(shape)` — exactly optax's v_row /
    v_col layout, so V ≈ v_row ⊗ v_col / mean(v_row) as Adafactor reconstructs it;
  * every other parameter (vectors, small matrices), and every parameter when the
    run trains with Adam: the full v = mean_{z∈S}(g_z² + 1e-30).

Relation to the optimizer's V: Adafactor keeps an exponential moving average of the
same statistics of the *mini-batch* gradient (clipped by global norm), with a decay
that approaches 1 (`decay_rate=0.8`: β_t = 1 - t^-0.8); for gradients of a fixed
distribution the EMA converges to E[mean_{d0}(g_B²)] etc. Replacing the mini-batch
gradient g_B by per-example gradients changes E[g²] from mean² + variance/B to
mean² + variance: a different balance of signal and noise per coordinate and an
overall scale (irrelevant to the unit-normalised TrackStar vectors), no clipping, and
the statistics of the final weights rather than an average over the last steps of
training. This is the estimator bergson's normalizers use (Adafactor-style factored
row/column means of per-example squared gradients for matrices, full for the rest),
computed here as the exact sample mean rather than an EMA. The estimate is stored as
the same optax state records (`optax.FactoredState` for Adafactor runs,
`optax.ScaleByAdamState.nu` for Adam runs), so `tda.correction.member_corrections`
turns it into the same `FactoredCorrection` / `FullCorrection` records as a
checkpoint's own state and the kernels are unchanged.
"""

from __future__ import annotations

import io
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tda import correction as corr_lib
from tda import fs
from tda import model as model_lib

ADAFACTOR_EPS = 1e-30  # optax.adafactor's decay epsilon1, added to g² before factoring.


def factored_dims(shape: Sequence[int], min_dim_size_to_factor: int) -> tuple[int, int] | None:
  """(d1, d0) when optax's Adafactor factors a parameter of `shape`, else None."""
  if len(shape) < 2:
    return None
  d1, d0 = corr_lib.factored_axes(shape)
  if shape[d1] < min_dim_size_to_factor:
    return None
  return d1, d0


def sample_rows(config, n: int) -> np.ndarray:
  """The sorted, seeded corpus rows V is estimated on (`gradients.v_estimate_samples`)."""
  rng = np.random.default_rng([config.seed, 0x5EC0])
  size = min(int(config.gradients.v_estimate_samples), n)
  return np.sort(rng.choice(n, size=size, replace=False))


def _flat(tree) -> dict[str, Any]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def estimate(*, model, params, tokens_nt: np.ndarray, batch_size: int,
             min_dim_size_to_factor: int, factored: bool = True,
             length_bucket: int = 32) -> dict[str, dict[str, np.ndarray]]:
  """Per-example squared-gradient statistics over `tokens_nt` (see module docstring).

  Args:
    model: the `tda.model.Transformer`.
    params: its parameters.
    tokens_nt: int [N, T] the sample's passages (0: padding); every non-pad token
      after the first carries loss, as in training.
    batch_size: examples per vmapped gradient batch.
    min_dim_size_to_factor: Adafactor's factoring threshold (`train.*`).
    factored: False: every parameter gets a full v (Adam runs).
    length_bucket: each batch runs at its longest passage rounded up to this.

  Returns:
    {'v_row': {name: ...}, 'v_col': {name: ...}, 'v': {name: ...}} over every
    parameter (name: '/'-joined path), in optax's layout: a factored parameter has
    v_row and v_col and a (1,) zero v; an unfactored one a full v and (1,) zero
    v_row, v_col.
  """
  tokens_nt = np.asarray(tokens_nt, np.int32)
  n, t_max = tokens_nt.shape
  if n == 0:
    raise ValueError("no examples to estimate V on")
  shapes = {k: tuple(v.shape) for k, v in _flat(params).items()}
  dims = {k: (factored_dims(s, min_dim_size_to_factor) if factored else None)
          for k, s in shapes.items()}

  def example_loss(p, tokens_t):
    tokens = tokens_t[None]
    nll = model_lib.example_losses(model, {"params": p}, tokens)[0]
    return nll / jnp.maximum(jnp.sum(tokens[:, 1:] != 0), 1)

  @jax.jit
  def batch_stats(p, tokens_bt, weight_b):
    grads = jax.vmap(jax.grad(example_loss), in_axes=(None, 0))(p, tokens_bt)
    out = {}
    for k, g in _flat(grads).items():
      sq = jnp.square(g.astype(jnp.float32)) + ADAFACTOR_EPS
      w = weight_b.reshape((-1,) + (1,) * (sq.ndim - 1))
      if dims[k] is None:
        out[k] = (jnp.sum(sq * w, axis=0),)
      else:
        d1, d0 = dims[k]  # Axes of the parameter; +1 for the batch axis.
        out[k] = (jnp.sum(jnp.mean(sq, axis=d0 + 1) * w[..., 0], axis=0),
                  jnp.sum(jnp.mean(sq, axis=d1 + 1) * w[..., 0], axis=0))
    return out

  lengths = np.where((tokens_nt != 0).any(1),
                     t_max - np.argmax((tokens_nt != 0)[:, ::-1], axis=1), 2)
  padded = model_lib.bucket_lengths(lengths, multiple=length_bucket, max_len=t_max)
  order = np.lexsort((np.arange(n), padded))
  acc: dict[str, list[np.ndarray]] = {}
  for t in np.unique(padded):
    rows = order[padded[order] == t]
    for s in range(0, len(rows), batch_size):
      idx = rows[s:s + batch_size]
      tok = np.zeros((batch_size, t), np.int32)
      tok[:len(idx)] = tokens_nt[idx, :t]
      weight = (np.arange(batch_size) < len(idx)).astype(np.float32)
      for k, stats in batch_stats(params, tok, weight).items():
        stats = [np.asarray(x, np.float64) for x in stats]
        acc[k] = stats if k not in acc else [a + x for a, x in zip(acc[k], stats)]
  out = {"v_row": {}, "v_col": {}, "v": {}}
  zero = np.zeros((1,), np.float32)
  for k, stats in acc.items():
    if dims[k] is None:
      out["v"][k] = (stats[0] / n).astype(np.float32)
      out["v_row"][k] = out["v_col"][k] = zero
    else:
      out["v_row"][k] = (stats[0] / n).astype(np.float32)
      out["v_col"][k] = (stats[1] / n).astype(np.float32)
      out["v"][k] = zero
  return out


def save(path: str, stats: dict[str, dict[str, np.ndarray]], *, factored: bool) -> None:
  """Writes `estimate`'s statistics to one .npz (keys '<stat>:<param name>')."""
  arrays = {f"{s}:{k}": v for s, d in stats.items() for k, v in d.items()}
  arrays["__factored__"] = np.asarray(factored)
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  fs.write_bytes(path, buf.getvalue())


def load(path: str):
  """The statistics saved at `path` as an optax state (see `load_stats`)."""
  with np.load(io.BytesIO(fs.read_bytes(path))) as z:
    factored = bool(z["__factored__"])
    stats: dict[str, dict[str, Any]] = {"v_row": {}, "v_col": {}, "v": {}}
    for key in z.files:
      if key != "__factored__":
        s, name = key.split(":", 1)
        stats[s][name] = z[key]
  return load_stats(stats, factored=factored)


def load_stats(stats: dict[str, dict[str, np.ndarray]], *, factored: bool):
  """`estimate`'s statistics as an optax state `tda.correction` reads V from:
  `optax.FactoredState` (Adafactor runs) or `optax.ScaleByAdamState` (Adam runs)."""
  tree = {s: flax.traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in d.items()},
                                               sep="/")
          for s, d in stats.items()}
  count = jnp.zeros([], jnp.int32)
  if factored:
    return optax.FactoredState(count=count, v_row=tree["v_row"], v_col=tree["v_col"],
                               v=tree["v"])
  return optax.ScaleByAdamState(count=count, mu=None, nu=tree["v"])


def compare(opt_a, opt_b, params) -> dict[str, dict[str, float]]:
  """Per parameter: the cosine between the two states' V and between their
  1/sqrt(V), and the ratio of their mean V."""
  out = {}
  for name, leaf in _flat(params).items():
    path = tuple(name.split("/"))
    va, vb = (_full_v(o, path, tuple(leaf.shape)) for o in (opt_a, opt_b))
    out[name] = {"cos_v": _cos(va, vb), "cos_inv_sqrt_v": _cos(va ** -0.5, vb ** -0.5),
                 "mean_v_ratio": float(va.mean() / vb.mean())}
  return out


def _cos(a: np.ndarray, b: np.ndarray) -> float:
  a, b = a.ravel(), b.ravel()
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _full_v(opt_state, path: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray:
  """The full V (the parameter's shape) an optimizer state implies for one parameter:
  Adafactor's v_row ⊗ v_col / mean(v_row) where factored, else its v (Adam's nu)."""
  kind, state = corr_lib.second_moments(opt_state)
  if kind == "adam":
    return np.asarray(model_lib.param_at(state, path), np.float64)
  v = np.asarray(model_lib.param_at(state.v, path), np.float64)
  if v.shape == shape:
    return v
  v_row = np.asarray(model_lib.param_at(state.v_row, path), np.float64)
  v_col = np.asarray(model_lib.param_at(state.v_col, path), np.float64)
  d1, _ = corr_lib.factored_axes(shape)
  full = np.outer(v_row, v_col) / v_row.mean()  # Indexed [d1, d0].
  return full if d1 == 0 else full.T

"""Optimizer second-moment correction ∇L / sqrt(V) (DESIGN.md §2).

V is read from the restored optimizer state. Per projection member this module
returns a typed correction record (a JAX pytree: it passes through `jax.jit`,
`jax.device_put` and `jax.eval_shape` as it is, and its class is the static kind):
  * `FactoredCorrection(s_in [n_in], s_out [n_out])` with
    1/sqrt(V_ij) = s_in[i] · s_out[j]: Adafactor's factored V is rank-1,
    V_ij = r_a / mean(r) · c_b, so the factored kernel rescales the layer inputs and
    output gradients instead of ever forming a per-example m × n gradient; or
  * `FullCorrection(inv_sqrt_v)`, 1/sqrt(V) element-wise (Adam's V, and Adafactor's
    unfactored parameters: vectors and matrices below `min_dim_size_to_factor`),
    applied by the materialise-per-layer path.

Epsilon: the factored form adds `eps` to each factor statistic,
V = (r+eps)/mean(r+eps) · (c+eps), so V stays exactly rank-1; full V uses
1/sqrt(V + eps). (Adafactor itself already adds 1e-30 to g² before factoring.)

Adam option `adam_v='rank1'`: fit V ≈ r cᵀ / mean(r) with r, c the row and column
means of V (Adafactor's estimator applied to V itself; exact iff V is rank-1), so
Adam checkpoints can use the factored kernel too. It is an approximation: the
materialising path is the exact one.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tda import model as model_lib
from tda import projection as proj


@flax.struct.dataclass
class FactoredCorrection:
  """A rank-1 correction: 1/sqrt(V_ij) = s_in[i] · s_out[j].

  Axis i is the parameter's input axis (axis 0: a Dense kernel's input features,
  the embedding's vocabulary), axis j its output axis (axis 1).

  Factored kernel: a matrix's per-example gradient is Σ_t x_t δ_tᵀ (x the layer
  input, δ the output gradient), so the corrected gradient is
  Σ_t (s_in ⊙ x_t)(s_out ⊙ δ_t)ᵀ: x is rescaled by s_in and δ by s_out before
  projecting (for the embedding: the logits gradient by s_in, the final hidden
  state and the lookup gradient by s_out, and the one-hot lookup input through
  the columns of P_in scaled by s_in). Reference kernel: the materialised
  gradient is multiplied by `full_inv_sqrt`, the outer product s_in s_outᵀ.

  Attributes:
    s_in: float32 [n_in].
    s_out: float32 [n_out].
  """
  kind: ClassVar[str] = "factored"
  s_in: jax.Array
  s_out: jax.Array


@flax.struct.dataclass
class FullCorrection:
  """An element-wise correction: 1/sqrt(V_ij) = inv_sqrt_v[i, j] (or [i] for a vector).

  Both kernels materialise the member's per-example gradient (the factored
  kernel for this layer only: Σ_t x_t δ_tᵀ), multiply it by `inv_sqrt_v`, then
  project it; a vector parameter's gradient Σ_t x_t ⊙ δ_t is multiplied before
  its projection.

  Attributes:
    inv_sqrt_v: float32, the parameter's shape.
  """
  kind: ClassVar[str] = "full"
  inv_sqrt_v: jax.Array


Correction = FactoredCorrection | FullCorrection


def _find(state, cls):
  if isinstance(state, cls):
    return state
  if isinstance(state, (tuple, list)):
    for s in state:
      found = _find(s, cls)
      if found is not None:
        return found
  return None


def second_moments(opt_state) -> tuple[str, Any]:
  """('adafactor', FactoredState) or ('adam', nu tree) from an optax state."""
  fs = _find(opt_state, optax.FactoredState)
  if fs is not None:
    return "adafactor", fs
  adam = _find(opt_state, optax.ScaleByAdamState)
  if adam is not None:
    return "adam", adam.nu
  raise ValueError(
      "the checkpoint's optimizer state holds no second moment (neither Adafactor's "
      "factored state nor Adam's nu); turn gradients.correction off or restore a "
      "checkpoint with its optimizer state")


def factored_axes(shape: Sequence[int]) -> tuple[int, int]:
  """The axes (d1, d0) optax's Adafactor factors a parameter of `shape` along.

  d0 is the largest axis and d1 the second largest, in the order `np.argsort`
  puts the sizes (as optax's `scale_by_factored_rms` does; a square matrix gives
  (0, 1)). optax's `v_row` is the mean of g² over d0, so it is indexed by d1;
  `v_col` is the mean over d1, indexed by d0. Whether a parameter is factored
  at all (`min_dim_size_to_factor`) is a separate question.

  Args:
    shape: the parameter's shape, at least 2-D.

  Returns:
    (d1, d0).
  """
  if len(shape) < 2:
    raise ValueError(f"only parameters of 2 or more dimensions are factored, got {shape}")
  order = np.argsort(shape)
  return int(order[-2]), int(order[-1])


def _factored_scales(shape, v_row, v_col, eps) -> FactoredCorrection:
  """Maps optax's (v_row, v_col) onto the (in, out) axes of a 2-D parameter."""
  d1, _ = factored_axes(shape)
  r = v_row.astype(jnp.float32) + eps
  c = v_col.astype(jnp.float32) + eps
  r_scale = (r / jnp.mean(r)) ** -0.5   # Indexed by axis d1.
  c_scale = c ** -0.5                   # Indexed by the other axis.
  if d1 == 0:
    return FactoredCorrection(s_in=r_scale, s_out=c_scale)
  return FactoredCorrection(s_in=c_scale, s_out=r_scale)


def member_corrections(*, opt_state, plan: proj.Plan, eps: float,
                       adam_v: str = "materialise") -> dict[str, Correction]:
  """Per member name, its `FactoredCorrection` or `FullCorrection`.

  Args:
    opt_state: restored optax state of the training optimizer.
    plan: the projection plan (which parameters are members).
    eps: epsilon (see module docstring).
    adam_v: 'materialise' (exact) or 'rank1' (fit) for Adam's full V.

  Returns:
    Vectors always get a `FullCorrection`; matrices get a `FactoredCorrection`
    where Adafactor factored them (or Adam's V is fitted, `adam_v='rank1'`).
  """
  if adam_v not in ("materialise", "rank1"):
    raise ValueError(f"gradients.adam_v must be 'materialise' or 'rank1', got {adam_v!r}")
  kind, state = second_moments(opt_state)
  out = {}
  for m in plan.members:
    if kind == "adafactor":
      v_row, v_col, v = (model_lib.param_at(state.v_row, m.path),
                         model_lib.param_at(state.v_col, m.path),
                         model_lib.param_at(state.v, m.path))
      if m.kind != proj.VECTOR and v.shape != tuple(m.shape):
        out[m.name] = _factored_scales(m.shape, v_row, v_col, eps)
      else:
        out[m.name] = FullCorrection(inv_sqrt_v=(v.astype(jnp.float32) + eps) ** -0.5)
    else:
      v = model_lib.param_at(state, m.path).astype(jnp.float32)
      if adam_v == "rank1" and m.kind != proj.VECTOR:
        r, c = jnp.mean(v, axis=1), jnp.mean(v, axis=0)
        out[m.name] = FactoredCorrection(s_in=(r / jnp.mean(r) + eps) ** -0.5,
                                         s_out=(c + eps) ** -0.5)
      else:
        out[m.name] = FullCorrection(inv_sqrt_v=(v + eps) ** -0.5)
  return out


def full_inv_sqrt(corr: Correction) -> jax.Array:
  """The element-wise 1/sqrt(V) of a member's correction, in the parameter's shape.

  For a `FactoredCorrection` the outer product s_in[:, None] · s_out[None, :]; for
  a `FullCorrection` its `inv_sqrt_v`.
  """
  if isinstance(corr, FactoredCorrection):
    return corr.s_in[:, None] * corr.s_out[None, :]
  return corr.inv_sqrt_v


def describe(corrs: dict[str, Correction]) -> dict[str, int]:
  """How many members have each kind of correction: {'factored': n, 'full': n}."""
  return {cls.kind: sum(isinstance(c, cls) for c in corrs.values())
          for cls in (FactoredCorrection, FullCorrection)}

"""Optimizer second-moment correction ∇L / sqrt(V) (DESIGN.md §2).

V is read from the restored optimizer state. Per projection member this module
returns either
  * a factored correction `(s_in [n_in], s_out [n_out])` with
    1/sqrt(V_ij) = s_in[i] · s_out[j]: Adafactor's factored V is rank-1,
    V_ij = r_a / mean(r) · c_b, so the factored kernel rescales the layer inputs and
    output gradients instead of ever forming a per-example m × n gradient; or
  * a full `inv_sqrt_v` array (Adam's V, and Adafactor's unfactored parameters:
    vectors and matrices below `min_dim_size_to_factor`), applied by the
    materialise-per-layer path.

Epsilon: the factored form adds `eps` to each factor statistic,
V = (r+eps)/mean(r+eps) · (c+eps), so V stays exactly rank-1; full V uses
1/sqrt(V + eps). (Adafactor itself already adds 1e-30 to g² before factoring.)

Adam option `adam_v='rank1'`: fit V ≈ r cᵀ / mean(r) with r, c the row and column
means of V (Adafactor's estimator applied to V itself; exact iff V is rank-1), so
Adam checkpoints can use the factored kernel too. It is an approximation: the
materialising path is the exact one.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from optax._src import factorized
from optax._src import transform

from tda import projection as proj

FACTORED, FULL, NONE = "factored", "full", "none"


def _find(state, cls):
  if isinstance(state, cls):
    return state
  if isinstance(state, (tuple, list)):
    for s in state:
      found = _find(s, cls)
      if found is not None:
        return found
  return None


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def second_moments(opt_state) -> tuple[str, Any]:
  """('adafactor', FactoredState) or ('adam', nu tree) from an optax state."""
  fs = _find(opt_state, factorized.FactoredState)
  if fs is not None:
    return "adafactor", fs
  adam = _find(opt_state, transform.ScaleByAdamState)
  if adam is not None:
    return "adam", adam.nu
  raise ValueError(
      "the checkpoint's optimizer state holds no second moment (neither Adafactor's "
      "factored state nor Adam's nu); turn gradients.correction off or restore a "
      "checkpoint with its optimizer state")


def _factored_scales(shape, v_row, v_col, eps):
  """Maps optax's (v_row, v_col) onto the (in, out) axes of a 2-D parameter."""
  d1, _ = factorized._factored_dims(shape, True, 0)  # Same axis choice as optax.
  r = v_row.astype(jnp.float32) + eps
  c = v_col.astype(jnp.float32) + eps
  r_scale = (r / jnp.mean(r)) ** -0.5   # Indexed by axis d1.
  c_scale = c ** -0.5                   # Indexed by the other axis.
  return (r_scale, c_scale) if d1 == 0 else (c_scale, r_scale)


def member_corrections(*, opt_state, plan: proj.Plan, eps: float,
                       adam_v: str = "materialise") -> dict[str, tuple[str, tuple]]:
  """Per member name: (FACTORED, (s_in, s_out)) or (FULL, (inv_sqrt_v,)).

  Args:
    opt_state: restored optax state of the training optimizer.
    plan: the projection plan (which parameters are members).
    eps: epsilon (see module docstring).
    adam_v: 'materialise' (exact) or 'rank1' (fit) for Adam's full V.
  """
  if adam_v not in ("materialise", "rank1"):
    raise ValueError(f"gradients.adam_v must be 'materialise' or 'rank1', got {adam_v!r}")
  kind, state = second_moments(opt_state)
  out = {}
  for m in plan.members:
    if kind == "adafactor":
      v_row, v_col, v = (_get(state.v_row, m.path), _get(state.v_col, m.path),
                         _get(state.v, m.path))
      if m.kind != proj.VECTOR and v.shape != tuple(m.shape):
        out[m.name] = (FACTORED, _factored_scales(m.shape, v_row, v_col, eps))
      else:
        out[m.name] = (FULL, ((v.astype(jnp.float32) + eps) ** -0.5,))
    else:
      v = _get(state, m.path).astype(jnp.float32)
      if adam_v == "rank1" and m.kind != proj.VECTOR:
        r, c = jnp.mean(v, axis=1), jnp.mean(v, axis=0)
        out[m.name] = (FACTORED, ((r / jnp.mean(r) + eps) ** -0.5, (c + eps) ** -0.5))
      else:
        out[m.name] = (FULL, ((v + eps) ** -0.5,))
  return out


def full_inv_sqrt(corr: tuple[str, tuple]) -> jax.Array:
  """The element-wise 1/sqrt(V) array of a member's correction (reference path)."""
  kind, arrays = corr
  if kind == FACTORED:
    s_in, s_out = arrays
    return s_in[:, None] * s_out[None, :]
  return arrays[0]


def describe(corrs: dict[str, tuple[str, tuple]]) -> dict[str, int]:
  kinds = [k for k, _ in corrs.values()]
  return {k: int(np.sum([x == k for x in kinds])) for k in (FACTORED, FULL)}

"""Per-example projected (and optimizer-corrected) loss gradients (DESIGN.md §2).

Two kernels, same output `[B, d]` (d = plan.dim), both built by factories that
close over static structure (model, plan, correction kinds) and return pure
functions of arrays:

* `make_reference_kernel`: `jax.vmap(jax.grad)` over the batch materialises every
  per-example gradient, divides it element-wise by sqrt(V) and projects it.
* `make_factored_kernel`: one batched forward and one backward *to the layer
  outputs only* (the gradient w.r.t. zero perturbations added to every layer
  output; parameters are never differentiated, so XLA prunes all weight-gradient
  matmuls). With the captured layer inputs x and output gradients δ, a matrix's
  projected per-example gradient is `Σ_t (P_in x_t)(P_out δ_t)ᵀ`; a rank-1
  (Adafactor) 1/sqrt(V) = s_in s_outᵀ is applied by rescaling x and δ first, so no
  m × n per-example gradient is ever formed. Members whose V is full (Adam,
  unfactored Adafactor parameters) go through the materialise-per-layer path:
  `Σ_t x_t δ_tᵀ` for that layer only, ⊘ sqrt(V), then projected.

Both return the uncorrected ('raw') and corrected vectors from the same pass, so
every ablation (correction on/off) shares one forward/backward.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from tda import correction as corr_lib
from tda import model as model_lib
from tda import projection as proj

Array = jax.Array


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def correction_kinds(corrs: dict[str, tuple[str, tuple]] | None) -> tuple[tuple[str, str], ...] | None:
  """Static half of `member_corrections` (kinds), hashable for jit closures."""
  return None if corrs is None else tuple(sorted((n, k) for n, (k, _) in corrs.items()))


def correction_arrays(corrs: dict[str, tuple[str, tuple]] | None):
  """Array half of `member_corrections`."""
  return None if corrs is None else {n: a for n, (_, a) in corrs.items()}


def _perturbation_shapes(model, batch: int, length: int):
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((batch, length), jnp.int32)))
  return shapes["perturbations"]


def _member_contrib(m: proj.Member, *, inter, deltas, inputs_bt, p_in, p_out,
                    kind: str | None, arrays) -> Array:
  """One member's projected per-example gradient [B, k_in, k_out].

  kind None: uncorrected; FACTORED: rescale the factors; FULL: materialise.
  """
  f32 = jnp.float32
  if m.kind == proj.EMBED:
    mod = _get(deltas, m.path[:-1])
    d_logits = mod["logits_out"].astype(f32)          # [B, T, V]: vocab side.
    h = _get(inter, m.path[:-1])["logits_in"][0].astype(f32)  # [B, T, D].
    g_lookup = mod["lookup_out"].astype(f32)          # [B, T, D].
    if kind == corr_lib.FULL:
      grad = jnp.einsum("btv,btd->bvd", d_logits, h)
      onehot = jax.nn.one_hot(inputs_bt, m.shape[0], dtype=f32)
      grad = grad + jnp.einsum("btv,btd->bvd", onehot, g_lookup)
      return proj.project_full(grads_bmn=grad * arrays[0], member=m, p_in=p_in, p_out=p_out)
    s_in = arrays[0] if kind == corr_lib.FACTORED else None
    s_out = arrays[1] if kind == corr_lib.FACTORED else None
    if s_in is not None:
      d_logits, h, g_lookup = d_logits * s_in, h * s_out, g_lookup * s_out
    left = d_logits @ p_in.T                            # [B, T, k_in]
    p_cols = p_in.T if s_in is None else (p_in * s_in[None, :]).T
    left_lookup = jnp.take(p_cols, inputs_bt, axis=0)  # [B, T, k_in]
    return (jnp.einsum("btk,btl->bkl", left, h @ p_out.T)
            + jnp.einsum("btk,btl->bkl", left_lookup, g_lookup @ p_out.T))
  mod_path = m.path[:-1]
  x = _get(inter, mod_path)["in"][0].astype(f32)
  d = _get(deltas, mod_path)["out"].astype(f32)
  if m.kind == proj.VECTOR:
    g = jnp.sum(x * d, axis=1)                          # [B, n]
    if kind is not None:
      g = g * arrays[0]
    return p_in[:, 0][None, :, None] * (g @ p_out.T)[:, None, :]
  if kind == corr_lib.FULL:
    grad = jnp.einsum("btn,btm->bnm", x, d) * arrays[0]
    return proj.project_full(grads_bmn=grad, member=m, p_in=p_in, p_out=p_out)
  if kind == corr_lib.FACTORED:
    x, d = x * arrays[0], d * arrays[1]
  return jnp.einsum("btk,btl->bkl", x @ p_in.T, d @ p_out.T)


def _check_variants(variants, has_corr: bool) -> tuple[str, ...]:
  if variants is None:
    return ("raw", "corrected") if has_corr else ("raw",)
  bad = [v for v in variants if v not in ("raw", "corrected")]
  if bad or not variants:
    raise ValueError(f"variants must be a non-empty subset of ('raw', 'corrected'), got {variants}")
  if "corrected" in variants and not has_corr:
    raise ValueError("the 'corrected' variant needs the optimizer corrections")
  return tuple(variants)


def make_factored_kernel(*, model: model_lib.Transformer, plan: proj.Plan,
                         corr_kinds: tuple[tuple[str, str], ...] | None,
                         variants: tuple[str, ...] | None = None) -> Callable:
  """Returns `kernel(params, mats, corr_arrays, tokens_bt, mask_bt) -> dict`.

  Output dict: 'raw' [B, d], 'corrected' [B, d] (absent without corrections),
  'loss' [B] (summed NLL of each example). `variants` restricts the outputs
  (default: 'raw', plus 'corrected' when there are corrections).
  """
  kinds = dict(corr_kinds) if corr_kinds is not None else None
  variants = _check_variants(variants, kinds is not None)

  def kernel(params, mats, corr_arrays, tokens_bt, mask_bt):
    inputs_bt = tokens_bt[:, :-1]
    pert_shapes = _perturbation_shapes(model, tokens_bt.shape[0], tokens_bt.shape[1] - 1)
    perts = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), pert_shapes)

    def total_loss(perts):
      nll_b, state = model_lib.example_losses(
          model, {"params": params, "perturbations": perts}, tokens_bt, mask_bt,
          mutable=["intermediates"])
      return jnp.sum(nll_b), (nll_b, state["intermediates"])

    deltas, (nll_b, inter) = jax.grad(total_loss, has_aux=True)(perts)
    deltas, inter = flax.core.unfreeze(deltas), flax.core.unfreeze(inter)
    out = {"loss": nll_b}
    for name in variants:
      ks = kinds if name == "corrected" else None
      parts = []
      for block in plan.blocks:
        acc = 0.0
        for m in block.members:
          p_in, p_out = mats[m.name]
          acc = acc + _member_contrib(
              m, inter=inter, deltas=deltas, inputs_bt=inputs_bt, p_in=p_in, p_out=p_out,
              kind=None if ks is None else ks[m.name],
              arrays=None if ks is None else corr_arrays[m.name])
        parts.append(acc.reshape(acc.shape[0], -1))
      out[name] = jnp.concatenate(parts, axis=-1)
    return out

  return kernel


def make_reference_kernel(*, model: model_lib.Transformer, plan: proj.Plan,
                          corr_kinds: tuple[tuple[str, str], ...] | None,
                          variants: tuple[str, ...] | None = None) -> Callable:
  """Same signature and output as the factored kernel, by vmap(grad) + materialisation."""
  variants = _check_variants(variants, corr_kinds is not None)

  def kernel(params, mats, corr_arrays, tokens_bt, mask_bt):
    def loss_one(p, tokens_t, mask_t):
      return model_lib.example_losses(model, {"params": p}, tokens_t[None], mask_t[None])[0]

    nll_b = jax.vmap(loss_one, in_axes=(None, 0, 0))(params, tokens_bt, mask_bt)
    grads = jax.vmap(jax.grad(loss_one), in_axes=(None, 0, 0))(params, tokens_bt, mask_bt)
    out = {"loss": nll_b}
    for name in variants:
      parts = []
      for block in plan.blocks:
        acc = 0.0
        for m in block.members:
          g = _get(grads, m.path).astype(jnp.float32)
          if name == "corrected":
            ks = dict(corr_kinds)[m.name]
            g = g * corr_lib.full_inv_sqrt((ks, corr_arrays[m.name]))
          p_in, p_out = mats[m.name]
          acc = acc + proj.project_full(grads_bmn=g, member=m, p_in=p_in, p_out=p_out)
        parts.append(acc.reshape(acc.shape[0], -1))
      out[name] = jnp.concatenate(parts, axis=-1)
    return out

  return kernel


class Featurizer:
  """Runs a gradient kernel over many examples: length buckets, fixed batch shapes
  (a padded last batch, so nothing recompiles), sharding over the data axis, and
  NaN/Inf rows flagged by example id instead of returned."""

  def __init__(self, *, model, params, plan: proj.Plan, mats, corrs, mesh,
               batch_size: int, kernel: str = "factored", bucket: int = 32,
               variants: tuple[str, ...] | None = None):
    from tda import sharding
    if kernel not in ("factored", "reference"):
      raise ValueError(f"gradients.kernel must be 'factored' or 'reference', got {kernel!r}")
    self.plan, self.mesh, self.bucket = plan, mesh, bucket
    self.batch_size = sharding.pad_to_multiple(batch_size, mesh)
    make = make_factored_kernel if kernel == "factored" else make_reference_kernel
    fn = make(model=model, plan=plan, corr_kinds=correction_kinds(corrs), variants=variants)
    self._batch_sharding = sharding.batch_sharding(mesh, 2)
    rep = sharding.replicated(mesh)
    self._params = jax.device_put(params, sharding.param_shardings(params, mesh))
    self._mats = jax.device_put(mats, rep)
    self._corr = jax.device_put(correction_arrays(corrs), rep)
    self._fn = jax.jit(fn)

  @property
  def compiled_shapes(self) -> int:
    return self._fn._cache_size()

  def run_batch(self, tokens_bt, mask_bt) -> dict[str, Any]:
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

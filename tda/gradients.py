"""Per-example projected (and optimizer-corrected) loss gradients (DESIGN.md §2).

Two kernels, same output `[B, d]` (d = plan.dim), both built by factories that
close over static structure (model, plan, variants) and return pure functions of
arrays and correction records (`tda.correction.FactoredCorrection` /
`FullCorrection`, pytrees whose class is the static kind):

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
  The LM head is fused (`fused_head`): the forward stops at the final hidden
  states h, and the head's logits, loss and logit gradient are formed a chunk of
  rows at a time, so the [B, T, V] logits and their gradient never reach memory;
  the body's backward starts from the returned dh, and a head member (the tied
  embedding's logit term, `lm_head`) takes its vocab-side projection from the same
  chunks. (A head member with a full V needs the whole logit gradient: then the
  kernel runs the model with its logit taps instead.)

Both assemble the output the same way: per block, the members' [B, k_in, k_out]
projections summed in member order and flattened; blocks concatenated in plan
order.

Both return the uncorrected ('raw') and corrected vectors from the same pass, so
every ablation (correction on/off) shares one forward/backward.
"""

from __future__ import annotations

import functools
import itertools
from typing import Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from tda import correction as corr_lib
from tda import model as model_lib
from tda import projection as proj

Array = jax.Array


def _perturbation_shapes(model, batch: int, length: int, hidden_only: bool = False):
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((batch, length), jnp.int32),
                         hidden_only=hidden_only))
  return shapes["perturbations"]


# Logits a fused-head step holds at once (`fused_head`): 2^20 float32 values, 4 MiB
# (128 rows of an 8,192 vocabulary, 512 of 2,048), which stay in cache between the
# forward matmul, the softmax and the two backward matmuls. Fewer, larger steps
# lose the cache; smaller ones pay the loop's per-step cost (measured on CPU with
# scripts/bench_gradients.py: 128 rows of 2,048 were 6% slower than not fusing).
HEAD_CHUNK_LOGITS = 1 << 20


def _is_head(m: proj.Member, tied: bool) -> bool:
  """Whether the member's gradient has a term through the LM head's logits: the
  tied embedding (its logit term) or an untied output head `lm_head`."""
  return (m.kind == proj.EMBED and tied) or m.path[0] == "lm_head"


def fused_head(h_btd: Array, w_vd: Array, targets_bt: Array, mask_bt: Array,
               p_kv: Array | None, *, dtype, chunk_logits: int = HEAD_CHUNK_LOGITS):
  """The LM head, its loss and the loss's gradient, a chunk of rows at a time.

  For each row t: logits z = h_t Wᵀ (in the model's compute dtype, read as
  float32, as `tda.model.Transformer` computes them), the NLL
  logsumexp(z) − z[target], and its gradient g = mask_t · (softmax(z) − onehot):
  the cotangent of the summed masked NLL, so this is the head's forward *and*
  backward. The [B, T, V] logits and their gradient are never materialised: each
  chunk's are formed, used and dropped (`jax.lax.map`).

  Args:
    h_btd: the final hidden states [B, T, D] (after the final norm).
    w_vd: the head matrix [V, D] (the tied embedding, or `lm_head`'s kernel
      transposed).
    targets_bt, mask_bt: next-token targets and loss mask [B, T].
    p_kv: vocab-side projection matrices stacked [K, V], or None.
    dtype: the model's compute dtype.
    chunk_logits: at most this many logits (rows × vocabulary) per step.

  Returns:
    (nll_b [B] summed masked NLL, dh [B, T, D] in `dtype`, the gradient w.r.t. h;
     g P_kvᵀ [B, T, K] float32 or None).
  """
  f32 = jnp.float32
  b, t, d = h_btd.shape
  n = b * t
  chunk = max(1, chunk_logits // w_vd.shape[0])
  steps = -(-n // chunk)
  chunk = -(-n // steps)        # Equal steps of at most `chunk` rows: < `steps` padded rows.
  pad = steps * chunk - n
  rows = lambda x: jnp.pad(x.reshape((n,) + x.shape[2:]),
                           ((0, pad),) + ((0, 0),) * (x.ndim - 2))
  w = w_vd.astype(dtype)
  vocab = w.shape[0]

  def step(args):
    hc, tc, mc = args
    z = jnp.dot(hc.astype(dtype), w.T).astype(f32)            # [c, V]
    zmax = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
    e = jnp.exp(z - zmax)
    s = jnp.sum(e, axis=-1, keepdims=True)
    hit = jnp.arange(vocab, dtype=tc.dtype)[None, :] == tc[:, None]
    nll = (jnp.log(s) + zmax)[:, 0] - jnp.sum(jnp.where(hit, z, 0.0), axis=-1)
    g = ((e / s - hit.astype(f32)) * mc[:, None]).astype(dtype)  # As the dtype logits see it.
    dh = jnp.dot(g, w)                                         # [c, D]
    pg = None if p_kv is None else g.astype(f32) @ p_kv.T      # [c, K]
    return nll, dh, pg

  shape = lambda x: x.reshape((-1, chunk) + x.shape[1:])
  nll, dh, pg = jax.lax.map(step, (shape(rows(h_btd)), shape(rows(targets_bt)),
                                   shape(rows(mask_bt.astype(f32)))))
  unrows = lambda x: x.reshape((-1,) + x.shape[2:])[:n].reshape((b, t) + x.shape[2:])
  nll_b = jnp.sum(unrows(nll) * mask_bt, axis=-1)
  return nll_b, unrows(dh), None if pg is None else unrows(pg)


class _Projections:
  """Deferred right-multiplications `x @ Pᵀ`, run grouped by the tensor x.

  Members that read the same layer input (q, k, v; gate, up) and both variants
  of one member (raw P, corrected P ⊙ s) project the same tensor: their matrices
  are stacked and x is read once, by one wider matmul (a [B, T, n] × [n, Σk]
  product instead of several thin ones, each a full pass over x).
  """

  def __init__(self):
    self._groups: dict[int, tuple[Array, list[Array]]] = {}

  def add(self, x: Array, p: Array) -> tuple[int, int]:
    """Asks for `x @ p.T` (p [k, n]); returns a handle for `result`."""
    key = id(x)
    if key not in self._groups:
      self._groups[key] = (x, [])
    mats = self._groups[key][1]
    mats.append(p)
    return key, len(mats) - 1

  def run(self) -> None:
    self._out = {}
    for key, (x, mats) in self._groups.items():
      sizes = [p.shape[0] for p in mats]
      y = x.astype(jnp.float32) @ jnp.concatenate(mats, axis=0).T
      self._out[key] = jnp.split(y, list(itertools.accumulate(sizes))[:-1], axis=-1)

  def result(self, handle: tuple[int, int]) -> Array:
    key, i = handle
    return self._out[key][i]


def loss_rows_for(tokens_bt, mask_bt, *, minimum: int = 8) -> int | None:
  """The `loss_rows` a batch needs (`fused_activation_grads`), from its host-side
  tokens and loss mask [B, T] (the kernel's inputs, before the next-token shift).

  None (the full head) when every real target token carries loss, as in a
  passage, or when the rows would not be under half the positions; otherwise (a
  query: loss on its target tokens only) the most loss-carrying target positions
  of any row, rounded up to a power of two, at least `minimum`, so few shapes
  compile."""
  tmask = np.asarray(mask_bt)[:, 1:] != 0
  if np.array_equal(tmask, np.asarray(tokens_bt)[:, 1:] != 0):
    return None
  t = tmask.shape[1]
  most = int(tmask.sum(axis=1).max(initial=0))
  rows = max(minimum, 1 << max(most - 1, 0).bit_length())
  return rows if 2 * rows <= t else None


def fused_activation_grads(model: model_lib.Transformer, params, tokens_bt: Array,
                           mask_bt: Array, p_kv: Array | None = None, *,
                           chunk_logits: int = HEAD_CHUNK_LOGITS,
                           loss_rows: int | None = None):
  """The loss gradients w.r.t. every layer output, through the fused head: the body
  to the final hidden states h, `fused_head`, then the body's backward from its dh.

  With `loss_rows` = R, the head runs on R positions per example only: those
  whose target carries loss (a query's target tokens) first, then loss-free
  ones (zero gradient); every other position's dh is exactly the zero the full
  head would give it (mask 0 ⇒ g = 0 ⇒ dh = 0), so the outputs are those of the
  full head. An example with more than R loss positions gets a NaN loss, dh and
  head factors, and so non-finite vectors (the Featurizer flags its row), never a
  silently wrong one.

  Returns:
    (deltas: the perturbations' gradients, inter: the sown layer inputs, nll_b [B],
     h [B, T', D], g P_kvᵀ [B, T', K] or None), T' = T − 1, or R with `loss_rows`
     (h and g at the selected positions: all a head member's Σ_t needs).
  """
  cfg = model.cfg
  inputs_bt, targets_bt, tmask_bt = model_lib.shift(tokens_bt, mask_bt)
  pert_shapes = _perturbation_shapes(model, *inputs_bt.shape, hidden_only=True)
  perts = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), pert_shapes)

  def body(perts):
    h, state = model.apply({"params": params, "perturbations": perts}, inputs_bt,
                           hidden_only=True, mutable=["intermediates"])
    return h, state["intermediates"]

  h, body_vjp, inter = jax.vjp(body, perts, has_aux=True)
  w_vd = params["embed"]["embedding"] if cfg.tie_embeddings else params["lm_head"]["kernel"].T
  head = functools.partial(fused_head, w_vd=w_vd, p_kv=p_kv, dtype=jnp.dtype(cfg.dtype),
                           chunk_logits=chunk_logits)
  b, t = targets_bt.shape
  if loss_rows is None or loss_rows >= t:
    nll_b, dh, g_vocab = head(h, targets_bt=targets_bt, mask_bt=tmask_bt)
  else:
    carries = tmask_bt != 0
    # Loss positions first, in order, then the others: R distinct positions a row.
    idx_br = jnp.argsort(~carries, axis=1, stable=True)[:, :loss_rows]
    take = lambda x: jnp.take_along_axis(x, idx_br.reshape((b, -1) + (1,) * (x.ndim - 2)),
                                         axis=1)
    h = take(h)
    nll_b, dh_sel, g_vocab = head(h, targets_bt=take(targets_bt), mask_bt=take(tmask_bt))
    overflow = jnp.sum(carries, axis=1) > loss_rows
    nan_if_overflow = lambda x: None if x is None else jnp.where(
        overflow.reshape((b,) + (1,) * (x.ndim - 1)), jnp.nan, x)
    # A scatter per example (vmap: the batch is a scatter batch dimension, so it
    # stays split wherever the batch is).
    dh = jax.vmap(lambda i, v: jnp.zeros((t, v.shape[-1]), v.dtype).at[i].set(v))(
        idx_br, dh_sel)
    nll_b, dh, g_vocab = map(nan_if_overflow, (nll_b, dh, g_vocab))
  (deltas,) = body_vjp(dh)
  return deltas, inter, nll_b, h, g_vocab


def _folded(p_in: Array, p_out: Array, corr) -> tuple[Array, Array]:
  """(P_in, P_out) with a `FactoredCorrection`'s scales folded in:
  (s_in ⊙ x) P_inᵀ = x (P_in ⊙ s_in)ᵀ, so the [B, T, n] activations are never
  rescaled; unchanged for any other record."""
  if isinstance(corr, corr_lib.FactoredCorrection):
    return p_in * corr.s_in[None, :], p_out * corr.s_out[None, :]
  return p_in, p_out


def _vocab_matrix(m: proj.Member, *, p_in, p_out, corr) -> Array:
  """A head member's vocab-side projection matrix [k, V], the correction folded in:
  the tied embedding's P_in (its axis 0 is the vocabulary), `lm_head`'s P_out."""
  return _folded(p_in, p_out, corr)[0 if m.kind == proj.EMBED else 1]


def _member_terms(m: proj.Member, *, inter, deltas, inputs_bt, p_in, p_out,
                  corr: corr_lib.Correction | None, projections: _Projections,
                  head=None):
  """One member's projected per-example gradient, as a direct [B, k_in, k_out] term
  and/or factor pairs (left [B, T, k_in], right [B, T, k_out]) whose Σ_t L_t R_tᵀ
  it is (pairs are handles into `projections`, resolved once all are asked for).

  Args:
    m: the member.
    inter: the sown layer inputs x (`intermediates`).
    deltas: the loss gradients δ w.r.t. the layer-output perturbations.
    inputs_bt: the input token ids (the embedding lookup's one-hot input).
    p_in: the member's input-side projection [k_in, n_in].
    p_out: the member's output-side projection [k_out, n_out].
    corr: None (uncorrected); a `FactoredCorrection` (its scales folded into the
      [k, n] matrices, `_folded`); a `FullCorrection` (the layer's
      gradient materialised and multiplied by 1/sqrt(V); vectors: Σ_t x_t ⊙ δ_t
      multiplied).
    projections: where the factor projections are asked for.
    head: with the fused head, (h [B, T, D], this member's g P_vocabᵀ handle):
      the logit term's factors; None when the model's logit taps are there.

  Returns:
    (direct [B, k_in, k_out] or None, [(left, right), ...]); a left or right is a
    handle into `projections` or an array.
  """
  f32 = jnp.float32
  p_in, p_out = _folded(p_in, p_out, corr)
  if m.kind == proj.EMBED:
    mod = model_lib.param_at(deltas, m.path[:-1])
    g_lookup = mod["lookup_out"]                        # [B, T, D].
    tapped = "logits_out" in mod                        # Tied, logit taps (not fused).
    if tapped:
      d_logits = mod["logits_out"]                      # [B, T, V]: vocab side.
      h = model_lib.param_at(inter, m.path[:-1])["logits_in"][0]  # [B, T, D].
    if isinstance(corr, corr_lib.FullCorrection):       # Only ever with the taps.
      onehot = jax.nn.one_hot(inputs_bt, m.shape[0], dtype=f32)
      grad = jnp.einsum("btv,btd->bvd", onehot, g_lookup.astype(f32))
      if tapped:
        grad = grad + jnp.einsum("btv,btd->bvd", d_logits.astype(f32), h.astype(f32))
      return proj.project_full(grads_bmn=grad * corr.inv_sqrt_v, member=m, p_in=p_in,
                               p_out=p_out), []
    # The lookup's input is one-hot: its projection is a gather of P_in's columns.
    pairs = [(jnp.take(p_in.T, inputs_bt, axis=0), projections.add(g_lookup, p_out))]
    if head is not None:                                # Tied, fused head.
      h, g_vocab = head
      pairs.append((g_vocab, projections.add(h, p_out)))
    elif tapped:
      pairs.append((projections.add(d_logits, p_in), projections.add(h, p_out)))
    return None, pairs
  if head is not None:                                  # lm_head: x = h, δ = g.
    h, g_vocab = head
    return None, [(projections.add(h, p_in), g_vocab)]
  mod_path = m.path[:-1]
  x = model_lib.param_at(inter, mod_path)["in"][0]
  d = model_lib.param_at(deltas, mod_path)["out"]
  if m.kind == proj.VECTOR:
    g = jnp.sum(x.astype(f32) * d.astype(f32), axis=1)  # [B, n]
    if corr is not None:
      g = g * corr.inv_sqrt_v                           # Vectors: always full.
    return p_in[:, 0][None, :, None] * (g @ p_out.T)[:, None, :], []
  if isinstance(corr, corr_lib.FullCorrection):
    grad = jnp.einsum("btn,btm->bnm", x.astype(f32), d.astype(f32)) * corr.inv_sqrt_v
    return proj.project_full(grads_bmn=grad, member=m, p_in=p_in, p_out=p_out), []
  return None, [(projections.add(x, p_in), projections.add(d, p_out))]


def _assemble(plan: proj.Plan, member_fn: Callable[[proj.Member], Array]) -> Array:
  """[B, d]: per block, `member_fn`'s [B, k_in, k_out] summed over its members in
  order and flattened; the blocks concatenated in plan order."""
  parts = []
  for block in plan.blocks:
    acc = 0.0
    for m in block.members:
      acc = acc + member_fn(m)
    parts.append(acc.reshape(acc.shape[0], -1))
  return jnp.concatenate(parts, axis=-1)


def _check_variants(variants, has_corrections: bool) -> tuple[str, ...]:
  if variants is None:
    return ("raw", "corrected") if has_corrections else ("raw",)
  bad = [v for v in variants if v not in ("raw", "corrected")]
  if bad or not variants:
    raise ValueError(f"variants must be a non-empty subset of ('raw', 'corrected'), got {variants}")
  if "corrected" in variants and not has_corrections:
    raise ValueError("the 'corrected' variant needs the optimizer corrections")
  return tuple(variants)


def _check_corrections(corrs, variants: tuple[str, ...]) -> None:
  if "corrected" in variants and corrs is None:
    raise ValueError("the kernel computes the 'corrected' variant but was called "
                     "without correction records")


def make_factored_kernel(*, model: model_lib.Transformer, plan: proj.Plan,
                         has_corrections: bool,
                         variants: tuple[str, ...] | None = None,
                         head_chunk_logits: int = HEAD_CHUNK_LOGITS) -> Callable:
  """Returns `kernel(params, mats, corrs, tokens_bt, mask_bt) -> dict`.

  Args:
    model: the transformer.
    plan: the projection plan.
    has_corrections: whether the kernel is called with corrections: `corrs` is
      then `tda.correction.member_corrections`'s dict (member name -> record),
      otherwise None.
    variants: the outputs to compute, a subset of ('raw', 'corrected'); default
      'raw', plus 'corrected' when there are corrections.
    head_chunk_logits: logits per step of the fused LM head (`fused_head`).

  Returns:
    The kernel; its output dict: 'raw' [B, d], 'corrected' [B, d] (as asked),
    'loss' [B] (summed NLL of each example). Its static keyword `loss_rows`
    (None: every position) runs the fused head on that many positions per example
    (`fused_activation_grads`; `loss_rows_for` picks it from the mask): the same
    outputs for a query whose few target tokens carry its loss, at a fraction of
    the head's cost.
  """
  variants = _check_variants(variants, has_corrections)
  if head_chunk_logits < 1:
    raise ValueError(f"head_chunk_logits must be >= 1, got {head_chunk_logits}")

  def kernel(params, mats, corrs, tokens_bt, mask_bt, loss_rows=None):
    _check_corrections(corrs, variants)
    cfg = model.cfg
    inputs_bt = tokens_bt[:, :-1]
    corr_of = lambda m, name: corrs[m.name] if name == "corrected" else None
    heads = [m for m in plan.members if _is_head(m, cfg.tie_embeddings)]
    # The fused head (`fused_head`) unless a head member's V is full: that path
    # materialises the member's gradient, so it needs the [B, T, V] logit gradient.
    fused = not any(isinstance(corr_of(m, v), corr_lib.FullCorrection)
                    for m in heads for v in variants)
    head_terms = {}
    if fused:
      vocab_mats = [_vocab_matrix(m, p_in=mats[m.name][0], p_out=mats[m.name][1],
                                  corr=corr_of(m, v)) for v in variants for m in heads]
      p_kv = jnp.concatenate(vocab_mats, axis=0) if vocab_mats else None
      deltas, inter, nll_b, h, g_vocab = fused_activation_grads(
          model, params, tokens_bt, mask_bt, p_kv, chunk_logits=head_chunk_logits,
          loss_rows=loss_rows)
      if vocab_mats:
        sizes = list(itertools.accumulate(p.shape[0] for p in vocab_mats))[:-1]
        parts = iter(jnp.split(g_vocab, sizes, axis=-1))
        head_terms = {(v, m.name): (h, next(parts)) for v in variants for m in heads}
    else:
      pert_shapes = _perturbation_shapes(model, *inputs_bt.shape)
      perts = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), pert_shapes)

      def total_loss(perts):
        nll_b, state = model_lib.example_losses(
            model, {"params": params, "perturbations": perts}, tokens_bt, mask_bt,
            mutable=["intermediates"])
        return jnp.sum(nll_b), (nll_b, state["intermediates"])

      deltas, (nll_b, inter) = jax.grad(total_loss, has_aux=True)(perts)
    deltas, inter = flax.core.unfreeze(deltas), flax.core.unfreeze(inter)

    # Every variant's terms first (projections asked for, not yet run), then each
    # input tensor projected once by all the matrices that read it, then per block
    # one contraction over time of all its factor pairs (concatenated along T).
    projections = _Projections()
    terms = {}
    for name in variants:
      for m in plan.members:
        p_in, p_out = mats[m.name]
        terms[name, m.name] = _member_terms(
            m, inter=inter, deltas=deltas, inputs_bt=inputs_bt, p_in=p_in, p_out=p_out,
            corr=corr_of(m, name), projections=projections,
            head=head_terms.get((name, m.name)))
    projections.run()
    get = lambda a: projections.result(a) if isinstance(a, tuple) else a

    def block_out(block: proj.Block, name: str) -> Array:
      direct, lefts, rights = [], [], []
      for m in block.members:
        dterm, pairs = terms[name, m.name]
        if dterm is not None:
          direct.append(dterm)
        lefts += [get(l) for l, _ in pairs]
        rights += [get(r) for _, r in pairs]
      acc = 0.0
      if lefts:
        acc = jnp.einsum("btk,btl->bkl", jnp.concatenate(lefts, axis=1),
                         jnp.concatenate(rights, axis=1))
      for dterm in direct:
        acc = acc + dterm
      return acc.reshape(acc.shape[0], -1)

    out = {"loss": nll_b}
    for name in variants:
      out[name] = jnp.concatenate([block_out(b, name) for b in plan.blocks], axis=-1)
    return out

  return kernel


def make_reference_kernel(*, model: model_lib.Transformer, plan: proj.Plan,
                          has_corrections: bool,
                          variants: tuple[str, ...] | None = None) -> Callable:
  """Same arguments, signature and output as `make_factored_kernel`, computed by
  vmap(grad): every per-example gradient materialised, multiplied by
  `tda.correction.full_inv_sqrt` of its record (corrected variant), projected.
  (`loss_rows` is accepted and changes nothing: every position is differentiated.)"""
  variants = _check_variants(variants, has_corrections)

  def kernel(params, mats, corrs, tokens_bt, mask_bt, loss_rows=None):
    del loss_rows
    _check_corrections(corrs, variants)

    def loss_one(p, tokens_t, mask_t):
      return model_lib.example_losses(model, {"params": p}, tokens_t[None], mask_t[None])[0]

    nll_b = jax.vmap(loss_one, in_axes=(None, 0, 0))(params, tokens_bt, mask_bt)
    grads = jax.vmap(jax.grad(loss_one), in_axes=(None, 0, 0))(params, tokens_bt, mask_bt)

    def member(m: proj.Member, corrected: bool) -> Array:
      g = model_lib.param_at(grads, m.path).astype(jnp.float32)
      if corrected:
        g = g * corr_lib.full_inv_sqrt(corrs[m.name])
      p_in, p_out = mats[m.name]
      return proj.project_full(grads_bmn=g, member=m, p_in=p_in, p_out=p_out)

    out = {"loss": nll_b}
    for name in variants:
      out[name] = _assemble(plan, functools.partial(member, corrected=name == "corrected"))
    return out

  return kernel

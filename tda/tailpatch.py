"""Tail-patch influence (DESIGN.md §3): does training on a proponent raise the target?

For a (query, proponent passage) pair: from the final checkpoint (params and the
full optimizer state) take ONE step of the training optimizer on that passage
alone (mean token loss, as a batch of one), and compare the probability of the
query's target (product over target tokens) before and after.

Learning rate: `eval.tailpatch_lr`; None (the default) takes the training
schedule's final value, i.e. the step size the model's last updates had, so one
tail-patch step is one more step of the same training run.

Pairs are vectorised (`jax.vmap`, fixed-size chunks, passages grouped by length
bucket: one compiled shape per bucket width), and nothing is computed twice: each
distinct pair once even when several methods retrieve it; the step on a passage
once however many queries it is paired with (it does not depend on the query), and
the probability before it once per query.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tda import model as model_lib
from tda import progress
from tda import train as train_lib


def tailpatch_optimizer(config, lr: float):
  """The training optimizer at a constant LR, with the same state structure."""
  return train_lib.make_optimizer_from(optimizer=config.train.optimizer,
                                       learning_rate=lambda count: lr, train=config.train)


def default_lr(config) -> float:
  if config.eval.tailpatch_lr is not None:
    return float(config.eval.tailpatch_lr)
  return float(train_lib.lr_schedule(config)(config.train.steps))


def target_prob_fn(model: model_lib.Transformer):
  """(params, query_t, qmask_t) -> the probability of the query's target (masked tokens)."""

  def target_prob(params, query_t, qmask_t):
    nll = model_lib.example_losses(model, {"params": params}, query_t[None], qmask_t[None])[0]
    return jnp.exp(-nll)

  return target_prob


@dataclasses.dataclass(frozen=True)
class Fns:
  """The three jitted pieces of tail-patching (`make_batched`).

  update: (params, opt_state, passages_pt) -> params after one step on each passage
    (a leading axis of len(passages_pt) on every leaf).
  before: (params, queries_pl, qmasks_pl) -> [P] target probabilities.
  after: (updated params [P', ...], idx_p, queries_pl, qmasks_pl) -> [P] target
    probabilities under the updated params `idx_p` picks for each query.
  """
  update: Callable
  before: Callable
  after: Callable


def make_batched(model, tx) -> Fns:
  """jit(vmap(...)) of the step, and of the target probability before and after it."""
  step = train_lib.make_train_step(model, tx)
  prob = target_prob_fn(model)

  def update(params, opt_state, passage_t):
    return step(params, opt_state, passage_t[None])[0]

  def after(new_params, idx_p, queries_pl, qmasks_pl):
    picked = jax.tree.map(lambda x: x[idx_p], new_params)
    return jax.vmap(prob)(picked, queries_pl, qmasks_pl)

  return Fns(update=jax.jit(jax.vmap(update, in_axes=(None, None, 0))),
             before=jax.jit(jax.vmap(prob, in_axes=(None, 0, 0))),
             after=jax.jit(after))


def tailpatch_pairs(*, fn: Fns, params, opt_state, passages_pt: np.ndarray,
                    queries_pl: np.ndarray, qmasks_pl: np.ndarray,
                    passage_of: np.ndarray | None = None, query_of: np.ndarray | None = None,
                    chunk: int = 32) -> tuple[np.ndarray, np.ndarray]:
  """Before/after target probabilities for each (passage, query) pair.

  Pair i is (passages_pt[passage_of[i]], queries_pl[query_of[i]]) (default: row i
  of both). The step on a passage does not depend on the query, nor the
  probability before it on the passage, so each distinct passage row is stepped
  once and each distinct query row scored once before; only the probability
  after is computed per pair. Passages run at their length rounded up to 32
  (trailing padding changes nothing in a causal LM), `chunk` rows per call.

  Returns:
    (before [pairs], after [pairs]) float64.
  """
  n_pairs = len(queries_pl) if query_of is None else len(query_of)
  passage_of = np.arange(n_pairs) if passage_of is None else np.asarray(passage_of, np.int64)
  query_of = np.arange(n_pairs) if query_of is None else np.asarray(query_of, np.int64)
  if len(passage_of) != n_pairs:
    raise ValueError(f"passage_of has {len(passage_of)} pairs, query_of {n_pairs}")
  before_q = np.zeros(len(queries_pl), np.float64)
  used_q = np.unique(query_of)
  for sl, pad in model_lib.fixed_batches(len(used_q), chunk):
    rows = used_q[sl]
    b = fn.before(params, model_lib.pad_rows(queries_pl[rows], pad),
                  model_lib.pad_rows(qmasks_pl[rows], pad))
    before_q[rows] = np.asarray(b)[:len(rows)]
  after = np.zeros(n_pairs, np.float64)
  used_p = np.unique(passage_of)
  # Passages grouped by their length bucket: each group runs at its own width (one
  # compiled shape per width), not all at the longest passage's.
  widths = model_lib.bucket_lengths((passages_pt[used_p] != 0).sum(1), multiple=32,
                                    max_len=passages_pt.shape[1])
  order = np.argsort(passage_of, kind="stable")
  starts = np.searchsorted(passage_of[order], used_p)
  pairs_of = dict(zip(used_p.tolist(), np.split(order, starts[1:])))
  bar = progress.start(total=n_pairs, desc="tail-patch", unit="pair")
  for w in np.unique(widths):
    group = used_p[widths == w]
    for sl, pad in model_lib.fixed_batches(len(group), chunk):
      rows = group[sl]
      new_params = fn.update(params, opt_state,
                             model_lib.pad_rows(passages_pt[rows, :int(w)], pad))
      pairs = np.concatenate([pairs_of[int(p)] for p in rows])
      slot = np.concatenate([np.full(len(pairs_of[int(p)]), j) for j, p in enumerate(rows)])
      for psl, ppad in model_lib.fixed_batches(len(pairs), chunk):
        sel, q = pairs[psl], query_of[pairs[psl]]
        a = fn.after(new_params, model_lib.pad_rows(slot[psl], ppad),
                     model_lib.pad_rows(queries_pl[q], ppad), model_lib.pad_rows(qmasks_pl[q], ppad))
        after[sel] = np.asarray(a)[:len(sel)]
        bar.update(len(sel))
  bar.close()
  return before_q[query_of], after


def tailpatch_methods(*, fn, params, opt_state, corpus_tokens_nt: np.ndarray,
                      row_of: dict[str, int], query_tokens_nl: np.ndarray,
                      query_mask_nl: np.ndarray, rankings: dict[str, list[list[str]]],
                      query_rows: Sequence[int], k: int, chunk: int = 32):
  """Tail-patch the top-k proponents of the given queries for every method.

  Args:
    fn: `make_batched(...)`.
    rankings: method -> per query (all queries) the proponent ids, best first.
    query_rows: which queries to tail-patch.
    k: proponents per query.

  Returns:
    method -> (abs [Q, k], rel [Q, k]) with NaN rows for queries not evaluated.
  """
  pairs: dict[tuple[int, str], int] = {}
  for ranked in rankings.values():
    for q in query_rows:
      for pid in ranked[q][:k]:
        pairs.setdefault((q, pid), len(pairs))
  keys = list(pairs)
  before, after = np.zeros(len(keys)), np.zeros(len(keys))
  if keys:
    pids = sorted({pid for _, pid in keys})
    slot = {pid: j for j, pid in enumerate(pids)}
    before, after = tailpatch_pairs(
        fn=fn, params=params, opt_state=opt_state,
        passages_pt=corpus_tokens_nt[[row_of[pid] for pid in pids]],
        queries_pl=query_tokens_nl, qmasks_pl=query_mask_nl,
        passage_of=np.array([slot[pid] for _, pid in keys]),
        query_of=np.array([q for q, _ in keys]), chunk=chunk)
  out = {}
  n_q = len(query_tokens_nl)
  for method, ranked in rankings.items():
    abs_qk = np.full((n_q, k), np.nan)
    rel_qk = np.full((n_q, k), np.nan)
    for q in query_rows:
      for j, pid in enumerate(ranked[q][:k]):
        i = pairs[(q, pid)]
        abs_qk[q, j] = after[i] - before[i]
        rel_qk[q, j] = (after[i] - before[i]) / max(before[i], 1e-30)
    out[method] = (abs_qk, rel_qk)
  return out

"""Tail-patch influence (DESIGN.md §3): does training on a proponent raise the target?

For a (query, proponent passage) pair: from the final checkpoint (params and the
full optimizer state) take ONE step of the training optimizer on that passage
alone (mean token loss, as a batch of one), and compare the probability of the
query's target (product over target tokens) before and after.

Learning rate: `eval.tailpatch_lr`; None (the default) takes the training
schedule's final value, i.e. the step size the model's last updates had, so one
tail-patch step is one more step of the same training run.

Pairs are vectorised: `jax.vmap` over (passage, query) pairs in fixed-size
chunks, grouped by passage length bucket (one compiled shape per bucket width),
and each distinct pair is computed once even when several methods retrieve it.
"""

from __future__ import annotations

from typing import Sequence

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


def make_pair_fn(model: model_lib.Transformer, tx):
  """(params, opt_state, passage_t, query_t, qmask_t) -> (p_before, p_after)."""
  step = train_lib.make_train_step(model, tx)

  def target_prob(params, query_t, qmask_t):
    nll = model_lib.example_losses(model, {"params": params}, query_t[None], qmask_t[None])[0]
    return jnp.exp(-nll)

  def pair(params, opt_state, passage_t, query_t, qmask_t):
    new_params, _, _ = step(params, opt_state, passage_t[None])
    return target_prob(params, query_t, qmask_t), target_prob(new_params, query_t, qmask_t)

  return pair


def make_batched(model, tx):
  """jit(vmap(pair)) over a chunk of pairs."""
  return jax.jit(jax.vmap(make_pair_fn(model, tx), in_axes=(None, None, 0, 0, 0)))


def tailpatch_pairs(*, fn, params, opt_state, passages_pt: np.ndarray,
                    queries_pl: np.ndarray, qmasks_pl: np.ndarray,
                    chunk: int = 32) -> tuple[np.ndarray, np.ndarray]:
  """Before/after target probabilities for each (passage, query) row pair."""
  n = len(passages_pt)
  before, after = np.zeros(n, np.float64), np.zeros(n, np.float64)
  bar = progress.start(total=n, desc="tail-patch", unit="pair")
  for sl, pad in model_lib.fixed_batches(n, chunk):
    b, a = fn(params, opt_state, model_lib.pad_rows(passages_pt[sl], pad),
              model_lib.pad_rows(queries_pl[sl], pad), model_lib.pad_rows(qmasks_pl[sl], pad))
    before[sl] = np.asarray(b)[:sl.stop - sl.start]
    after[sl] = np.asarray(a)[:sl.stop - sl.start]
    bar.update(sl.stop - sl.start)
  bar.close()
  return before, after


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
    passages = corpus_tokens_nt[[row_of[pid] for _, pid in keys]]
    # Pairs grouped by their passage's length bucket: each group runs at its own
    # width (one compiled shape per width), not all at the longest passage's.
    widths = model_lib.bucket_lengths((passages != 0).sum(1), multiple=32,
                                      max_len=passages.shape[1])
    q_rows = np.array([q for q, _ in keys])
    for w in np.unique(widths):
      sel = np.flatnonzero(widths == w)
      before[sel], after[sel] = tailpatch_pairs(
          fn=fn, params=params, opt_state=opt_state, passages_pt=passages[sel, :int(w)],
          queries_pl=query_tokens_nl[q_rows[sel]], qmasks_pl=query_mask_nl[q_rows[sel]],
          chunk=chunk)
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

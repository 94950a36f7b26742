"""Model evaluation: does the trained model know each queried fact?

`query_accuracy` is greedy exact match of the target: the greedy continuation of
the prompt equals the target tokens iff at every target position the argmax of
the teacher-forced logits is the target token (greedy decoding would have
produced that same prefix), so one forward pass decides it exactly. We also
decode a free greedy continuation (the viewer's "prediction"), the target
probability (product over target tokens), and, when `model_eval.num_samples`
> 0, temperature samples whose share matching the target is `model_confidence`
(the paper's viewer field).
"""

from __future__ import annotations

import collections
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tda import model as model_lib
from tda import sharding


def make_scorer(model: model_lib.Transformer):
  """(params, tokens_bl, mask_bl) -> (log p(target) [B], all-argmax-correct [B])."""

  def score(params, tokens_bl, mask_bl):
    inputs, targets, mask = model_lib.shift(tokens_bl, mask_bl)
    logits = model.apply({"params": params}, inputs)
    logp = jax.nn.log_softmax(logits, axis=-1)
    tok_lp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    hit = (jnp.argmax(logits, axis=-1) == targets) | (mask == 0)
    return jnp.sum(tok_lp * mask, axis=-1), jnp.all(hit, axis=-1)

  return jax.jit(score)


def make_decoder(model: model_lib.Transformer, *, steps: int, temperature: float = 0.0):
  """(params, prompts_bl, prompt_lens_b, rng) -> generated tokens [B, steps]."""

  def decode(params, prompts_bl, prompt_lens_b, rng):
    b = prompts_bl.shape[0]
    buf = jnp.concatenate([prompts_bl, jnp.zeros((b, steps), prompts_bl.dtype)], axis=1)

    def body(i, carry):
      buf, rng = carry
      logits = model.apply({"params": params}, buf)
      pos = prompt_lens_b + i - 1
      nxt_logits = jnp.take_along_axis(logits, pos[:, None, None], axis=1)[:, 0]
      rng, sub = jax.random.split(rng)
      if temperature > 0:
        nxt = jax.random.categorical(sub, nxt_logits / temperature)
      else:
        nxt = jnp.argmax(nxt_logits, axis=-1)
      buf = buf.at[jnp.arange(b), pos + 1].set(nxt.astype(buf.dtype))
      return buf, rng

    buf, _ = jax.lax.fori_loop(0, steps, body, (buf, rng))
    idx = prompt_lens_b[:, None] + jnp.arange(steps)[None, :]
    return jnp.take_along_axis(buf, idx, axis=1)

  return jax.jit(decode)


def _decode_text(vocab, toks) -> str:
  toks = [int(t) for t in toks]
  if 1 in toks:  # EOS
    toks = toks[:toks.index(1)]
  return vocab.decode([t for t in toks if t > 2]).strip()


def evaluate_queries(*, model, params, queries, targets, vocab, batch_size: int,
                     max_new_tokens: int, num_samples: int = 0,
                     temperature: float = 1.0, seed: int = 0) -> list[dict[str, Any]]:
  """Per-query results: correct, target_logprob, prediction, samples, confidence."""
  # Sharded params (tda.train.load_trained) computed with their DATA split gathered.
  params = sharding.gather(params)
  scorer = make_scorer(model)
  greedy = make_decoder(model, steps=max_new_tokens)
  sampler = make_decoder(model, steps=max_new_tokens, temperature=temperature) if num_samples else None
  tokens, mask = queries.tokens_nl, queries.loss_mask_nl
  plen = np.asarray(queries.prompt_lens, np.int32)
  n = len(tokens)
  out = []
  rng = jax.random.key(seed)
  for sl, pad in model_lib.fixed_batches(n, batch_size):
    s = sl.start
    tb = model_lib.pad_rows(tokens[sl], pad)
    mb = model_lib.pad_rows(mask[sl], pad)
    pl = model_lib.pad_rows(plen[sl], pad, value=1)
    prompts = np.where(np.arange(tb.shape[1])[None, :] < pl[:, None], tb, 0)
    lp, ok = scorer(params, tb, mb)
    gen = np.asarray(greedy(params, prompts, pl, rng))
    samples = []
    for j in range(num_samples):
      rng, sub = jax.random.split(rng)
      samples.append(np.asarray(sampler(params, prompts, pl, sub)))
    for i in range(sl.stop - sl.start):
      q = s + i
      target = targets[q]
      samp = [_decode_text(vocab, smp[i]) for smp in samples]
      out.append({
          "example_id": queries.ids[q], "fact_id": queries.fact_ids[q],
          "correct": bool(ok[i]), "target_logprob": float(lp[i]),
          "target_prob": float(np.exp(lp[i])),
          "prediction": _decode_text(vocab, gen[i]),
          "temperature_samples": samp,
          "model_confidence": (float(np.mean([x.startswith(target) for x in samp]))
                               if samp else float(np.exp(lp[i]))),
      })
  return out


def summarize(*, per_query: list[dict[str, Any]], facts: list[dict[str, Any]],
              bucket_order: list[str]) -> dict[str, Any]:
  by_fact = {f["fact_id"]: f for f in facts}
  acc = collections.defaultdict(list)
  rel = collections.defaultdict(list)
  for r in per_query:
    f = by_fact[r["fact_id"]]
    acc[f["bucket"]].append(r["correct"])
    rel[f["relation"]].append(r["correct"])
  return {
      "query_accuracy": float(np.mean([r["correct"] for r in per_query])),
      "accuracy_by_bucket": {b: float(np.mean(acc[b])) for b in bucket_order if acc[b]},
      "count_by_bucket": {b: len(acc[b]) for b in bucket_order if acc[b]},
      "accuracy_by_relation": {k: float(np.mean(v)) for k, v in sorted(rel.items())},
      "mean_target_prob": float(np.mean([r["target_prob"] for r in per_query])),
      "num_queries": len(per_query),
  }

"""Model-evaluation stage: does the trained model know each queried fact?

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
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tda import model as model_lib
from tda import workdir as wd


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
  scorer = make_scorer(model)
  greedy = make_decoder(model, steps=max_new_tokens)
  sampler = make_decoder(model, steps=max_new_tokens, temperature=temperature) if num_samples else None
  tokens, mask = queries.tokens_nl, queries.loss_mask_nl
  plen = np.asarray(queries.prompt_lens, np.int32)
  n = len(tokens)
  out = []
  rng = jax.random.key(seed)
  for s in range(0, n, batch_size):
    sl = slice(s, min(s + batch_size, n))
    pad = batch_size - (sl.stop - sl.start)
    tb = np.pad(tokens[sl], ((0, pad), (0, 0)))
    mb = np.pad(mask[sl], ((0, pad), (0, 0)))
    pl = np.pad(plen[sl], (0, pad), constant_values=1)
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


STAGE = "model_eval"


def load_predictions(workdir: str) -> dict[str, dict[str, Any]]:
  """Per-query model results of the committed stage, keyed by example id."""
  rows = wd.read_jsonl(os.path.join(wd.stage_dir(workdir, STAGE), "predictions.jsonl"))
  return {r["example_id"]: r for r in rows}


def run_stage(ctx) -> dict[str, Any]:
  """Writes results/model_eval.json (and the stage's per-query predictions)."""
  from tda import config as config_lib
  from tda import train
  config, workdir = ctx.config, ctx.workdir
  me = config.model_eval
  step = train.latest_step(workdir)
  fingerprint = {"model_eval": me.to_dict(), "train_step": step,
                 "train": train.fingerprint(config)}
  res = os.path.join(workdir, "results")
  if wd.check_fingerprint(workdir, STAGE, fingerprint):
    return wd.read_json(os.path.join(wd.stage_dir(workdir, STAGE), "model_eval.json"))
  model, state, _ = ctx.trained
  _, queries = ctx.arrays
  facts = ctx.world.facts
  by_fact = {f["fact_id"]: f for f in facts}
  t0 = time.time()
  per_query = evaluate_queries(model=model, params=state.params, queries=queries,
                               targets=[by_fact[f]["targets_plaintext"] for f in queries.fact_ids],
                               vocab=ctx.vocab, batch_size=me.batch_size,
                               max_new_tokens=me.max_new_tokens, num_samples=me.num_samples,
                               temperature=me.temperature, seed=config.seed)
  summary = summarize(per_query=per_query, facts=facts,
                      bucket_order=[b for b, _, _ in config_lib.bucket_ranges(config)])
  summary["wall_s"] = time.time() - t0
  summary["train_step"] = step
  with wd.atomic_stage(workdir, STAGE, fingerprint) as tmp:
    wd.write_jsonl(os.path.join(tmp, "predictions.jsonl"), per_query)
    wd.write_json(os.path.join(tmp, "model_eval.json"), summary)
  os.makedirs(res, exist_ok=True)
  wd.write_json(os.path.join(res, "model_eval.json"), summary)
  logging.info("query accuracy %.3f; by bucket %s", summary["query_accuracy"],
               summary["accuracy_by_bucket"])
  return summary

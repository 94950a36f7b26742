"""Tail-patch with shared work vs one step per (query, passage) pair, on a real run.

For a finished default run (read only), takes the pairs the 'evaluation' stage
tail-patches for the first `--queries` test queries (top `eval.tailpatch_k` of
every method, each distinct pair once) and computes them twice with
`tda.tailpatch.tailpatch_pairs`: as the stage does (one optimizer step per
distinct passage, one "before" probability per query), and with every pair given
its own passage and query row (one step and one "before" per pair, the cost
before sharing). Both run the same compiled shapes, compiled by a first shared run
that is not timed. Prints pairs, distinct passages and queries, the CPU and wall
seconds of each, their ratio, and the largest differences of p_before and p_after
between the two.

    python scripts/bench_tailpatch.py --workdir=W --queries=20 [--json]

The saving grows with how often passages recur among the pairs: on the default
run, 20 test queries give 1,034 pairs over 654 passages (CPU 26.4 s vs 20.5 s);
all 151 give 7,847 pairs over 1,421 passages (the stage's tail-patch: 368 s wall
before sharing, 114 s after).
"""

from __future__ import annotations

import os
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tda import cli  # pylint: disable=g-import-not-at-top
from tda import context as context_lib
from tda import protocol
from tda import tailpatch

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished default run (read only).",
                               required=True)
_CONFIG = config_flags.DEFINE_config_file("config", "configs/trackstar_tiny.py",
                                          "The run's config file.", lock_config=True)
_QUERIES = flags.DEFINE_integer("queries", 20, "Test queries whose pairs are tail-patched "
                                 "(0: all, as the stage does).")
_JSON = cli.define_json_flag()


def main(_):
  cli.emit(as_json=_JSON.value, measure=measure, report=report)


def measure() -> dict:
  """Tail-patches the pairs both ways and returns the figures."""
  config = _CONFIG.value
  ctx = context_lib.Context(config=config, workdir=_WORKDIR.value)
  corpus, queries = ctx.arrays
  split = ctx.gradients.split()
  test = [i for i, q in enumerate(queries.ids) if split[q] == protocol.TEST]
  test = test[:_QUERIES.value or len(test)]
  pairs = sorted({(q, pid) for r in ctx.rankings.values() for q in test
                  for pid in r["top_ids"][q][:config.eval.tailpatch_k]})
  row_of = {pid: i for i, pid in enumerate(corpus.ids)}
  pids = sorted({pid for _, pid in pairs})
  slot = {pid: j for j, pid in enumerate(pids)}
  q_of = np.array([q for q, _ in pairs])
  model, state, _ = ctx.trained
  fn = tailpatch.make_batched(model, tailpatch.tailpatch_optimizer(
      config, tailpatch.default_lr(config)))
  common = dict(fn=fn, params=state.params, opt_state=state.opt_state)

  def timed(**kw):
    t0, c0 = time.time(), time.process_time()
    out = tailpatch.tailpatch_pairs(**common, **kw)
    return out, time.process_time() - c0, time.time() - t0

  shared = dict(passages_pt=corpus.tokens_nt[[row_of[p] for p in pids]],
                queries_pl=queries.tokens_nl, qmasks_pl=queries.loss_mask_nl,
                passage_of=np.array([slot[p] for _, p in pairs]), query_of=q_of)
  timed(**shared)  # Compiles every shape both runs use.
  (b_per, a_per), cpu_per, wall_per = timed(
      passages_pt=corpus.tokens_nt[[row_of[p] for _, p in pairs]],
      queries_pl=queries.tokens_nl[q_of], qmasks_pl=queries.loss_mask_nl[q_of])
  (b_sh, a_sh), cpu_sh, wall_sh = timed(**shared)
  out = {"pairs": len(pairs), "distinct_passages": len(pids), "queries": len(test),
         "cpu_s_one_step_a_pair": cpu_per, "wall_s_one_step_a_pair": wall_per,
         "cpu_s_shared": cpu_sh, "wall_s_shared": wall_sh,
         "cpu_ratio": cpu_per / max(cpu_sh, 1e-9),
         "max_abs_diff_p_before": float(np.abs(b_per - b_sh).max()),
         "max_abs_diff_p_after": float(np.abs(a_per - a_sh).max()),
         "pairs_bit_identical": int(((b_per == b_sh) & (a_per == a_sh)).sum())}
  return out


def report(out: dict) -> None:
  """The figures as a table."""
  print(f"pairs {out['pairs']}, distinct passages {out['distinct_passages']}, "
        f"queries {out['queries']}")
  print("                  cpu_s   wall_s")
  print(f"one step a pair  {out['cpu_s_one_step_a_pair']:7.1f}  "
        f"{out['wall_s_one_step_a_pair']:7.1f}")
  print(f"shared           {out['cpu_s_shared']:7.1f}  {out['wall_s_shared']:7.1f}")
  print(f"ratio (cpu)      {out['cpu_ratio']:7.2f}")
  print(f"max |d p_before| {out['max_abs_diff_p_before']:.3g}, max |d p_after| "
        f"{out['max_abs_diff_p_after']:.3g}, pairs bit-identical "
        f"{out['pairs_bit_identical']} of {out['pairs']}")

if __name__ == "__main__":
  app.run(main)

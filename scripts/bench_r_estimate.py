"""How well R can be estimated, and what it does to dev MRR, at several d.

For a finished default run (its world, vocabulary and final checkpoint, read
only), featurises the queries and the whole corpus at each projection size
(gradients.k_in = k_out = k, full or block-diagonal R), fits R_train, R_eval
(dev queries) and the dev damping sweep exactly as the 'gradients' stage does,
and prints, per setting: d, R_train samples per dimension (or per block
dimension), and each gradient method's best dev MRR. Dev queries only: the
choice of d must not look at test.

    python scripts/bench_r_estimate.py --workdir=W --settings=8,16:block,24
"""

from __future__ import annotations

import os
import sys
import time

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tda import featurize  # pylint: disable=g-import-not-at-top
from tda import methods as methods_lib
from tda import protocol
from tda import context as context_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished default run (read only).",
                               required=True)
_SETTINGS = flags.DEFINE_list("settings", ["8", "16:block", "24"],
                              "k per side of every block; ':block' for block-diagonal R.")


def main(_):
  import configs.trackstar_tiny as tiny  # pylint: disable=import-outside-toplevel
  rows = []
  for setting in _SETTINGS.value:
    k, _, mode = setting.partition(":")
    config = tiny.get_config()
    with config.unlocked():
      config.gradients.k_in = config.gradients.k_out = int(k)
      config.hessian.block_diagonal = mode == "block"
    ctx = context_lib.Context(config=config, workdir=_WORKDIR.value)
    model, state, _ = ctx.trained
    eng = featurize.make_engine(config, model=model, state=state)
    corpus, queries = ctx.arrays
    t0 = time.time()
    q = eng.featurizer(tokens_nt=queries.tokens_nl, mask_nt=queries.loss_mask_nl,
                       ids=queries.ids)
    p = eng.featurizer(tokens_nt=corpus.tokens_nt,
                       mask_nt=(corpus.tokens_nt != 0).astype(np.float32), ids=corpus.ids)
    facts = {f["fact_id"]: f for f in ctx.world.facts}
    facts_q = [facts[f] for f in queries.fact_ids]
    dev = np.flatnonzero(protocol.query_split(config, facts_q) == protocol.DEV)
    variants = methods_lib.variants(config.eval.methods)
    pool = featurize.DevPool(
        queries={v: q[v][dev] for v in variants}, pool={v: p[v] for v in variants},
        relevant_qp=np.array([np.isin(corpus.ids, facts_q[r]["passage_ids"]) for r in dev]))
    fit = featurize.fit_whiteners(
        config, methods=methods_lib.gradient(config.eval.methods),
        queries={v: q[v][dev] for v in variants}, train={v: p[v] for v in variants},
        block_sizes=[b.dim for b in eng.plan.blocks], dev=pool)
    d = eng.plan.dim
    r_dim = max(b.dim for b in eng.plan.blocks) if mode == "block" else d
    rows.append((setting, d, len(corpus.ids) / r_dim, fit.whiteners.lam,
                 {t: s["dev_mrr_chosen"] for t, s in fit.sweep.items()}, time.time() - t0))
  tables = list(rows[0][4])
  print("setting      d  samples/dim(R)  lambda   " + "  ".join(f"{t:>9}" for t in tables)
        + "   wall_s")
  for setting, d, spd, lam, mrr, wall in rows:
    print(f"{setting:9} {d:5d} {spd:14.1f} {lam:8.4f}   "
          + "  ".join(f"{mrr[t]:9.3f}" for t in tables) + f"   {wall:6.1f}")


if __name__ == "__main__":
  app.run(main)

"""Latency of tracing one prompt (tda.query) against a finished run.

    python scripts/bench_query.py --workdir=W [--n=50] [--method=trackstar] [--json]

Loads the run once (`tda.query.Engine`: model, projection, V correction, R^{-1/2},
the method's table), warms up (compiles the kernels, loads the index), then
traces `--n` prompts one request at a time, the run's own query prompts with
their targets (cycled when fewer), and reports the end-to-end wall time per
request (p50, p95, mean) and its split: tokenise, gradient (the projected,
corrected per-example gradient), whitening (R^{-1/2}, unit norm), search (the
table, exact or ScaNN as the run's index.method) and text fetch.
`--greedy` leaves the target out, so each request also decodes the model's
greedy continuation ('generate').

`--json` prints one object: p50_s, p95_s, mean_s, split (p50 and mean per part),
n, method, index, rows, d, load_s, warm_up_s.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tda import cli  # pylint: disable=g-import-not-at-top
from tda import query as query_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished run's workdir.")
_N = flags.DEFINE_integer("n", 50, "Requests to time (>= 50 for the p95).")
_METHOD = flags.DEFINE_string("method", "trackstar", "The gradient method traced.")
_K = flags.DEFINE_integer("k", 10, "Proponents (and opponents) per request.")
_GREEDY = flags.DEFINE_bool("greedy", False, "Trace the greedy continuation (no target).")
_JSON = cli.define_json_flag()
flags.mark_flags_as_required(["workdir"])


def measure(*, workdir: str, n: int, method: str, k: int, greedy: bool) -> dict:
  t0 = time.perf_counter()
  engine = query_lib.engine_from_flags(workdir)
  load_s = time.perf_counter() - t0
  warm_s = engine.warm_up([method], all_lengths=True)
  facts = engine.ctx.world.facts
  walls, parts = [], {key: [] for key in query_lib.TIMING_KEYS}
  for i in range(n):
    f = facts[i % len(facts)]
    req = query_lib.Request(prompt=f["inputs_plaintext"],
                            target=None if greedy else f["targets_plaintext"],
                            method=method, k=k)
    t0 = time.perf_counter()
    try:
      res = engine.trace([req])[0]
    except query_lib.QueryError as e:  # E.g. an empty greedy continuation.
      print(f"skipped {f['example_id']}: {e}", file=sys.stderr)
      continue
    walls.append(time.perf_counter() - t0)
    for key in query_lib.TIMING_KEYS:
      parts[key].append(res["timings"][f"{key}_s"])
  walls = np.array(walls)
  searcher = engine.searcher(method)
  return {
      "n": int(len(walls)), "method": method, "k": k, "greedy": greedy,
      "index": engine.config.index.method, "rows": len(searcher.ids),
      "d": int(searcher.x_nd.shape[1]),
      "p50_s": float(np.percentile(walls, 50)), "p95_s": float(np.percentile(walls, 95)),
      "mean_s": float(walls.mean()),
      "split": {key: {"p50_s": float(np.percentile(v, 50)), "mean_s": float(np.mean(v))}
                for key, v in parts.items()},
      "load_s": load_s, "warm_up_s": warm_s,
  }


def main(argv):
  del argv
  cli.emit(as_json=_JSON.value, report=_report,
           measure=lambda: measure(workdir=_WORKDIR.value, n=_N.value, method=_METHOD.value,
                                   k=_K.value, greedy=_GREEDY.value))


def _report(out) -> None:
  print(f"{out['n']} requests, {out['method']} over {out['rows']} rows x d={out['d']} "
        f"({out['index']} search), k={out['k']}{' greedy targets' if out['greedy'] else ''}")
  print(f"end to end: p50 {out['p50_s']:.3f} s  p95 {out['p95_s']:.3f} s  "
        f"mean {out['mean_s']:.3f} s   (load {out['load_s']:.1f} s, warm-up "
        f"{out['warm_up_s']:.1f} s, not included)")
  for key, v in out["split"].items():
    print(f"  {key:<10} p50 {v['p50_s']:.4f} s  mean {v['mean_s']:.4f} s")


if __name__ == "__main__":
  app.run(main)

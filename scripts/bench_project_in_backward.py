"""Experiment (not adopted; docs/DESIGN.md §2): the factored kernel with each Dense
member's output-side projection formed inside the backward
(`make_factored_kernel(project_in_backward=True)`, `tda.model.project_output_grad`)
against the kernel as is, on bench_gradients.py's two shapes: the vectors' largest
relative difference, XLA's peak bytes, and the time in 9 interleaved rounds (median
and range of the per-round ratio). For the 8B compile check on a TPU topology:
`TDA_PIB=1 python -m tda.compile_check --config=configs/trackstar_8b.py
--topology=v5e-256 --json` against `TDA_PIB=0`.

    python scripts/bench_project_in_backward.py
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import bench_gradients as bg  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from tda import gradients as grad_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

ROUNDS = 9


def main():
  flags.FLAGS(sys.argv[:1])
  shapes = [("bench", bg._CONFIG.value, False, None),
            ("bergson_bench", bg.bergson_shape_config(bg._CONFIG.value), True, 1e-30)]
  for name, cfg, dense_only, eps in shapes:
    s = bg._Setup(cfg, seq_len=128, dense_only=dense_only, eps=eps)
    args = (s.params, s.mats, s.corrs, s.tokens, s.mask)
    runs = {}
    for variants in (None, ("corrected",)):
      for fuse in (False, True):
        key = f"{'both' if variants is None else 'corrected'}_{'fused' if fuse else 'plain'}"
        runs[key] = jax.jit(grad_lib.make_factored_kernel(
            model=s.model, plan=s.plan, has_corrections=True, variants=variants,
            project_in_backward=fuse))
    outs = {k: fn(*args) for k, fn in runs.items()}
    res = {"max_rel_diff": max(
        float(np.abs(np.asarray(outs["both_fused"][v]) - np.asarray(outs["both_plain"][v])).max()
              / np.abs(np.asarray(outs["both_plain"][v])).max()) for v in ("raw", "corrected"))}
    res["peak_mib"] = {k: round(bg._peak_bytes(fn, *args) / 2**20, 1) for k, fn in runs.items()}
    t = {k: [] for k in runs}
    for _ in range(ROUNDS):
      for k, fn in runs.items():
        t0 = time.perf_counter()
        for _ in range(3):
          o = fn(*args)
        jax.block_until_ready(o)
        t[k].append((time.perf_counter() - t0) / 3)
    res["ms"] = {k: round(float(np.median(v)) * 1e3, 2) for k, v in t.items()}
    for v in ("both", "corrected"):
      r = np.array(t[f"{v}_fused"]) / np.array(t[f"{v}_plain"])
      res[f"{v}_fused_over_plain"] = {"median": round(float(np.median(r)), 3),
                                      "min": round(float(r.min()), 3),
                                      "max": round(float(r.max()), 3)}
    print(name, json.dumps(res), flush=True)


if __name__ == "__main__":
  main()

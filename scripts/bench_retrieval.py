"""Benchmark: ScaNN (+ exact rerank) vs exact JAX search, and int8 vs float32 tables.

    python scripts/bench_retrieval.py --rows=1000000 --dim=1024 [--json] \
        [--compare_workdir=W]

Rows are synthetic stand-ins for gradient tables: low-rank signal plus isotropic
noise, unit-normalised. Queries are unit vectors correlated with random rows (a
row plus fresh low-rank signal plus noise). `data_stats` reports how structured
they are (energy in the top 64 principal directions; the k-th best score over the
score spread); `--compare_workdir` reports the same for a real TrackStar table
from a finished `tda.run` (the default world's table is far closer to isotropic,
energy_top64 0.15 against 0.85 here, with a similar top-10 contrast, so these
rows are the easier case for a partitioning index).

ScaNN's search knobs (leaves searched, reorder) are tuned on held-out queries;
the recall/speed frontier of that grid is reported too. All timings come from one
process; exact search batches every query into one matmul per row chunk.
Memory: the float32 rows ([rows, dim]) plus ScaNN's own float32 copy for
reordering; tables are written and searched shard by shard.

Goals: scann_recall_at_10 >= 0.99, scann_over_exact_qps >= 20,
int8_top10_overlap >= 0.98. Progress goes to stderr; the figures to stdout, as a
table or, with `--json`, as one JSON object on one line.
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tda import cli  # noqa: E402
from tda import fs  # noqa: E402
from tda import index as index_lib  # noqa: E402
from tda import tables  # noqa: E402

GEN_CHUNK = 65_536

flags.DEFINE_integer("rows", 1_000_000, "Synthetic table rows.")
flags.DEFINE_integer("dim", 1024, "Row dimension.")
flags.DEFINE_integer("queries", 1000, "Timed queries.")
flags.DEFINE_integer("k", 10, "Results per query.")
flags.DEFINE_integer("rank", 64, "Rank of the rows' low-rank signal.")
flags.DEFINE_float("signal", 0.7, "Low-rank share of each row.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_integer("num_leaves", None, "ScaNN leaves (default: its rule).")
flags.DEFINE_integer("num_leaves_to_search", None, "ScaNN leaves searched (default: its rule).")
flags.DEFINE_integer("dims_per_block", 2, "ScaNN AH dims per block.")
flags.DEFINE_float("soar_lambda", 1.0, "SOAR lambda; <= 0: off.")
flags.DEFINE_integer(
    "tune_queries", 200, "Held-out queries to pick leaves_to_search/reorder on (0: no tuning).")
flags.DEFINE_float(
    "target_recall", 0.995, "Tuning picks the fastest setting reaching this on tune queries.")
flags.DEFINE_float("aq_threshold", 0.2, "ScaNN anisotropic threshold.")
flags.DEFINE_integer("reorder", None, "ScaNN exact-rerank count (default: its rule).")
flags.DEFINE_integer("training_sample_size", None, "ScaNN training sample (default: its rule).")
flags.DEFINE_integer("chunk_rows", index_lib.DEFAULT_CHUNK_ROWS, "Rows per exact-search matmul.")
flags.DEFINE_integer("rows_per_shard", 131_072, "Table rows per shard.")
flags.DEFINE_bool("skip_tables", False, "Skip the int8/float32 table part.")
flags.DEFINE_string(
    "compare_workdir", None, "A finished tda.run workdir: also report its TrackStar "
    "table's statistics next to the synthetic rows'.")
flags.DEFINE_string("tmpdir", None, "Where tables go (removed after).")
_JSON = cli.define_json_flag()


def synth_rows(*, rows: int, dim: int, rank: int, signal: float, seed: int) -> tuple:
  """Low-rank + noise unit rows, generated chunk by chunk into one float32 array."""
  rng = np.random.default_rng(seed)
  basis_rd = rng.standard_normal((rank, dim)).astype(np.float32) / np.sqrt(dim)
  spectrum_r = (1.0 / np.sqrt(1.0 + np.arange(rank))).astype(np.float32)  # Decaying.
  x_nd = np.empty((rows, dim), np.float32)
  for lo in range(0, rows, GEN_CHUNK):
    n = min(GEN_CHUNK, rows - lo)
    crng = np.random.default_rng([seed, lo])
    z_nr = crng.standard_normal((n, rank), dtype=np.float32) * spectrum_r
    blk = z_nr @ basis_rd
    blk *= signal / np.linalg.norm(blk, axis=1, keepdims=True)
    blk += crng.standard_normal((n, dim), dtype=np.float32) * ((1 - signal) / np.sqrt(dim))
    blk /= np.linalg.norm(blk, axis=1, keepdims=True)
    x_nd[lo:lo + n] = blk
  return x_nd, basis_rd, spectrum_r


def synth_queries(*, x_nd, basis_rd, spectrum_r, num: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng([seed, 1])
  rows = rng.choice(x_nd.shape[0], size=num, replace=False)
  fresh = (rng.standard_normal((num, basis_rd.shape[0]), dtype=np.float32) * spectrum_r) @ basis_rd
  fresh /= np.linalg.norm(fresh, axis=1, keepdims=True)
  noise = rng.standard_normal((num, x_nd.shape[1]), dtype=np.float32)
  noise /= np.linalg.norm(noise, axis=1, keepdims=True)
  q = 0.6 * x_nd[rows] + 0.5 * fresh + 0.3 * noise
  return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def overlap(a_qk, b_qk) -> float:
  return float(np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(a_qk, b_qk)]))


def write_table(path, x_nd, dtype, rows_per_shard):
  w = tables.TableWriter(path=path, d=x_nd.shape[1], dtype=dtype,
                         rows_per_shard=rows_per_shard, meta={"bench": True})
  for lo in range(0, x_nd.shape[0], GEN_CHUNK):
    hi = min(lo + GEN_CHUNK, x_nd.shape[0])
    w.write(x_nd[lo:hi], [str(i) for i in range(lo, hi)])
  w.close()
  return tables.Table.open(path)


def tune(idx, tune_qd, x_nd, k, *, chunk_rows: int,
         target_recall: float) -> tuple[dict, dict]:
  """Fastest (leaves_to_search, reorder) reaching target recall on held-out queries,
  and the recall/speed frontier of the grid."""
  _, ref = index_lib.exact_search(queries_qd=tune_qd, vectors_nd=x_nd, k=k,
                                  chunk_rows=chunk_rows)
  nl = idx.params.get("num_leaves")
  if nl is None:
    return {}, {}
  grid = []
  reorders = (100, 200, 400, 1000) if idx.params["dims_per_block"] <= 2 else (
      200, 400, 1000, 2500)  # 2-dim blocks rarely need a long reorder.
  for leaves in sorted({max(1, min(nl, int(nl * f))) for f in
                        (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.13, 0.17, 0.25)}):
    for reorder in reorders:
      idx.search(tune_qd[:8], k, leaves_to_search=leaves, reorder=reorder)  # Warm-up.
      t = time.perf_counter()
      _, got = idx.search(tune_qd, k, leaves_to_search=leaves, reorder=reorder)
      grid.append((overlap(got, ref), time.perf_counter() - t, leaves, reorder))
      logging.info("  tune L=%d R=%d: recall %.4f %.0f qps", leaves, reorder, grid[-1][0],
                   len(tune_qd) / grid[-1][1])
  ok = [g for g in grid if g[0] >= target_recall]
  best = min(ok, key=lambda g: g[1]) if ok else max(grid, key=lambda g: (g[0], -g[1]))
  # The recall/speed frontier: for each recall level, the fastest setting reaching it.
  frontier = {}
  for target in (0.9, 0.95, 0.98, 0.99, 0.995):
    hit = [g for g in grid if g[0] >= target]
    if hit:
      g = min(hit, key=lambda g: g[1])
      frontier[str(target)] = {"qps": len(tune_qd) / g[1], "recall": g[0],
                               "leaves_to_search": g[2], "reorder": g[3]}
  return {"leaves_to_search": best[2], "reorder": best[3]}, frontier


def data_stats(x_nd, q_qd, *, k: int = 10, sample: int = 20_000, seed: int = 0) -> dict:
  """How structured the rows are, to compare a synthetic table with a real one.

  energy_top64: share of the rows' energy in their top 64 principal directions
  (1.0 = rank <= 64; d/64-fold less for isotropic rows); query_contrast_topk:
  mean over queries of (k-th largest score) / (std of all scores), the margin an
  index must resolve to return the exact top-k.
  """
  rng = np.random.default_rng(seed)
  xs = x_nd[np.sort(rng.choice(x_nd.shape[0], min(sample, x_nd.shape[0]), replace=False))]
  ev = np.linalg.svd(np.asarray(xs, np.float32), compute_uv=False) ** 2
  s_qn = np.asarray(q_qd[:200], np.float32) @ np.asarray(xs, np.float32).T
  kk = min(k, s_qn.shape[1])
  kth = -np.partition(-s_qn, kk - 1, axis=1)[:, kk - 1]
  return {"energy_top64": float(ev[:64].sum() / ev.sum()),
          "query_contrast_topk": float(np.mean(kth / s_qn.std(axis=1))),
          "rows_sampled": int(xs.shape[0]), "d": int(x_nd.shape[1])}


def workdir_stats(workdir: str, method: str = "trackstar") -> dict:
  """data_stats of a real gradient table and its queries (a finished tda.run workdir)."""
  t = tables.Table.open(os.path.join(workdir, "tables", method))
  x_nd = np.concatenate([np.asarray(s, np.float32) for _, s in t.shards])
  q_qd = fs.load_npy(os.path.join(workdir, "gradients", f"queries_final_{method}.npy"))
  return {"path": t.path, "rows": int(x_nd.shape[0]), **data_stats(x_nd, q_qd)}


def run(args) -> dict:
  """The benchmark; `args` has one attribute per flag."""
  out: dict = {"rows": args.rows, "dim": args.dim, "queries": args.queries, "k": args.k,
               "data": f"synthetic: rank-{args.rank} signal ({args.signal:.0%} of norm) "
                       "+ isotropic noise, unit-normalised; queries = row + fresh "
                       "signal + noise"}
  logging.info("# %s", out["data"])
  k = args.k

  t = time.perf_counter()
  x_nd, basis_rd, spectrum_r = synth_rows(rows=args.rows, dim=args.dim, rank=args.rank,
                                          signal=args.signal, seed=args.seed)
  q_all = synth_queries(x_nd=x_nd, basis_rd=basis_rd, spectrum_r=spectrum_r,
                        num=args.queries + args.tune_queries, seed=args.seed)
  q_qd, tune_qd = q_all[:args.queries], q_all[args.queries:]
  out["generate_s"] = time.perf_counter() - t
  out["data_stats"] = data_stats(x_nd, q_qd, k=k)
  logging.info("synthetic rows: %s", out["data_stats"])
  if args.compare_workdir:
    out["real_table_stats"] = workdir_stats(args.compare_workdir)
    logging.info("real table: %s", out["real_table_stats"])

  # Exact reference (JAX): warm up compilation on the first chunk, then time.
  index_lib.exact_search(queries_qd=q_qd, vectors_nd=x_nd[:args.chunk_rows], k=k,
                         chunk_rows=args.chunk_rows)
  t = time.perf_counter()
  ex_s, ex_i = index_lib.exact_search(queries_qd=q_qd, vectors_nd=x_nd, k=k,
                                      chunk_rows=args.chunk_rows)
  exact_s = time.perf_counter() - t
  ex_bs, ex_bi = index_lib.exact_search(queries_qd=q_qd, vectors_nd=x_nd, k=k,
                                        largest=False, chunk_rows=args.chunk_rows)
  out["exact_qps"] = args.queries / exact_s
  logging.info("exact: %.1fs, %.1f qps", exact_s, out["exact_qps"])

  params = {k_: v for k_, v in dict(
      num_leaves=args.num_leaves, num_leaves_to_search=args.num_leaves_to_search,
      dims_per_block=args.dims_per_block, aq_threshold=args.aq_threshold,
      reorder=args.reorder, training_sample_size=args.training_sample_size,
      soar_lambda=args.soar_lambda if args.soar_lambda > 0 else None).items()
            if v is not None}
  t = time.perf_counter()
  idx = index_lib.ScannIndex.build(vectors_nd=x_nd, **params)
  out["scann_build_s"] = time.perf_counter() - t
  out["scann_params"] = idx.params
  logging.info("scann build: %.1fs %s", out["scann_build_s"], idx.params)
  knobs = {}
  if args.tune_queries:
    knobs, frontier = tune(idx, tune_qd, x_nd, k, chunk_rows=args.chunk_rows,
                           target_recall=args.target_recall)
    out["tuned_on_held_out_queries"] = knobs
    out["frontier_on_tune_queries"] = {
        r: {**f, "over_exact_qps": f["qps"] / out["exact_qps"]} for r, f in frontier.items()}
    for r, f in out["frontier_on_tune_queries"].items():
      logging.info("  recall >= %s: %.1fx exact (L=%d, R=%d, recall %.4f)", r,
                   f["over_exact_qps"], f["leaves_to_search"], f["reorder"], f["recall"])
    logging.info("tuned: %s", knobs)
  idx.search(q_qd[:10], k, **knobs)  # Warm-up.
  t = time.perf_counter()
  sc_s, sc_i = idx.search(q_qd, k, **knobs)
  scann_s = time.perf_counter() - t
  sc_bs, sc_bi = idx.search(q_qd, k, largest=False, **knobs)
  out["scann_qps"] = args.queries / scann_s
  out["scann_recall_at_10"] = overlap(sc_i[:, :10], ex_i[:, :10])
  out["scann_opponent_recall_at_10"] = overlap(sc_bi[:, :10], ex_bi[:, :10])
  out["scann_over_exact_qps"] = out["scann_qps"] / out["exact_qps"]
  exact_dots = np.einsum("qkd,qd->qk", x_nd[sc_i], q_qd)
  out["scann_score_max_abs_err"] = float(np.abs(exact_dots - sc_s).max())
  out["exact_top1_mean_score"] = float(ex_s[:, 0].mean())
  out["exact_top10_mean_score"] = float(ex_s[:, -1].mean())
  logging.info("scann: %.2fs, %.1f qps, recall@10 %.4f", scann_s, out["scann_qps"],
               out["scann_recall_at_10"])
  del idx
  gc.collect()

  if not args.skip_tables:
    root = tempfile.mkdtemp(dir=args.tmpdir, prefix="bench_tables_")
    try:
      t = time.perf_counter()
      f32 = write_table(os.path.join(root, "f32"), x_nd, "float32", args.rows_per_shard)
      out["write_float32_s"] = time.perf_counter() - t
      t = time.perf_counter()
      i8 = write_table(os.path.join(root, "i8"), x_nd, "int8", args.rows_per_shard)
      out["write_int8_s"] = time.perf_counter() - t
      out["float32_table_bytes"], out["int8_table_bytes"] = f32.nbytes, i8.nbytes
      out["int8_size_ratio"] = i8.nbytes / f32.nbytes
      shutil.rmtree(f32.path)
      del x_nd
      gc.collect()
      q8_s, q8_i = index_lib.exact_search(queries_qd=q_qd, table=i8, k=k,
                                          chunk_rows=args.chunk_rows)
      out["int8_top10_overlap"] = overlap(q8_i[:, :10], ex_i[:, :10])
    finally:
      shutil.rmtree(root, ignore_errors=True)

  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.emit(as_json=_JSON.value, measure=lambda: run(flags.FLAGS), report=_report)


def _report(out) -> None:
  width = max(map(len, out))
  for key, v in out.items():
    print(f"{key:<{width}}  {v:.4g}" if isinstance(v, float) else f"{key:<{width}}  {v}")


if __name__ == "__main__":
  app.run(main)

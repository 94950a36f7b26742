"""Tests for tda.index: exact search vs numpy, ScaNN, shard merge, bad input."""

import os
import subprocess
import sys

import numpy as np
import pytest

from tda import index, tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _unit(x):
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _lowrank(n, d, seed, rank=8):
  """Clustered-ish unit rows (low rank + noise), like gradient tables."""
  rng = np.random.default_rng(seed)
  basis = rng.standard_normal((rank, d))
  return _unit(rng.standard_normal((n, rank)) @ basis + 0.3 * rng.standard_normal((n, d)))


def _table(path, x, rps, dtype="float32"):
  w = tables.TableWriter(path=path, d=x.shape[1], dtype=dtype, rows_per_shard=rps, meta={})
  w.write(x, [f"ex{i}" for i in range(len(x))])
  w.close()
  return tables.Table.open(path)


@pytest.mark.parametrize("chunk_rows", [7, 64, 10_000])
def test_exact_matches_numpy_top_and_bottom(chunk_rows):
  rng = np.random.default_rng(0)
  x = _unit(rng.standard_normal((203, 16)))
  q = _unit(rng.standard_normal((5, 16)))
  ref_qn = q @ x.T
  for largest in (True, False):
    s, i = index.exact_search(queries_qd=q, vectors_nd=x, k=6, largest=largest,
                              chunk_rows=chunk_rows)
    order = np.argsort(-ref_qn if largest else ref_qn, axis=1)[:, :6]
    np.testing.assert_array_equal(i, order)
    np.testing.assert_allclose(s, np.take_along_axis(ref_qn, order, 1), atol=1e-6)


def test_exact_k_equals_rows():
  x = _unit(np.random.default_rng(1).standard_normal((3, 8)))
  s, i = index.exact_search(queries_qd=x, vectors_nd=x, k=3, chunk_rows=2)
  assert sorted(i[0]) == [0, 1, 2] and i[0, 0] == 0 and abs(s[0, 0] - 1) < 1e-6


def test_exact_on_table_and_shard_merge(tmp_path):
  x = _lowrank(70, 12, 2)
  q = _unit(np.random.default_rng(3).standard_normal((4, 12)))
  t = _table(str(tmp_path / "t"), x, rps=16)
  s_ref, i_ref = index.exact_search(queries_qd=q, vectors_nd=x, k=9)
  s_t, i_t = index.exact_search(queries_qd=q, table=t, k=9)
  np.testing.assert_array_equal(i_t, i_ref)
  r = index.search_table(table=t, queries_qd=q, k=9, method="exact")
  np.testing.assert_array_equal(r.top_rows_qk, i_ref)
  np.testing.assert_allclose(r.top_scores_qk, s_ref, atol=1e-6)
  assert r.top_ids[1] == [f"ex{j}" for j in i_ref[1]]
  b_s, b_i = index.exact_search(queries_qd=q, vectors_nd=x, k=9, largest=False)
  np.testing.assert_array_equal(r.bottom_rows_qk, b_i)
  assert np.all(np.diff(r.bottom_scores_qk, axis=1) >= 0)  # Most negative first.
  # ScaNN on small shards is brute force: the merged result equals exact.
  r2 = index.search_table(table=t, queries_qd=q, k=9, method="scann")
  np.testing.assert_array_equal(r2.top_rows_qk, i_ref)
  np.testing.assert_array_equal(r2.bottom_rows_qk, b_i)
  np.testing.assert_allclose(r2.top_scores_qk, s_ref, atol=1e-5)


def test_scann_tree_recall_exact_scores_and_shard_merge(tmp_path):
  x = _lowrank(6000, 32, 4)
  rng = np.random.default_rng(5)
  q = _unit(x[rng.choice(6000, 20)] + 0.5 * _lowrank(20, 32, 6))
  _, i_ref = index.exact_search(queries_qd=q, vectors_nd=x, k=10)
  _, b_ref = index.exact_search(queries_qd=q, vectors_nd=x, k=10, largest=False)
  idx = index.ScannIndex.build(vectors_nd=x, num_leaves_to_search=20)
  assert idx.params["kind"] == "tree_ah" and idx.params["num_leaves"] == 77
  recall = lambda a, b: np.mean([len(set(u) & set(v)) / 10 for u, v in zip(a, b)])
  for largest, ref in ((True, i_ref), (False, b_ref)):
    s, i = idx.search(q, 10, largest=largest)
    assert recall(i, ref) >= 0.9
    # Exact reorder: returned scores are the float32 dot products.
    np.testing.assert_allclose(s, np.einsum("qkd,qd->qk", x[i], q), atol=1e-5)
  t = _table(str(tmp_path / "t"), x, rps=2500)  # Shards of 2500, 2500, 1000 rows.
  r = index.search_table(table=t, queries_qd=q, k=10, method="scann",
                         index_params={"num_leaves_to_search": 20})
  assert recall(r.top_rows_qk, i_ref) >= 0.9 and recall(r.bottom_rows_qk, b_ref) >= 0.9
  np.testing.assert_allclose(r.top_scores_qk, np.einsum("qkd,qd->qk", x[r.top_rows_qk], q),
                             atol=1e-5)


def test_bad_inputs(tmp_path):
  x = _unit(np.random.default_rng(0).standard_normal((10, 8)))
  t = _table(str(tmp_path / "t"), x, rps=4)
  with pytest.raises(ValueError, match=r"\[q, 8\]"):
    index.exact_search(queries_qd=np.ones((2, 7), np.float32), vectors_nd=x, k=2)
  with pytest.raises(ValueError, match="floating"):
    index.search_table(table=t, queries_qd=np.ones((2, 8), np.int32), k=2)
  with pytest.raises(ValueError, match="NaN"):
    index.exact_search(queries_qd=np.full((1, 8), np.nan), vectors_nd=x, k=2)
  with pytest.raises(ValueError, match=r"k must be in \[1, 10\]"):
    index.search_table(table=t, queries_qd=x[:1], k=11, method="exact")
  with pytest.raises(ValueError, match="method"):
    index.search_table(table=t, queries_qd=x[:1], k=1, method="faiss")
  idx = index.ScannIndex.build(vectors_nd=x)
  with pytest.raises(ValueError, match=r"\[q, 8\]"):
    idx.search(np.ones((1, 9), np.float32), 1)
  with pytest.raises(ValueError, match="k must be"):
    idx.search(x[:1], 11)
  # An empty table opens, but searching it is refused.
  w = tables.TableWriter(path=str(tmp_path / "e"), d=8, dtype="int8", rows_per_shard=4,
                         meta={})
  w.close()
  empty = tables.Table.open(str(tmp_path / "e"))
  assert len(empty) == 0
  for method in ("exact", "scann"):
    with pytest.raises(ValueError, match="empty"):
      index.search_table(table=empty, queries_qd=x[:1], k=1, method=method)
  with pytest.raises(ValueError, match="empty"):
    index.exact_search(queries_qd=x[:1], table=empty, k=1)


def test_scann_loads_after_tensorflow_import():
  code = ("import tensorflow, numpy as np\n"
          "from tda import index\n"
          "x = np.eye(4, dtype=np.float32)\n"
          "s, i = index.ScannIndex.build(vectors_nd=x).search(x[2:3] * 2, 1)\n"
          "print('OK', int(i[0, 0]), float(s[0, 0]))\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
  assert out.returncode == 0, out.stderr[-3000:]
  assert "OK 2 2.0" in out.stdout


def test_index_config_knobs_reach_scann():
  from tda import config as config_lib
  cfg = config_lib.base_config()
  p = index.index_params_from_config(cfg.index)
  # Unset (None) knobs are left to the row-count defaults; set ones pass through.
  assert p == {"dims_per_block": 2, "aq_threshold": 0.2, "soar_lambda": 1.0,
               "spherical": False}
  x = _lowrank(5000, 32, 7)
  q = _unit(x[:10] + 0.3 * _lowrank(10, 32, 8))
  idx = index.ScannIndex.build(vectors_nd=x, **p)
  assert idx.params["soar_lambda"] == 1.0
  assert idx.params["num_leaves_to_search"] == 8  # 10% of 71 leaves, at least 8.
  s, i = idx.search(q, 5)
  np.testing.assert_allclose(s, np.einsum("qkd,qd->qk", x[i], q), atol=1e-5)


def test_bench_retrieval_small_run(tmp_path):
  """The benchmark script end to end at toy size: every figure it promises is printed."""
  r = subprocess.run(
      [sys.executable, os.path.join(ROOT, "scripts", "bench_retrieval.py"), "--rows=6000",
       "--dim=32", "--queries=50", "--tune_queries=50", "--rows_per_shard=2048",
       f"--tmpdir={tmp_path}", "--json"],
      capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 0, r.stderr[-3000:]
  import json
  out = json.loads(r.stdout)  # Exactly one JSON object, on one line.
  for key in ("scann_recall_at_10", "scann_over_exact_qps", "scann_build_s",
              "int8_top10_overlap", "int8_size_ratio", "frontier_on_tune_queries"):
    assert key in out, key
  assert out["scann_recall_at_10"] >= 0.9
  assert out["scann_score_max_abs_err"] < 1e-5  # Exact reorder.
  # d = 32: the per-row scale and the ids weigh more than at d = 1,024 (0.25).
  assert 0.25 <= out["int8_size_ratio"] < 0.4 and out["int8_top10_overlap"] >= 0.9
  assert 0.0 < out["data_stats"]["energy_top64"] <= 1.0 + 1e-6
  assert not list(tmp_path.glob("bench_tables_*"))  # Tables removed after.

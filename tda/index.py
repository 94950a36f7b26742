"""Retrieval over unit vectors (dot = cosine): exact JAX search and ScaNN.

DESIGN.md §4 "Retrieval": ScaNN (partitioning + asymmetric hashing) with exact
float32 reordering, so returned scores are exact dot products; a chunked,
device-sharded brute force is the reference it is measured against. Shards of a
table are searched independently and their top-k merged, so a table can span hosts.
Proponents are the top-k; opponents the bottom-k (top-k of negated queries).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import math
import os
import sys
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tda import config as config_lib
from tda import fs
from tda import sharding
from tda.tables import Table, TableError
from tda.workdir import read_json, write_json

# Rows scored per step when a caller gives none: the `index.chunk_rows` config default.
DEFAULT_CHUNK_ROWS = config_lib.base_config().index.chunk_rows
_BRUTE_FORCE_BELOW = 2_048  # Fewer rows: a tree/AH index is not worth training.
INDEX_META = "tda_index.json"  # A saved index's n, d and build parameters.


def _check_queries(queries_qd, d: int) -> np.ndarray:
  q = np.asarray(queries_qd)
  if q.ndim != 2 or q.shape[1] != d:
    raise ValueError(f"queries must be [q, {d}] (table/index d = {d}), got shape {q.shape}")
  if not np.issubdtype(q.dtype, np.floating):
    raise ValueError(f"queries must be floating point, got dtype {q.dtype}")
  if not np.isfinite(q).all():
    raise ValueError("queries contain NaN or inf")
  return q.astype(np.float32, copy=False)


def _check_k(k: int, n: int, what: str):
  if n == 0:
    raise ValueError(f"{what} is empty: nothing to search")
  if not 1 <= k <= n:
    raise ValueError(f"k must be in [1, {n}] ({what} has {n} rows), got {k}")


def merge_topk(scores_a, idx_a, scores_b, idx_b, k: int):
  """Keeps the k largest of two (scores [q, *], indices [q, *]) lists (numpy)."""
  s = np.concatenate([scores_a, scores_b], axis=1)
  i = np.concatenate([idx_a, idx_b], axis=1)
  order = np.argsort(-s, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)


# --- Exact search --------------------------------------------------------------

def _mesh() -> Mesh | None:
  # This process's devices: each process searches its own shards (a table may
  # span hosts), so no search step is a cross-process collective.
  devs = jax.local_devices()
  return sharding.make_mesh(axes=((sharding.DATA, -1),), devices=devs) if len(devs) > 1 else None


@functools.partial(jax.jit, static_argnames=("k", "mesh"))
def _chunk_topk(run_s_qk, run_i_qk, q_qd, x_cd, offset, n_valid, *, k: int,
                mesh: Mesh | None):
  """Merges a row chunk's top-k into the running (scores, global rows)."""
  def local(q_qd, x_cd, base):
    # base: the first chunk-local row this device holds.
    s_qc = jnp.dot(q_qd, x_cd.T, precision=jax.lax.Precision.HIGHEST)
    col = base + jnp.arange(x_cd.shape[0], dtype=jnp.int32)
    s_qc = jnp.where(col[None, :] < n_valid, s_qc, -jnp.inf)
    kk = min(k, x_cd.shape[0])
    s, i = jax.lax.top_k(s_qc, kk)
    return s, i.astype(jnp.int32) + base

  if mesh is None:
    s, i = local(q_qd, x_cd, jnp.int32(0))
  else:
    n_dev = mesh.devices.size
    per = x_cd.shape[0] // n_dev

    # Local top-k on each device's rows; only k candidates per device move.
    def per_device(q_qd, x_cd):
      base = jax.lax.axis_index("data").astype(jnp.int32) * per
      return local(q_qd, x_cd, base)

    s, i = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data", None)),
                         out_specs=(P(None, "data"), P(None, "data")))(q_qd, x_cd)
  s = jnp.concatenate([run_s_qk, s], axis=1)
  i = jnp.concatenate([run_i_qk, i + offset], axis=1)
  s, j = jax.lax.top_k(s, k)
  return s, jnp.take_along_axis(i, j, axis=1)


def _exact_array(q_qd: np.ndarray, x_nd, k: int, chunk_rows: int, row0: int = 0):
  mesh = _mesh()
  n_dev = 1 if mesh is None else mesh.devices.size
  n = x_nd.shape[0]
  # Power-of-two chunk for small inputs: few distinct shapes, few compilations.
  c = min(chunk_rows, 1 << max(0, (n - 1).bit_length()))
  c = -(-c // n_dev) * n_dev  # Rows split evenly over devices.
  rows_sharding = None if mesh is None else NamedSharding(mesh, P("data", None))
  repl = None if mesh is None else NamedSharding(mesh, P())
  q = jax.device_put(q_qd, repl)
  run_s = jnp.full([q_qd.shape[0], k], -jnp.inf, jnp.float32)
  run_i = jnp.full([q_qd.shape[0], k], -1, jnp.int32)
  for lo in range(0, n, c):
    chunk = np.asarray(x_nd[lo:lo + c], np.float32)
    if chunk.shape[0] < c:  # Fixed shape: one compilation per (q, c, d).
      chunk = np.concatenate([chunk, np.zeros([c - chunk.shape[0], chunk.shape[1]],
                                              np.float32)])
    run_s, run_i = _chunk_topk(run_s, run_i, q, jax.device_put(chunk, rows_sharding),
                               jnp.int32(lo), jnp.int32(min(c, n - lo)), k=k, mesh=mesh)
  return np.asarray(run_s), np.asarray(run_i).astype(np.int64) + row0


def exact_search(*, queries_qd, k: int, vectors_nd=None, table: Table | None = None,
                 largest: bool = True, chunk_rows: int = DEFAULT_CHUNK_ROWS):
  """Brute-force top-k (largest) or bottom-k (not largest) dot products.

  Rows are streamed in chunks of `chunk_rows` (memory ~ q * chunk_rows floats);
  with several devices each chunk is split over a 'data' mesh axis, each device
  keeps its local top-k and only those are merged.

  Args:
    queries_qd: [q, d] float queries.
    k: neighbours per query.
    vectors_nd: [n, d] rows (numpy or any array slicable by rows); or
    table: a `Table`, searched shard by shard.
    largest: True: proponents (top-k); False: opponents (bottom-k).
    chunk_rows: rows per device step.

  Returns:
    (scores [q, k] float32 best first, rows [q, k] int64 global row indices).
    For `largest=False` scores ascend (most negative first).
  """
  if (vectors_nd is None) == (table is None):
    raise ValueError("give exactly one of vectors_nd or table")
  if chunk_rows < 1:
    raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
  sign = 1.0 if largest else -1.0
  if table is not None:
    _check_k(k, len(table), f"table {table.path}")
    q = _check_queries(queries_qd, table.d) * sign
    s_qk = np.full([q.shape[0], 0], -np.inf, np.float32)
    i_qk = np.zeros([q.shape[0], 0], np.int64)
    for info, (_, x_nd) in zip(table.shard_infos, table.shards):
      s, i = _exact_array(q, x_nd, min(k, len(x_nd)), chunk_rows, info["start_row"])
      s_qk, i_qk = merge_topk(s_qk, i_qk, s, i, k)
  else:
    x_nd = vectors_nd
    if getattr(x_nd, "ndim", 0) != 2:
      raise ValueError(f"vectors_nd must be [n, d], got shape {getattr(x_nd, 'shape', None)}")
    _check_k(k, x_nd.shape[0], "vectors_nd")
    q = _check_queries(queries_qd, x_nd.shape[1]) * sign
    s_qk, i_qk = _exact_array(q, x_nd, k, chunk_rows)
  return s_qk * sign, i_qk


# --- ScaNN ---------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _scann_ops():
  """The ScaNN pybind module, without the package's TensorFlow op library.

  The `scann` package __init__ imports TensorFlow (10-30 s) and loads a TF
  custom-op .so that, with the TF installed here, fails (undefined absl
  symbol). The pybind searcher needs neither, so unless a working `scann`
  package is already imported, we register an empty `scann` package (skipping
  its __init__) and import only `scann.scann_ops.py.scann_ops_pybind`. This
  works whether or not TensorFlow was imported earlier in the process.
  """
  pkg = sys.modules.get("scann")
  if pkg is not None and hasattr(pkg, "scann_ops_pybind"):
    return pkg.scann_ops_pybind  # A working full import happened already.
  spec = importlib.util.find_spec("scann") if pkg is None else pkg.__spec__
  if spec is None or not spec.submodule_search_locations:
    raise ImportError("scann is not installed (pip install scann)")
  for name in [m for m in sys.modules if m == "scann" or m.startswith("scann.")]:
    del sys.modules[name]  # Leftovers of a failed full import.
  pkg = types.ModuleType("scann")
  pkg.__path__ = list(spec.submodule_search_locations)
  sys.modules["scann"] = pkg
  return importlib.import_module("scann.scann_ops.py.scann_ops_pybind")


@dataclasses.dataclass
class ScannIndex:
  """A ScaNN searcher over unit rows with exact float32 reordering."""
  searcher: Any
  n: int
  d: int
  params: dict

  @classmethod
  def build(cls, *, vectors_nd: np.ndarray, num_leaves: int | None = None,
            num_leaves_to_search: int | None = None, dims_per_block: int = 2,
            aq_threshold: float = 0.2, reorder: int | None = None,
            training_sample_size: int | None = None, soar_lambda: float | None = None,
            spherical: bool = False, avq: float | None = None) -> "ScannIndex":
    """Builds a tree (k-means) + asymmetric-hashing index with exact reorder.

    Defaults from the row count n: num_leaves ~ sqrt(n), search 10% of leaves
    (at least 8 when available), training on min(n, 100k) rows, reorder 100
    candidates (raised to 10 k at search time). Below 2,048 rows the index is a
    brute-force scorer (still exact). `soar_lambda` (the config's default 1.0)
    turns on SOAR spilled assignment: each row also joins a second leaf chosen
    to be near-orthogonal in residual, which raises recall per searched leaf;
    `spherical` uses spherical k-means and `avq` anisotropic k-means for the tree.

    Measured with scripts/bench_retrieval.py (200k synthetic rows, d = 1,024,
    447 leaves, 2-dim blocks): with 2-dim blocks a reorder of 100 already gives
    the partition's recall, so the leaves searched set recall@10: 0.93 / 0.97 /
    0.983 / 0.993 at 4 / 7 / 10 / 15% of leaves with SOAR (λ = 1), 0.95 at 10%
    without. Spherical k-means, avq and training on every row each moved recall
    at 10-15% of leaves by at most 0.003.
    """
    x_nd = np.asarray(vectors_nd)
    if x_nd.ndim != 2 or x_nd.shape[0] == 0:
      raise ValueError(f"vectors_nd must be a non-empty [n, d] array, got {x_nd.shape}")
    if not np.issubdtype(x_nd.dtype, np.floating):
      raise ValueError(f"vectors_nd must be floating point, got {x_nd.dtype}")
    x_nd = x_nd.astype(np.float32, copy=False)
    n, d = x_nd.shape
    ops = _scann_ops()
    reorder = 100 if reorder is None else int(reorder)
    b = ops.builder(x_nd, 10, "dot_product")
    if n < _BRUTE_FORCE_BELOW and num_leaves is None:
      params = {"kind": "brute_force", "reorder": reorder}
      searcher = b.score_brute_force().build()
    else:
      nl = num_leaves or max(2, int(round(math.sqrt(n))))
      nl = min(nl, n)
      ns = num_leaves_to_search or min(nl, max(8, int(math.ceil(0.10 * nl))))
      ts_ = min(n, training_sample_size or 100_000)
      if not 1 <= ns <= nl:
        raise ValueError(f"num_leaves_to_search must be in [1, {nl}], got {ns}")
      params = {"kind": "tree_ah", "num_leaves": nl, "num_leaves_to_search": ns,
                "dims_per_block": dims_per_block, "aq_threshold": aq_threshold,
                "reorder": reorder, "training_sample_size": ts_,
                "soar_lambda": soar_lambda, "spherical": spherical, "avq": avq}
      searcher = (b.tree(num_leaves=nl, num_leaves_to_search=ns, training_sample_size=ts_,
                         soar_lambda=soar_lambda, spherical=spherical, avq=avq)
                  .score_ah(dims_per_block, anisotropic_quantization_threshold=aq_threshold)
                  .reorder(reorder).build())
    return cls(searcher=searcher, n=n, d=d, params=params)

  def search(self, queries_qd, k: int, *, largest: bool = True,
             leaves_to_search: int | None = None, reorder: int | None = None):
    """(scores [q, k], rows [q, k] int64): exact dot products, best first.

    largest=False gives the bottom-k (searching with negated queries).
    leaves_to_search / reorder override the build values for this call.
    """
    _check_k(k, self.n, "index")
    q = _check_queries(queries_qd, self.d)
    sign = 1.0 if largest else -1.0
    pre = max(self.params["reorder"] if reorder is None else reorder, 10 * k)
    idx, dist = self.searcher.search_batched_parallel(
        np.ascontiguousarray(q * sign), final_num_neighbors=k,
        pre_reorder_num_neighbors=pre, leaves_to_search=leaves_to_search)
    idx = np.asarray(idx).astype(np.int64)
    dist = np.asarray(dist, np.float32)
    if idx.shape != (q.shape[0], k):  # Too few candidates in the searched leaves.
      raise ValueError(f"ScaNN returned {idx.shape[1]} of {k} neighbours; search more "
                       "leaves (num_leaves_to_search)")
    return dist * sign, idx

  def save(self, path: str) -> None:
    """Serialises the searcher into folder `path` (local or gs://): ScaNN writes
    its files into a local folder, copied to `path` (`tda.fs.local_dir`); the
    description (`INDEX_META`) is written last."""
    with fs.local_dir(path, upload=True) as local:
      self.searcher.serialize(local, relative_path=True)
    write_json(os.path.join(path, INDEX_META),
               {"n": self.n, "d": self.d, "params": self.params})

  @classmethod
  def load(cls, path: str) -> "ScannIndex":
    """The index `save` wrote to `path` (copied to a local folder for ScaNN)."""
    meta_path = os.path.join(path, INDEX_META)
    if not fs.exists(meta_path):
      raise FileNotFoundError(f"{path} holds no saved index (no {INDEX_META})")
    meta = read_json(meta_path)
    with fs.local_dir(path, upload=False) as local:
      searcher = _scann_ops().load_searcher(local)
    return cls(searcher=searcher, n=meta["n"], d=meta["d"], params=meta["params"])


# --- Shard-merged search -------------------------------------------------------

@dataclasses.dataclass
class Retrieval:
  """Top-k (proponents) and bottom-k (opponents) per query, mapped to ids."""
  top_scores_qk: np.ndarray
  top_rows_qk: np.ndarray
  top_ids: list[list[str]]
  bottom_scores_qk: np.ndarray | None
  bottom_rows_qk: np.ndarray | None
  bottom_ids: list[list[str]] | None


def search_table(*, table: Table, queries_qd, k: int, method: str = "scann",
                 index_params: dict | None = None, opponents: bool = True,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Retrieval:
  """Searches each shard on its own and merges top-k (and bottom-k) across shards.

  Args:
    table: an opened table.
    queries_qd: [q, d] float queries (unit-normalised for cosine).
    k: neighbours per query.
    method: 'scann' or 'exact'.
    index_params: ScannIndex.build keywords (num_leaves, ...); per shard.
    opponents: also return the bottom-k.
    chunk_rows: exact search chunk size.
  """
  if method not in ("scann", "exact"):
    raise ValueError(f"method must be 'scann' or 'exact', got {method!r}")
  if len(table) == 0:
    raise TableError(f"table {table.path} is empty: nothing to search")
  _check_k(k, len(table), f"table {table.path}")
  q = _check_queries(queries_qd, table.d)
  empty = (np.full([q.shape[0], 0], -np.inf, np.float32), np.zeros([q.shape[0], 0], np.int64))
  top, bot = empty, empty
  ids: list[str] = []
  for info, (shard_ids, x_nd) in zip(table.shard_infos, table.shards):
    kk, row0 = min(k, len(shard_ids)), info["start_row"]
    ids.extend(shard_ids)
    if method == "exact":
      t = exact_search(queries_qd=q, vectors_nd=x_nd, k=kk, chunk_rows=chunk_rows)
      b = exact_search(queries_qd=q, vectors_nd=x_nd, k=kk, largest=False,
                       chunk_rows=chunk_rows) if opponents else None
    else:
      index = ScannIndex.build(vectors_nd=x_nd, **(index_params or {}))
      t = index.search(q, kk)
      b = index.search(q, kk, largest=False) if opponents else None
      del index
    top = merge_topk(*top, t[0], t[1] + row0, k)
    if b is not None:
      s, r = merge_topk(-bot[0], bot[1], -b[0], b[1] + row0, k)
      bot = (-s, r)
  to_ids = lambda r_qk: [[ids[j] for j in row] for row in r_qk]
  return Retrieval(top_scores_qk=top[0], top_rows_qk=top[1], top_ids=to_ids(top[1]),
                   bottom_scores_qk=bot[0] if opponents else None,
                   bottom_rows_qk=bot[1] if opponents else None,
                   bottom_ids=to_ids(bot[1]) if opponents else None)


def index_params_from_config(index_cfg) -> dict:
  """ScannIndex.build keywords from the `index` config section (None: default)."""
  keys = ("num_leaves", "num_leaves_to_search", "dims_per_block", "aq_threshold",
          "reorder", "training_sample_size", "soar_lambda", "spherical", "avq")
  out = {k: index_cfg.get(k, None) for k in keys}
  return {k: v for k, v in out.items() if v is not None}


# --- Searching a committed table (tda.query, tda.serve) -------------------------

@functools.partial(jax.jit, static_argnames=("k",))
def _top_bottom(q_qd, x_nd, valid_n, *, k: int):
  """Top-k and bottom-k (negated) dot products over the valid rows, one matmul."""
  s = jnp.dot(q_qd, x_nd.T, precision=jax.lax.Precision.HIGHEST)
  ts, ti = jax.lax.top_k(jnp.where(valid_n[None, :], s, -jnp.inf), k)
  bs, bi = jax.lax.top_k(jnp.where(valid_n[None, :], -s, -jnp.inf), k)
  return ts, ti, bs, bi


class TableSearcher:
  """One table, loaded once: exact (rows on the device, one matmul per batch) or
  ScaNN (one index per shard, exact reordering), as the run's `index.method`."""

  def __init__(self, *, table: Table, excluded: set[str], method: str,
               index_params: dict):
    if method not in ("exact", "scann"):
      raise ValueError(f"index.method must be 'exact' or 'scann', got {method!r}")
    self.method = method
    self.ids, self.x_nd = table.read_all()
    self.valid_n = np.array([i not in excluded for i in self.ids])
    self.n_valid = int(self.valid_n.sum())
    self.n_excluded = len(self.ids) - self.n_valid
    if method == "exact":
      self._x = jnp.asarray(self.x_nd)
      self._valid = jnp.asarray(self.valid_n)
    else:
      self._shards = []
      for info in table.shard_infos:
        lo, hi = info["start_row"], info["start_row"] + info["rows"]
        self._shards.append((lo, ScannIndex.build(
            vectors_nd=self.x_nd[lo:hi], **index_params)))

  def search(self, q_qd: np.ndarray, k: int):
    """(top rows [q, k], top scores, bottom rows [q, k], bottom scores), best first;
    excluded passages never returned."""
    if self.method == "exact":
      n_q = len(q_qd)  # Padded to a power of two: few compiled shapes.
      q = np.zeros((1 << max(0, (n_q - 1).bit_length()), q_qd.shape[1]), np.float32)
      q[:n_q] = q_qd
      ts, ti, bs, bi = _top_bottom(jnp.asarray(q), self._x, self._valid, k=k)
      return (np.asarray(ti)[:n_q], np.asarray(ts)[:n_q], np.asarray(bi)[:n_q],
              -np.asarray(bs)[:n_q])
    out = []
    for sign in (1.0, -1.0):
      best_s = np.full([len(q_qd), 0], -np.inf, np.float32)
      best_i = np.zeros([len(q_qd), 0], np.int64)
      for lo, ix in self._shards:
        kk = min(k + self.n_excluded, ix.n)
        s, i = ix.search(q_qd * sign, kk)
        s = np.where(self.valid_n[i + lo], s, -np.inf)
        best_s, best_i = merge_topk(best_s, best_i, s, i + lo, k)
      out += [best_i, best_s * sign]
    return tuple(out)

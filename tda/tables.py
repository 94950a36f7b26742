"""Sharded gradient tables: write once, commit atomically, resume, verify.

A table holds one d-dim vector per example (DESIGN.md §4, "Gradient tables"):

    <path>/header.json                  d, dtype, rows_per_shard, meta (first writer)
    <path>/manifest.json                written last, by process 0 (whole-file write)
    <path>/shards/<shard_id>/vectors/   one tensorstore zarr3 array [rows_per_shard, d]
    <path>/shards/<shard_id>/scale/     int8 tables only: per-row float32 scale [rows_per_shard]
    <path>/shards/<shard_id>/ids.json   row -> example id for the shard's rows
    <path>/shards/<shard_id>/COMMIT.json commit record: rows, sha256, writer, meta

Why zarr3 on tensorstore: chunked (bounded memory per read/write), compressed
(blosc-zstd with byte shuffle: float exponent bytes compress, mantissas do not),
writable by many processes at once because each shard is its own array (no shared
metadata to race on), and the same spec takes a `gcs` kvstore: `path` is a local
folder or gs://bucket/path (`tda.fs`). Nothing is renamed: a shard is written in
place under `shards/<shard_id>/` and a reader trusts it only through its
COMMIT.json, written after all of the shard's data; a writer restarting clears
its own shard folders that have none.

Reads are verified: `Table.read_shard` reads a shard's files once, checks their
sha256 and size against the manifest (naming the file that differs, from the
shard's per-file record) and decodes only then, from memory; `Table.open` refuses
missing or extra shard folders, and with `unit_norm` every row must be unit (or
zero). A write that storage refuses raises `TableWriteError` naming the shard.

Rows map to shards by global row index: shard s holds rows
[s * rows_per_shard, (s + 1) * rows_per_shard) and belongs to process
s % num_processes. Only the last shard may be partial.

Storage dtypes and their round trip (x a float32 row):
  * float32: exact.
  * bfloat16: round-to-nearest-even, |x - bf16(x)| <= 2^-8 |x| per element.
  * int8: symmetric per-row scale s = max|x| / 127, q = rint(x / s) in [-127, 127];
    |x - q * s| <= s / 2 per element (up to float32 rounding of x / s).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import socket
import time
import uuid
from typing import Callable, Iterator

import ml_dtypes
import numpy as np
import tensorstore as ts

from tda import errors
from tda import faults
from tda import fs
from tda.workdir import json_roundtrip, read_json, write_json

FORMAT_VERSION = 1
DTYPES = ("float32", "bfloat16", "int8")
MANIFEST = "manifest.json"
HEADER = "header.json"  # d, dtype, rows_per_shard, meta: written when a writer starts.
COMMIT = "COMMIT.json"
IDS = "ids.json"
# Target stored bytes per zarr chunk: large enough for throughput, small enough
# that a chunk of a d = 65,536 table stays a few rows.
_CHUNK_BYTES = 4 << 20
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "int8": 1}


class TableError(errors.UserError):
  """A table is missing, incomplete, or was written from another setup."""


class TableWriteError(TableError, OSError):
  """Storage refused a write (disk full, quota, I/O error); the shard was discarded."""


class TableCorrupted(TableError):
  """Stored bytes differ from the checksums recorded at commit time."""


def quantize_int8(x_nd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Symmetric per-row int8: returns (q_nd int8, scale_n float32), x ~ q * scale.

  |x - q * s| <= s / 2 per element, s = max|x_row| / 127 (zero rows: s = 0, q = 0).
  """
  x_nd = np.asarray(x_nd, np.float32)
  scale_n = (np.abs(x_nd).max(axis=1) / 127.0).astype(np.float32)
  safe_n = np.where(scale_n > 0, scale_n, 1.0).astype(np.float32)
  q_nd = np.clip(np.rint(x_nd / safe_n[:, None]), -127, 127).astype(np.int8)
  return q_nd, scale_n


def dequantize_int8(q_nd: np.ndarray, scale_n: np.ndarray) -> np.ndarray:
  return q_nd.astype(np.float32) * scale_n[:, None]


def _storage_dtype(dtype: str):
  return {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "int8": np.int8}[dtype]


def _array_spec(path: str, *, shape: list[int], chunk: list[int], dtype: str) -> dict:
  codecs = [{"name": "bytes"} if dtype == "int8" else
            {"name": "bytes", "configuration": {"endian": "little"}},
            {"name": "blosc", "configuration": {
                "cname": "zstd", "clevel": 1, "shuffle": "shuffle",
                "typesize": _ITEMSIZE[dtype], "blocksize": 0}}]
  return {"driver": "zarr3", "kvstore": fs.kvstore(path),
          "metadata": {"shape": shape, "data_type": dtype, "fill_value": 0,
                       "chunk_grid": {"name": "regular",
                                      "configuration": {"chunk_shape": chunk}},
                       "chunk_key_encoding": {"name": "default"},
                       "codecs": codecs}}


def _shard_id(s: int) -> str:
  return f"{s:06d}"


def _shard_files(root: str) -> dict[str, bytes]:
  """{relative path: bytes} of every file of a shard folder except its commit record."""
  return {rel: fs.read_bytes(os.path.join(root, rel))
          for rel in fs.walk_files(root) if rel != COMMIT}


def _files_digest(files: dict[str, bytes], *,
                  per_file: bool = True) -> tuple[str, int, dict[str, list]]:
  """sha256 over the files (sorted by path), their total size, and (`per_file`) each
  file's [bytes, sha256]."""
  h = hashlib.sha256()
  per = {}
  for rel in sorted(files):
    data = files[rel]
    h.update(rel.encode() + b"\0" + len(data).to_bytes(8, "little"))
    h.update(data)
    if per_file:
      per[rel] = [len(data), hashlib.sha256(data).hexdigest()]
  return h.hexdigest(), sum(len(d) for d in files.values()), per


def _dir_digest(root: str) -> tuple[str, int]:
  """sha256 over every file under `root` except the commit record, and their size."""
  digest, total, _ = _files_digest(_shard_files(root))
  return digest, total


def _header(*, d: int, dtype: str, rows_per_shard: int, meta: dict) -> dict:
  return {"format_version": FORMAT_VERSION, "d": d, "dtype": dtype,
          "rows_per_shard": rows_per_shard, "meta": json_roundtrip(meta)}


def _diff(have: dict, want: dict, keys) -> list[str]:
  return [f"{k}: stored {have.get(k, '<missing>')!r} != expected {want.get(k, '<missing>')!r}"
          for k in keys if have.get(k, "<missing>") != want.get(k, "<missing>")]


def read_commit(path: str, shard: int) -> dict | None:
  """The commit record of `shard`, or None when it is not committed."""
  p = os.path.join(path, "shards", _shard_id(shard), COMMIT)
  return read_json(p) if fs.exists(p) else None


class TableWriter:
  """Streams rows into a table's shards; each shard commits atomically.

  Rows arrive in this process's *local stream*: the rows of its own shards
  (s % num_processes == process_index) concatenated in global order. `write`
  accepts any chunk size; rows go to the shard's folder in zarr-chunk pieces, and
  a full shard is checksummed and given its commit record (written last).

  Resume: on construction the writer finds committed shards. `write` silently
  skips rows that fall into committed shards (checking their ids match), so a
  restarted job may simply re-feed everything; to avoid recomputing them, start
  at `resume_row` instead and pass it as `start_row`. This process's shard
  folders without a commit record (a killed run's) are removed.

  `chunk_rows` sets the zarr chunk (rows per stored chunk file); it is part of
  the stored bytes, so a resumed job must use the same value.

  Multi-host: every process builds a writer with its own process_index, feeds
  its shards, calls `close()`; after a barrier process 0 calls
  `finalize_table(path=..., num_shards=...)`. With num_processes == 1, `close()`
  finalizes.
  """

  def __init__(self, *, path: str, d: int, dtype: str, rows_per_shard: int,
               meta: dict, process_index: int = 0, num_processes: int = 1,
               chunk_rows: int | None = None,
               _on_event: Callable[[str, int, int], None] | None = None):
    if dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if d < 1 or rows_per_shard < 1:
      raise ValueError(f"d and rows_per_shard must be >= 1, got {d}, {rows_per_shard}")
    if not 0 <= process_index < num_processes:
      raise ValueError(f"process_index {process_index} not in [0, {num_processes})")
    self.path, self.d, self.dtype, self.rps = path, d, dtype, rows_per_shard
    self.p, self.n_proc = process_index, num_processes
    self.header = _header(d=d, dtype=dtype, rows_per_shard=rows_per_shard, meta=meta)
    # Rows per zarr chunk (and per write): ~4 MiB stored unless given.
    self.chunk_rows = min(rows_per_shard, chunk_rows or max(
        1, _CHUNK_BYTES // (d * _ITEMSIZE[dtype])))
    self._on_event = _on_event or (lambda *a: None)
    self._shards_dir = os.path.join(path, "shards")
    fs.makedirs(self._shards_dir)
    self._check_existing()
    if not fs.exists(os.path.join(path, HEADER)):
      write_json(os.path.join(path, HEADER), self.header)  # Same bytes from any process.
    self.committed: dict[int, dict] = self._scan_committed()
    self._next_local = 0      # Local-stream index of the next row `write` expects.
    self._open: dict | None = None  # The shard being written.
    self._closed = False
    self._ids_cache: tuple[int, list[str]] = (-1, [])

  # --- Layout --------------------------------------------------------------
  def _local_to_global(self, local: int) -> int:
    k, off = divmod(local, self.rps)
    return (k * self.n_proc + self.p) * self.rps + off

  def _global_to_local(self, row: int) -> int:
    s, off = divmod(row, self.rps)
    if s % self.n_proc != self.p:
      raise ValueError(f"start_row {row} is in shard {s}, which belongs to process "
                       f"{s % self.n_proc}, not {self.p}")
    return (s // self.n_proc) * self.rps + off

  @property
  def resume_row(self) -> int:
    """Global row of the first row of this process's first uncommitted shard."""
    k = 0
    while (k * self.n_proc + self.p) in self.committed:
      k += 1
    return self._local_to_global(k * self.rps)

  def _check_existing(self):
    have = [read_json(os.path.join(self.path, f)) for f in (HEADER, MANIFEST)
            if fs.exists(os.path.join(self.path, f))]
    for name in fs.listdir(self._shards_dir):
      rec = os.path.join(self._shards_dir, name, COMMIT)
      if name.isdigit() and fs.exists(rec):
        have.append(read_json(rec))
        break  # All commit records are checked again by finalize_table.
    for h in have:
      diff = _diff(h, self.header, ("format_version", "d", "dtype", "rows_per_shard"))
      keys = sorted(set(h.get("meta", {})) | set(self.header["meta"]))
      diff += _diff(h.get("meta", {}), self.header["meta"], keys)
      if diff:
        raise TableError(f"table {self.path} was written from another setup; "
                         f"refusing to mix rows ({'; '.join(diff)}). Use a new path.")

  def _scan_committed(self) -> dict[int, dict]:
    out = {}
    for name in fs.listdir(self._shards_dir):
      sid, _, tmp_suffix = name.partition(".tmp-")
      if not sid.isdigit() or int(sid) % self.n_proc != self.p:
        continue  # Another process's shard: not ours to touch.
      full = os.path.join(self._shards_dir, name)
      if tmp_suffix:  # A temp folder of an earlier version's killed run.
        fs.rmtree(full)
      elif fs.exists(os.path.join(full, COMMIT)):
        out[int(sid)] = read_json(os.path.join(full, COMMIT))
      else:  # Written by a killed run, never committed: incomplete.
        fs.rmtree(full)
    return out

  # --- Writing -------------------------------------------------------------
  def write(self, vectors_nd: np.ndarray, ids: list[str], *,
            start_row: int | None = None) -> None:
    """Appends rows to this process's stream.

    Args:
      vectors_nd: [n, d] float rows (float32 or float64; NaN/inf refused).
      ids: n example ids (str).
      start_row: global row index of the first row; None continues the stream.
        Must continue the shard being written, or start a shard (or fall into
        committed shards, which are skipped).
    """
    if self._closed:
      raise ValueError("TableWriter is closed")
    x_nd = np.asarray(vectors_nd)
    if x_nd.ndim != 2 or x_nd.shape[1] != self.d:
      raise ValueError(f"vectors must be [n, {self.d}], got shape {x_nd.shape}")
    if not np.issubdtype(x_nd.dtype, np.floating):
      raise ValueError(f"vectors must be floating point, got {x_nd.dtype}")
    if len(ids) != x_nd.shape[0]:
      raise ValueError(f"{len(ids)} ids for {x_nd.shape[0]} rows")
    if not all(isinstance(i, str) for i in ids):
      raise ValueError("ids must be str")
    if not np.isfinite(x_nd).all():
      raise ValueError("vectors contain NaN or inf")
    local = self._next_local if start_row is None else self._global_to_local(start_row)
    pos = 0
    while pos < len(ids):
      k, off = divmod(local + pos, self.rps)
      shard = k * self.n_proc + self.p
      take = min(len(ids) - pos, self.rps - off)
      with self._storage_errors(shard):
        self._write_piece(shard, off, x_nd[pos:pos + take], ids[pos:pos + take])
      pos += take
    self._next_local = local + pos

  def _write_piece(self, shard: int, off: int, x_nd: np.ndarray, ids: list[str]):
    if shard in self.committed:
      rec = self.committed[shard]
      if off + len(ids) > rec["rows"]:
        raise ValueError(f"shard {shard} was committed with {rec['rows']} rows; "
                         f"got rows up to offset {off + len(ids)}")
      if self._ids_cache[0] != shard:
        self._ids_cache = (shard, read_json(
            os.path.join(self._shards_dir, _shard_id(shard), IDS)))
      have = self._ids_cache[1]
      if have[off:off + len(ids)] != list(ids):
        raise ValueError(f"ids for committed shard {shard} differ from the stored ones "
                         "(rows fed in another order?)")
      return
    o = self._open
    if o is not None and o["shard"] != shard:
      raise ValueError(f"shard {o['shard']} is incomplete ({o['rows']} of {self.rps} "
                       f"rows) but rows for shard {shard} arrived")
    if o is None:
      if off != 0:
        raise ValueError(f"rows for shard {shard} must start at its first row; got "
                         f"offset {off} (start at writer.resume_row)")
      o = self._open = self._open_shard(shard)
    if off != o["rows"] + o["staged"]:
      raise ValueError(f"shard {shard}: expected row offset {o['rows'] + o['staged']}, "
                       f"got {off}")
    x_nd = x_nd.astype(np.float32, copy=False)
    o["ids"].extend(ids)
    o["stage"].append(x_nd)
    o["staged"] += len(ids)
    while o["staged"] >= self.chunk_rows:
      self._write_staged(o, self.chunk_rows)
    if o["rows"] + o["staged"] == self.rps:
      self._commit(o)

  def _open_shard(self, shard: int) -> dict:
    folder = os.path.join(self._shards_dir, _shard_id(shard))
    fs.rmtree(folder)  # Uncommitted: what a failed attempt left is not kept.
    fs.makedirs(folder)
    arrays = {"vectors": ts.open(_array_spec(
        os.path.join(folder, "vectors"), shape=[self.rps, self.d],
        chunk=[self.chunk_rows, self.d], dtype=self.dtype), create=True).result()}
    if self.dtype == "int8":
      arrays["scale"] = ts.open(_array_spec(
          os.path.join(folder, "scale"), shape=[self.rps], chunk=[self.rps],
          dtype="float32"), create=True).result()
    return {"shard": shard, "dir": folder, "arrays": arrays, "ids": [], "rows": 0,
            "stage": [], "staged": 0, "scale": []}

  @contextlib.contextmanager
  def _storage_errors(self, shard: int):
    """A failed write (disk full, quota, I/O error) discards the shard being written
    and raises TableWriteError naming it; committed shards are kept for a resume."""
    try:
      yield
    except (OSError, ValueError) as e:
      if isinstance(e, TableError) or not (isinstance(e, OSError) or "OS error" in str(e)
                                           or "rror writing" in str(e)):
        raise
      o, self._open, self._closed = self._open, None, True
      if o is not None:
        try:
          fs.rmtree(o["dir"])
        except OSError:
          pass  # The shard has no commit record: a rerun clears it anyway.
      raise TableWriteError(
          f"table {self.path}: writing shard {_shard_id(shard)} failed: {e}. The shard was "
          f"discarded; the {len(self.committed)} committed shard(s) are kept: free space "
          "(or fix the storage) and rerun to resume.") from e

  def _write_staged(self, o: dict, n: int):
    """Writes the first n staged rows at the shard's current row offset."""
    x_nd = np.concatenate(o["stage"]) if len(o["stage"]) > 1 else o["stage"][0]
    head, rest = x_nd[:n], x_nd[n:]
    o["stage"], o["staged"] = ([rest] if len(rest) else []), len(rest)
    lo = o["rows"]
    if self.dtype == "int8":
      q_nd, scale_n = quantize_int8(head)
      o["arrays"]["vectors"][lo:lo + n].write(q_nd).result()
      o["scale"].append(scale_n)  # One chunk per shard: written at commit.
    else:
      o["arrays"]["vectors"][lo:lo + n].write(
          head.astype(_storage_dtype(self.dtype))).result()
    o["rows"] += n
    self._on_event("chunk", o["shard"], o["rows"])

  def _commit(self, o: dict):
    if o["staged"]:
      self._write_staged(o, o["staged"])
    if self.dtype == "int8":
      scale_n = np.zeros([self.rps], np.float32)
      scale_n[:o["rows"]] = np.concatenate(o["scale"])
      o["arrays"]["scale"].write(scale_n).result()
    write_json(os.path.join(o["dir"], IDS), o["ids"])
    digest, nbytes, per_file = _files_digest(_shard_files(o["dir"]))
    s = o["shard"]
    rec = {**self.header, "shard": s, "start_row": s * self.rps, "rows": o["rows"],
           "sha256": digest, "stored_bytes": nbytes, "files": per_file,
           "process_index": self.p,
           "host": socket.gethostname(), "written_at": time.time()}
    write_json(os.path.join(o["dir"], COMMIT), rec)  # Last: the shard's commit.
    self.committed[s] = rec
    self._open = None
    self._on_event("commit", s, o["rows"])
    faults.point("tables", "shard")

  def close(self) -> None:
    """Commits the partial last shard; with one process also finalizes the table."""
    if self._closed:
      return
    if self._open is not None:
      with self._storage_errors(self._open["shard"]):
        self._commit(self._open)
    self._closed = True
    if self.n_proc == 1:
      finalize_table(path=self.path,
                     num_shards=max(self.committed, default=-1) + 1)

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *_):
    if exc_type is None:
      self.close()


def finalize_table(*, path: str, num_shards: int) -> dict:
  """Checks all shard commit records and writes the manifest (process 0 only).

  Raises:
    TableError: a shard is missing, misplaced, partial before the last, or was
      written from another setup.
  """
  if num_shards < 0:
    raise TableError(f"num_shards must be >= 0, got {num_shards}")
  recs = []
  for s in range(num_shards):
    rec = read_commit(path, s)
    if rec is None:
      raise TableError(f"table {path}: shard {s} of {num_shards} is not committed")
    recs.append(rec)
  extra = read_commit(path, num_shards)
  if extra is not None:
    raise TableError(f"table {path}: shard {num_shards} is committed beyond "
                     f"num_shards={num_shards}")
  hpath = os.path.join(path, HEADER)
  if not fs.exists(hpath):
    raise TableError(f"{path} is not a table (no {HEADER}; was a TableWriter made?)")
  head = read_json(hpath)
  for rec in recs:
    diff = _diff(rec, head, head)
    if diff:
      raise TableError(f"table {path}: shard {rec['shard']} differs from the table "
                       f"header ({'; '.join(diff)})")
  rps = head["rows_per_shard"]
  for rec in recs[:-1]:
    if rec["rows"] != rps:
      raise TableError(f"table {path}: shard {rec['shard']} has {rec['rows']} rows; only "
                       f"the last shard may be partial")
  shards = [{k: r[k] for k in ("shard", "start_row", "rows", "sha256", "stored_bytes",
                               "process_index", "host", "written_at")} for r in recs]
  manifest = {**head, "rows": sum(r["rows"] for r in recs), "num_shards": num_shards,
              "shards": shards, "ids_file": f"shards/<shard>/{IDS}",
              "created_at": time.time()}
  write_json(os.path.join(path, MANIFEST), manifest)
  return manifest


# Unit-norm rows are checked on load: |norm - 1| <= tolerance (the storage round
# trip's bound, see the module doc; int8 adds sqrt(d) * scale / 2 per row). Rows of
# zeros are the excluded (non-finite) passages and pass.
_MEMORY = ts.Context()
_NORM_TOL = {"float32": 1e-4, "bfloat16": 2.0 ** -8 + 1e-4, "int8": 1e-4}


@dataclasses.dataclass
class Table:
  """A finalized table, opened for reading.

  Every shard is checked as it is read (`read_shard`): its bytes are hashed as they
  are loaded and compared with the manifest's record, before they are decoded;
  with `unit_norm`, every row must be finite with norm 1 (within the storage
  dtype's round-trip bound) or all zeros.
  """
  path: str
  manifest: dict
  unit_norm: bool = False
  # How to recover from a bad shard (a refusal ends with it).
  advice: str = ("Delete the shard's folder and write it again with a TableWriter on "
                 "this path (only missing shards are written).")

  @classmethod
  def open(cls, path: str, *, expect: dict | None = None,
           unit_norm: bool = False, advice: str | None = None) -> "Table":
    """Opens `path`; `expect` keys are checked against meta (and d/dtype/rows_per_shard).

    Raises:
      TableError: no manifest, or fields differ from `expect` (all named).
      TableCorrupted: a shard folder is missing, or one not in the manifest exists.
    """
    man = os.path.join(path, MANIFEST)
    if not fs.exists(man):
      raise TableError(f"{path} is not a finalized table (no {MANIFEST})")
    m = read_json(man)
    if m.get("format_version") != FORMAT_VERSION:
      raise TableError(f"{path}: format_version {m.get('format_version')} != {FORMAT_VERSION}")
    if expect:
      have = {**m["meta"], **{k: m[k] for k in ("d", "dtype", "rows_per_shard")}}
      diff = _diff(have, json_roundtrip(expect), sorted(expect))
      if diff:
        raise TableError(f"table {path} does not match what was expected: {'; '.join(diff)}")
    want = {_shard_id(i["shard"]) for i in m["shards"]}
    shards_dir = os.path.join(path, "shards")
    have = set(fs.listdir(shards_dir)) if fs.isdir(shards_dir) else set()
    problems = [f"shard {n} is missing ({os.path.join(shards_dir, n)})"
                for n in sorted(want - have)]
    problems += [f"{os.path.join(shards_dir, n)} is not a shard of the manifest (extra)"
                 for n in sorted(have - want)]
    t = cls(path=path, manifest=m, unit_norm=unit_norm, **({"advice": advice} if advice else {}))
    if problems:
      raise TableCorrupted(f"table {path}: {'; '.join(problems)}. {t.advice}")
    return t

  def __len__(self) -> int:
    return self.manifest["rows"]

  @property
  def d(self) -> int:
    return self.manifest["d"]

  @property
  def dtype(self) -> str:
    return self.manifest["dtype"]

  @property
  def meta(self) -> dict:
    return self.manifest["meta"]

  @property
  def nbytes(self) -> int:
    """Stored (compressed) bytes of all shards: arrays plus id lists."""
    return sum(s["stored_bytes"] for s in self.manifest["shards"])

  @property
  def shard_infos(self) -> list[dict]:
    return self.manifest["shards"]

  def _dir(self, s: int) -> str:
    return os.path.join(self.path, "shards", _shard_id(s))

  def _load_checked(self, s: int) -> dict[str, bytes]:
    """The shard's files, read once and checked against the manifest's record."""
    info = self.manifest["shards"][s]
    where = f"table {self.path}: shard {_shard_id(s)} ({self._dir(s)})"
    advice = f". {self.advice}"
    if not fs.isdir(self._dir(s)):
      raise TableCorrupted(f"{where} is missing{advice}")
    files = _shard_files(self._dir(s))
    digest, nbytes, _ = _files_digest(files, per_file=False)  # The one pass over the bytes.
    if digest == info["sha256"] and nbytes == info["stored_bytes"]:
      return files
    per = _files_digest(files)[2]  # Only to say which file differs.
    what = []
    rec = read_commit(self.path, s) or {}
    if rec.get("sha256") == info["sha256"] and "files" in rec:
      recorded = rec["files"]
      what += [f"{f} missing" for f in sorted(set(recorded) - set(per))]
      what += [f"{f} not recorded (extra file)" for f in sorted(set(per) - set(recorded))]
      for f in sorted(set(per) & set(recorded)):
        (n, h), (n0, h0) = per[f], recorded[f]
        if n != n0:
          what.append(f"{f} has {n} bytes, {n0} recorded" + (" (truncated)" if n < n0 else ""))
        elif h != h0:
          what.append(f"{f} sha256 differs (same size: bytes changed)")
    if not what:
      what.append(f"stored {nbytes} bytes, {info['stored_bytes']} recorded" if
                  nbytes != info["stored_bytes"] else
                  f"sha256 {digest[:12]}… != recorded {info['sha256'][:12]}… (same size)")
    raise TableCorrupted(f"{where} differs from its commit record: {'; '.join(what)}{advice}")

  def read_shard(self, s: int) -> tuple[list[str], np.ndarray]:
    """(ids, float32 [rows, d]) of shard `s`, checked (see the class doc), decoded.

    Raises:
      TableCorrupted: the shard's bytes differ from the record, or (unit_norm)
        a row is non-finite or not of norm 1.
    """
    info = self.manifest["shards"][s]
    n = info["rows"]
    files = self._load_checked(s)
    ids = json.loads(files[IDS])
    arrays = {}
    # Decoded from the checked bytes in memory (one shared context: its thread pool).
    prefix = f"{uuid.uuid4().hex}/"
    kv = ts.KvStore.open({"driver": "memory", "path": prefix}, context=_MEMORY).result()
    try:
      for rel, data in files.items():
        if rel != IDS:
          kv[rel.replace(os.sep, "/")] = data
      for name in ("vectors", "scale") if self.dtype == "int8" else ("vectors",):
        arr = ts.open({"driver": "zarr3", "kvstore": {
            "driver": "memory", "path": f"{prefix}{name}/"}}, context=_MEMORY,
                      open=True, read=True).result()
        arrays[name] = arr[:n].read().result()
    finally:
      kv.delete_range(ts.KvStore.KeyRange()).result()
    if self.dtype == "int8":
      x_nd = dequantize_int8(arrays["vectors"], arrays["scale"])
    else:
      x_nd = arrays["vectors"].astype(np.float32, copy=False)
    if len(ids) != n or x_nd.shape != (n, self.d):
      raise TableCorrupted(f"table {self.path}: shard {_shard_id(s)} decodes to {len(ids)} "
                           f"ids and {x_nd.shape} vectors; {n} rows of d={self.d} recorded")
    if self.unit_norm:
      self._check_unit(s, ids, x_nd, arrays.get("scale"))
    return ids, x_nd

  def _check_unit(self, s: int, ids, x_nd, scale_n):
    norm_n = np.sqrt(np.einsum("nd,nd->n", x_nd, x_nd, dtype=np.float64))
    tol_n = np.full(len(ids), _NORM_TOL[self.dtype])
    if scale_n is not None:
      tol_n = tol_n + np.sqrt(self.d) * scale_n[:len(ids)] / 2
    zero_n = ~np.any(x_nd, axis=1)
    bad = np.flatnonzero(~zero_n & ~(np.abs(norm_n - 1) <= tol_n))  # NaN norms are bad.
    if len(bad):
      r = bad[0]
      row = self.manifest["shards"][s]["start_row"] + r
      raise TableCorrupted(
          f"table {self.path}: shard {_shard_id(s)} has {len(bad)} row(s) that should be "
          f"unit-norm but are not (first: row {row}, id {ids[r]!r}, norm "
          f"{norm_n[r]:.6g}, tolerance {tol_n[r]:.3g}). {self.advice}")

  @property
  def shards(self) -> Iterator[tuple[list[str], np.ndarray]]:
    """Iterates (ids, float32 [rows, d]) shard by shard, each checked as it is read."""
    return (self.read_shard(s) for s in range(self.manifest["num_shards"]))

  def read_all(self) -> tuple[list[str], np.ndarray]:
    """(ids, float32 [rows, d]) of the whole table (it must fit in memory)."""
    out_nd = np.empty([len(self), self.d], np.float32)
    ids: list[str] = []
    for info, (sid, x_nd) in zip(self.shard_infos, self.shards):
      out_nd[info["start_row"]:info["start_row"] + len(sid)] = x_nd
      ids.extend(sid)
    return ids, out_nd

  @property
  def ids(self) -> list[str]:
    """Every row's example id (each shard's ids checked with the shard's bytes)."""
    out: list[str] = []
    for s in range(self.manifest["num_shards"]):
      out.extend(json.loads(self._load_checked(s)[IDS]))
    return out

  def verify(self) -> None:
    """Checks every shard (bytes, and norms with unit_norm); raises TableCorrupted
    naming the bad shards and what differs."""
    bad = []
    for s in range(self.manifest["num_shards"]):
      try:
        self.read_shard(s)
      except TableCorrupted as e:
        bad.append(str(e))
    if bad:
      raise TableCorrupted("; ".join(bad))


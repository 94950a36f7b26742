"""What is read is what was written: committed artefacts checked against their records.

Records (made once, at commit):
  * a stage's `COMMITTED.json` holds `files`: {relative path: {bytes, sha256}} of
    every file in the stage's folder (`tda.workdir.commit` calls `record_files`),
    except subtrees that carry their own commit record: a table's shards, whose
    `COMMIT.json` sha256 the table's `manifest.json` (itself recorded) lists;
  * each table shard's `COMMIT.json` (`tda.tables`): sha256 and size of the shard's
    files, and each file's own size and sha256.

Checks (as artefacts are read, before anything computed from them is written):
  * `Context.stage_dir` checks an upstream stage once per run (`check_stage`):
    no recorded file missing, none added, every size as recorded, and the sha256
    of every file up to `HASH_ON_ACCESS_BYTES` (summaries, JSON outputs, ids,
    vocabularies, checkpoint metadata); larger files are hashed by their readers
    as they load them (`read_bytes`, `load_npy`) or by `python -m tda.verify`;
  * `tda.tables.Table.read_shard` hashes each shard's bytes as it loads them and
    checks unit-norm rows (`tda.tables`).
A mismatch raises `ArtefactCorrupted` naming the stage, the file and what differs.

A stage committed before records existed (no `files`) is read with a warning and
reported UNRECORDED by the command line; its tables' shards are still checked
against their manifests, which always held their sha256.

Command line: `python -m tda.verify --workdir=W [--json] [--strict]` checks every
committed stage fully (every byte of every file, every table shard, unit norms)
and prints one verdict per stage; exit status 1 if any stage FAILED (with
`--strict`, also if any is UNRECORDED or PARTIAL). `--repair` first deletes the
table shards that fail and reopens their stage (a rerun recomputes only those);
`--adopt` first records the hashes of stages committed without them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import sys
from typing import Any

import numpy as np

from tda import fs
from tda import workdir as wd

FILES = "files"  # The key of a stage commit record's file hashes.
SHARD_RECORD = "COMMIT.json"  # tda.tables.COMMIT: a subtree with its own record.
HASH_ON_ACCESS_BYTES = 16 << 20
_SKIP_TOP = (wd.MARKER, wd.STARTED)
_warned: set[str] = set()


class ArtefactCorrupted(RuntimeError):
  """A committed file differs from what its commit record says was written."""


def sha256_bytes(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _walk(root: str) -> list[str]:
  """Relative paths of the files under `root`, outside subtrees with their own record."""
  files = fs.walk_files(root)
  own = sorted({os.path.dirname(p) + "/" for p in files
                if os.path.basename(p) == SHARD_RECORD and os.path.dirname(p)})
  return [p for p in files
          if p not in _SKIP_TOP and not any(p.startswith(d) for d in own)]


def record_files(root: str) -> dict[str, dict[str, Any]]:
  """{relative path: {bytes, sha256}} of the files a stage commits (see module doc)."""
  return {rel: {"bytes": fs.getsize(os.path.join(root, rel)),
                "sha256": wd.file_sha256(os.path.join(root, rel))}
          for rel in _walk(root)}


def _split(folder: str) -> tuple[str, str]:
  # Not os.path.normpath: it would fold gs://bucket into gs:/bucket.
  folder = folder.rstrip("/") if fs.is_remote(folder) else os.path.normpath(folder)
  return os.path.dirname(folder), os.path.basename(folder)


def _record(folder: str) -> dict[str, Any] | None:
  """The stage's file records, or None (with one warning) if it was committed without."""
  workdir, stage = _split(folder)
  marker = wd.committed(workdir, stage)
  if marker is None:
    raise ArtefactCorrupted(f"stage '{stage}': {folder} has no {wd.MARKER}: not committed")
  rec = marker.get(FILES)
  if rec is None and folder not in _warned:
    _warned.add(folder)
    logging.warning("stage '%s' in %s was committed without file hashes (before they were "
                    "recorded): its files are read unchecked. To record them: python -m "
                    "tda.verify --workdir=%s --adopt (trusts the bytes as they are now), or "
                    "delete %s and rerun the stage.", stage, workdir, workdir, folder)
  return rec


def _mismatch(stage: str, rel: str, want: dict, *, size: int, digest: str | None) -> str | None:
  if size != want["bytes"]:
    return (f"stage '{stage}': {rel} has {size} bytes, {want['bytes']} recorded at commit"
            f"{' (truncated)' if size < want['bytes'] else ''}")
  if digest is not None and digest != want["sha256"]:
    return (f"stage '{stage}': {rel} sha256 {digest[:12]}… differs from the "
            f"{want['sha256'][:12]}… recorded at commit (same size: bytes changed)")
  return None


def read_bytes(folder: str, rel: str) -> bytes:
  """The bytes of `<folder>/<rel>` (a committed stage's file), checked as they are read.

  Raises:
    ArtefactCorrupted: the file is not in the stage's record, or its size or
      sha256 differs from it.
  """
  rec = _record(folder)
  data = fs.read_bytes(os.path.join(folder, rel))
  if rec is not None:
    stage = _split(folder)[1]
    want = rec.get(rel)
    if want is None:
      raise ArtefactCorrupted(f"stage '{stage}': {rel} was not committed with the stage "
                              f"(not in {wd.MARKER}); refusing to read it")
    bad = _mismatch(stage, rel, want, size=len(data), digest=sha256_bytes(data))
    if bad:
      raise ArtefactCorrupted(f"{bad}. Delete {folder} and rerun the stage.")
  return data


def read_json(folder: str, rel: str) -> Any:
  return json.loads(read_bytes(folder, rel))


class _HashingReader(io.RawIOBase):
  """A file whose bytes are hashed as they are read (once each, seeks allowed)."""

  def __init__(self, f):
    super().__init__()
    self._f, self._h, self._done = f, hashlib.sha256(), 0

  def readable(self):
    return True

  def seekable(self):
    return True

  def seek(self, offset, whence=os.SEEK_SET):
    return self._f.seek(offset, whence)

  def tell(self):
    return self._f.tell()

  def readinto(self, b):
    start = self._f.tell()
    n = self._f.readinto(b)
    if n and start + n > self._done:  # Hash only bytes not hashed yet (in order).
      if start > self._done:
        self._f.seek(self._done)
        self.readinto(memoryview(bytearray(start - self._done)))
        self._f.seek(start + n)
      skip = self._done - start
      self._h.update(memoryview(b)[max(skip, 0):n])
      self._done = start + n
    return n

  def finish(self) -> tuple[int, str]:
    """Reads (and hashes) the rest; returns (size, sha256)."""
    self._f.seek(self._done)
    while self.read(1 << 20):
      pass
    return self._done, self._h.hexdigest()


def load_npy(folder: str, rel: str) -> np.ndarray:
  """A committed `.npy`, hashed as numpy reads it (no second pass, no extra copy)."""
  rec = _record(folder)
  with fs.open(os.path.join(folder, rel), "rb") as f:
    reader = _HashingReader(f)
    x = np.load(reader, allow_pickle=False)
    size, digest = reader.finish()
  if rec is not None:
    stage = _split(folder)[1]
    if rel not in rec:
      raise ArtefactCorrupted(f"stage '{stage}': {rel} was not committed with the stage "
                              f"(not in {wd.MARKER}); refusing to read it")
    bad = _mismatch(stage, rel, rec[rel], size=size, digest=digest)
    if bad:
      raise ArtefactCorrupted(f"{bad}. Delete {folder} and rerun the stage.")
  return x


@dataclasses.dataclass
class Verdict:
  stage: str
  status: str  # ok | FAILED | UNRECORDED | PARTIAL | not committed
  detail: str
  problems: list[str] = dataclasses.field(default_factory=list)

  def line(self) -> str:
    return f"{self.stage}: {self.status}: {self.detail}"


def _check_files(folder: str, rec: dict, *, hash_limit: int | None) -> tuple[list[str], int]:
  """Problems of `folder` against its record (hash files up to `hash_limit` bytes)."""
  stage = _split(folder)[1]
  have = set(_walk(folder))
  problems = [f"stage '{stage}': {rel} is recorded at commit but missing"
              for rel in sorted(set(rec) - have)]
  problems += [f"stage '{stage}': {rel} was added after commit (not in {wd.MARKER})"
               for rel in sorted(have - set(rec))]
  hashed = 0
  for rel in sorted(have & set(rec)):
    path = os.path.join(folder, rel)
    size = fs.getsize(path)
    full = hash_limit is None or size <= hash_limit
    bad = _mismatch(stage, rel, rec[rel], size=size,
                    digest=wd.file_sha256(path) if full and size == rec[rel]["bytes"] else None)
    hashed += full
    if bad:
      problems.append(bad)
  return problems, hashed


def check_stage(workdir: str, stage: str, *, hash_limit: int | None = HASH_ON_ACCESS_BYTES) -> None:
  """Checks a committed stage's files against its record (see module doc).

  Raises:
    ArtefactCorrupted: naming every file that differs and how.
  """
  folder = wd.stage_dir(workdir, stage)
  rec = _record(folder)
  if rec is None:
    return
  problems, _ = _check_files(folder, rec, hash_limit=hash_limit)
  if problems:
    raise ArtefactCorrupted("; ".join(problems) + f". Delete {folder} and rerun the stage "
                            "(and the stages after it).")


def _table_dirs(folder: str) -> list[str]:
  from tda import tables as tables_lib
  return [n for n in fs.listdir(folder)
          if fs.exists(os.path.join(folder, n, tables_lib.MANIFEST))]


def _check_tables(folder: str) -> tuple[list[str], int, list[str]]:
  """Every shard of every table in a stage: bytes, layout and unit norms.

  Returns (problems, shards checked, folders of the shards that failed to read).
  """
  from tda import methods as methods_lib
  from tda import tables as tables_lib
  problems, n_shards, bad_dirs = [], 0, []
  workdir = _split(folder)[0]
  for name in _table_dirs(folder):
    try:
      unit = methods_lib.switches(name).unit
    except (KeyError, ValueError):
      unit = False
    advice = f"To recompute only the bad shard(s): {_repair_cmd(workdir)}."
    try:
      table = tables_lib.Table.open(os.path.join(folder, name), unit_norm=unit, advice=advice)
    except tables_lib.TableError as e:
      problems.append(str(e))
      continue
    for s in range(table.manifest["num_shards"]):
      n_shards += 1
      try:
        table.read_shard(s)
      except tables_lib.TableError as e:
        problems.append(str(e))
        bad_dirs.append(table._dir(s))  # pylint: disable=protected-access
  return problems, n_shards, bad_dirs


def _repair_cmd(workdir: str) -> str:
  return (f"python -m tda.verify --workdir={workdir} --repair (deletes them and reopens "
          "the stage), then rerun the stage")


def verify_stage(workdir: str, stage: str) -> Verdict:
  """The full check of one stage (every byte), as a verdict."""
  folder = wd.stage_dir(workdir, stage)
  try:
    marker = wd.committed(workdir, stage)
  except (OSError, ValueError) as e:
    return Verdict(stage, "FAILED", f"unreadable {wd.MARKER}: {e}", [str(e)])
  if marker is None:
    what = (f"interrupted run in {folder}" if fs.exists(os.path.join(folder, wd.STARTED))
            else "nothing written")
    return Verdict(stage, "not committed", what)
  rec = marker.get(FILES)
  problems, hashed = [], 0
  if rec is not None:
    problems, hashed = _check_files(folder, rec, hash_limit=None)
  n_tables = len(_table_dirs(folder))
  t_problems, n_shards, _ = _check_tables(folder) if n_tables else ([], 0, [])
  problems += t_problems
  shards = f"; {n_tables} table(s), {n_shards} shard(s) match their records" if n_tables else ""
  if problems:
    return Verdict(stage, "FAILED", f"{len(problems)} problem(s): " + "; ".join(problems),
                   problems)
  if rec is None:
    advice = (f"committed without file hashes (before they were recorded): to record them, "
              f"--adopt (trusts the bytes as they are now) or delete {folder} and rerun "
              f"stage '{stage}'")
    if n_tables:
      return Verdict(stage, "PARTIAL", f"{n_shards} shard(s) of {n_tables} table(s) match "
                     f"their records; its other files are unrecorded: {advice}")
    return Verdict(stage, "UNRECORDED", advice)
  return Verdict(stage, "ok", f"{hashed} file(s) match their recorded sha256{shards}")


def reopen(workdir: str, stage: str) -> str:
  """Turns a committed stage back into an interrupted one (same fingerprint), so the
  next run resumes it: a resumable stage recomputes only what is missing."""
  marker = wd.committed(workdir, stage)
  folder = wd.stage_dir(workdir, stage)
  if marker is None:
    raise ValueError(f"stage '{stage}' is not committed in {workdir}")
  # Crash-safe order: STARTED.json first (an interrupted run), then the commit goes.
  wd.write_json(os.path.join(folder, wd.STARTED), {"fingerprint": marker["fingerprint"]})
  fs.remove(os.path.join(folder, wd.MARKER))
  return folder


def repair(workdir: str) -> list[str]:
  """Deletes every table shard that fails its check and reopens its (resumable)
  stage; returns what was done. Other failures are left for the user (printed)."""
  from tda import stages as stages_lib
  done = []
  for mod in stages_lib.STAGES:
    folder = wd.stage_dir(workdir, mod.STAGE)
    if wd.committed(workdir, mod.STAGE) is None or not _table_dirs(folder):
      continue
    problems, _, bad_dirs = _check_tables(folder)
    if not problems:
      continue
    if len(bad_dirs) != len(problems) or not getattr(mod, "RESUMABLE", False):
      done.append(f"{mod.STAGE}: not repaired (not only bad shards): delete {folder} and "
                  "rerun the stage")
      continue
    for d in bad_dirs:
      fs.rmtree(d)
      done.append(f"{mod.STAGE}: deleted {d}")
    reopen(workdir, mod.STAGE)
    done.append(f"{mod.STAGE}: reopened {folder} (uncommitted): rerun stage "
                f"'{mod.STAGE}' to recompute the {len(bad_dirs)} deleted shard(s)")
  return done


def adopt(workdir: str) -> list[str]:
  """Records the file hashes of stages committed without them, trusting their bytes
  as they are now (a table's shards are checked against their manifest first)."""
  from tda import stages as stages_lib
  done = []
  for stage in stages_lib.NAMES:
    marker = wd.committed(workdir, stage)
    if marker is None or FILES in marker:
      continue
    v = verify_stage(workdir, stage)
    if v.status == "FAILED":
      done.append(f"{stage}: not adopted: {v.detail}")
      continue
    folder = wd.stage_dir(workdir, stage)
    marker[FILES] = record_files(folder)
    wd.write_json(os.path.join(folder, wd.MARKER), marker)
    done.append(f"{stage}: recorded {len(marker[FILES])} file(s) as they are now")
  return done


def verify_workdir(workdir: str) -> list[Verdict]:
  from tda import stages as stages_lib
  if not fs.isdir(workdir):
    raise FileNotFoundError(f"no workdir {workdir}")
  return [verify_stage(workdir, s) for s in stages_lib.NAMES]


def report(workdir: str, *, strict: bool = False, repair_first: bool = False,
           adopt_first: bool = False, as_json: bool = False) -> int:
  """Verifies `workdir` (after `repair` / `adopt` if asked), prints the verdicts;
  returns the exit status."""
  from tda import cli
  with cli.stdout_to_stderr(as_json):
    repairs = repair(workdir) if repair_first else []
    repairs += adopt(workdir) if adopt_first else []
    verdicts = verify_workdir(workdir)
  failed = [v.stage for v in verdicts if v.status == "FAILED"]
  weak = [v.stage for v in verdicts if v.status in ("UNRECORDED", "PARTIAL")]
  bad = failed + (weak if strict else [])
  if as_json:
    cli.print_json({"workdir": workdir, "ok": not bad, "failed": failed, "unrecorded": weak,
                    "repairs": repairs, "stages": [dataclasses.asdict(v) for v in verdicts]})
    return 1 if bad else 0
  for line in repairs:
    print(line)
  for v in verdicts:
    print(v.line())
  print(f"verify {workdir}: " + (f"FAILED ({', '.join(bad)})" if bad else "no stage failed") +
        (f"; NOT fully verified: {len(weak)} stage(s) committed without file hashes "
         f"({', '.join(weak)}): record them with --adopt or by rerunning them; --strict "
         "fails on them"
         if weak else ""))
  return 1 if bad else 0


def main(argv: list[str]) -> None:
  del argv
  sys.exit(report(_WORKDIR.value, strict=_STRICT.value, repair_first=_REPAIR.value,
                  adopt_first=_ADOPT.value, as_json=_JSON.value))


if __name__ == "__main__":
  from absl import app, flags
  from tda import cli
  _WORKDIR = flags.DEFINE_string("workdir", None, "The workdir to verify.", required=True)
  _STRICT = flags.DEFINE_bool("strict", False, "UNRECORDED and PARTIAL stages fail too.")
  _REPAIR = flags.DEFINE_bool(
      "repair", False, "First delete every table shard that fails its check and reopen "
      "its stage, so the next run recomputes only those shards.")
  _ADOPT = flags.DEFINE_bool(
      "adopt", False, "Record the file hashes of stages committed without them, trusting "
      "their bytes as they are now (tables: shards checked first).")
  _JSON = cli.define_json_flag()
  app.run(main)

"""Workdir layout and the commit protocol of every stage (driven by `tda.pipeline`).

A workdir is a local folder or `gs://bucket/path`; every file goes through
`tda.fs`. Nothing is ever renamed, so the protocol is the same on both:

  1. `begin`: the stage writes `<workdir>/<stage>/STARTED.json` (its fingerprint)
     first, then all its output in place under `<workdir>/<stage>/`.
  2. `commit`: `summary.json`, then `COMMITTED.json` (the fingerprint) last.

Readers trust a stage only through `COMMITTED.json`. A later run that finds the
stage committed with the same fingerprint skips it; one with a different
fingerprint stops with a clear error instead of overwriting (delete the folder,
or use another workdir). An uncommitted stage folder (a killed run) is cleared
and rerun, except a *resumable* stage (training, tables) with the same
fingerprint, which resumes its partial output; partial work from another setup
is refused, and so is a folder without `STARTED.json` (not written by a stage).

Workdirs from earlier versions (stages committed by renaming `<stage>.tmp/`)
read as before: the committed folders are the same. A leftover `<stage>.tmp/`
from an interrupted run of such a version is refused with a message naming it.

The writers here (`write_json`, `write_jsonl`, `write_text`) write whole files
(`tda.fs.atomic_open`), so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterator

from tda import fs

from tda import errors

MARKER = "COMMITTED.json"
STARTED = "STARTED.json"
SUMMARY = "summary.json"


class WorkdirConflict(errors.UserError, RuntimeError):
  """The workdir holds committed work computed from something else (a user error)."""


def stage_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage)


def committed(workdir: str, stage: str) -> dict[str, Any] | None:
  """The committed marker of `stage`, or None when not committed."""
  path = os.path.join(stage_dir(workdir, stage), MARKER)
  if not fs.exists(path):
    return None
  return read_json(path)


def check_fingerprint(workdir: str, stage: str, fingerprint: dict[str, Any]) -> bool:
  """True when `stage` is committed with `fingerprint`; raises on a mismatch.

  Args:
    workdir: the run's workdir.
    stage: stage folder name.
    fingerprint: JSON-able description of what the stage's output depends on.

  Returns:
    True if committed with the same fingerprint (skip the stage), False if
    nothing is committed yet.

  Raises:
    WorkdirConflict: committed with a different fingerprint.
  """
  marker = committed(workdir, stage)
  if marker is None:
    return False  # `begin` clears, resumes or refuses what an uncommitted run left.
  have = marker.get("fingerprint")
  if have != json_roundtrip(fingerprint):
    raise WorkdirConflict(
        f"stage '{stage}' in {workdir} was committed from a different setup "
        f"(differs in: {', '.join(diff_keys(have, fingerprint))}). Refusing to "
        f"overwrite it: use a new --workdir or delete {stage_dir(workdir, stage)}.")
  return True


def json_roundtrip(obj: Any) -> Any:
  """`obj` as it reads back from JSON (tuples become lists), for comparisons."""
  return json.loads(json.dumps(obj, sort_keys=True, default=str))


def diff_keys(have: dict[str, Any] | None, want: dict[str, Any]) -> list[str]:
  """Dotted paths of the leaves that differ between two fingerprints."""
  def walk(a: Any, b: Any, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
      return sum((walk(a.get(k), b.get(k), f"{prefix}{k}.")
                  for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)), [])
    return [prefix[:-1]] if a != b else []
  return walk(have or {}, json_roundtrip(want), "")


def legacy_temp_dir(workdir: str, stage: str) -> str:
  """Where earlier versions ran a stage before renaming it into place."""
  return f"{stage_dir(workdir, stage)}.tmp"


def begin(workdir: str, stage: str, fingerprint: dict[str, Any], *,
          resumable: bool) -> str:
  """Prepares and returns `<workdir>/<stage>/` for a stage about to run.

  A resumable stage's partial output from an interrupted run with the same
  fingerprint is kept (the stage resumes it). Otherwise what an interrupted run
  left is removed, all but `STARTED.json`, which is then rewritten: a kill while
  clearing leaves a folder still recognised as ours.

  Raises:
    WorkdirConflict: the stage is committed already; the folder was not started
      by a stage (no STARTED.json); (resumable) it holds partial work from a
      different setup; or an earlier version's `<stage>.tmp/` is present.
  """
  folder = stage_dir(workdir, stage)
  legacy = legacy_temp_dir(workdir, stage)
  if fs.exists(legacy):
    raise WorkdirConflict(
        f"{legacy} is the partial output of an interrupted run of an earlier tda version "
        f"(which committed by renaming it); delete it to rerun stage '{stage}'.")
  if committed(workdir, stage) is not None:
    raise WorkdirConflict(f"{folder} is committed already; refusing to overwrite it.")
  started = os.path.join(folder, STARTED)
  names = fs.listdir(folder)
  if names and STARTED not in names:
    raise WorkdirConflict(
        f"{folder} exists but was not started by this pipeline (no {STARTED}) and was "
        "never committed; it is not ours to overwrite: remove it or use another --workdir.")
  if names:
    if resumable:
      have = read_json(started).get("fingerprint")
      if have != json_roundtrip(fingerprint):
        raise WorkdirConflict(
            f"{folder} holds an interrupted '{stage}' run from a different setup (differs "
            f"in: {', '.join(diff_keys(have, fingerprint))}); refusing to overwrite it: use "
            f"a new --workdir or delete {folder}.")
      return folder
    for name in names:
      if name != STARTED:
        path = os.path.join(folder, name)
        if fs.isdir(path):
          fs.rmtree(path)
        else:
          fs.remove(path)
  fs.makedirs(folder)
  write_json(started, {"fingerprint": fingerprint})
  return folder


def commit(workdir: str, stage: str, fingerprint: dict[str, Any],
           summary: dict[str, Any]) -> str:
  """Writes the stage's summary, then its commit marker (the commit; with
  `tda.verify.record_files`: every file's size and sha256), then drops
  `STARTED.json` (a committed folder looks as it did when stages were renamed)."""
  from tda import verify  # pylint: disable=g-import-not-at-top (verify imports workdir)
  folder = stage_dir(workdir, stage)
  write_json(os.path.join(folder, SUMMARY), summary)
  # Every file's size and sha256: readers refuse what changed after this commit.
  write_json(os.path.join(folder, MARKER), {"fingerprint": fingerprint,
                                            verify.FILES: verify.record_files(folder)})
  fs.remove(os.path.join(folder, STARTED))
  return folder


def file_sha256(path: str) -> str:
  """sha256 of a file's bytes, read in 1 MiB pieces."""
  h = hashlib.sha256()
  with fs.open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def digest(obj: Any) -> str:
  """A short stable hash of a JSON-able value (for upstream stages in fingerprints)."""
  blob = json.dumps(json_roundtrip(obj), sort_keys=True).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def write_json(path: str, obj: Any) -> None:
  """Writes JSON (sorted keys, one space indent) atomically."""
  with fs.atomic_open(path) as f:
    json.dump(obj, f, indent=1, sort_keys=True, default=str)
    f.write("\n")


def write_text(path: str, text: str) -> None:
  """Writes a UTF-8 text file atomically (newlines as given)."""
  fs.write_text(path, text)


def write_jsonl(path: str, rows) -> None:
  """Writes one JSON value per line atomically."""
  with fs.atomic_open(path) as f:
    for r in rows:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")


def publish(src: str, dst: str) -> None:
  """Copies the tree `src` into `dst` (files of the same name replaced whole)."""
  fs.copy_tree(src, dst)


def read_json(path: str) -> Any:
  with fs.open(path) as f:
    return json.load(f)


def iter_jsonl(path: str) -> Iterator[tuple[int, Any]]:
  """(line number, parsed value) of each non-blank line; bad JSON names path:line."""
  with fs.open(path) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        yield lineno, json.loads(line)
      except json.JSONDecodeError as e:
        raise errors.UserError(f"{path}:{lineno}: bad JSON: {e.msg}") from e


def read_jsonl(path: str) -> list[dict[str, Any]]:
  return [row for _, row in iter_jsonl(path)]


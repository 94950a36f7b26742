"""Workdir layout and the commit protocol of every stage (driven by `tda.pipeline`).

A stage runs into `<workdir>/<stage>.tmp/`; when it finishes, the pipeline writes
its `summary.json` and a `COMMITTED.json` marker (the stage's fingerprint: what
its output was computed from) and renames the folder to `<workdir>/<stage>/`.
A later run that finds the stage committed with the same fingerprint skips it;
one with a different fingerprint stops with a clear error instead of overwriting
(delete the folder, or use another workdir). A *resumable* stage (training,
tables) keeps its partial output in the temp folder across interruptions,
guarded by `STARTED.json`: a rerun with the same fingerprint resumes it, one from
another setup is refused.

The writers here (`write_json`, `write_jsonl`, `write_text`) all write-then-rename,
so a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from typing import Any, Iterator, TextIO

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
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


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
    if os.path.exists(stage_dir(workdir, stage)):
      raise WorkdirConflict(
          f"{stage_dir(workdir, stage)} exists but was never committed (no {MARKER}); "
          "it is not ours to overwrite: remove it or use another --workdir.")
    return False
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


def temp_dir(workdir: str, stage: str) -> str:
  return f"{stage_dir(workdir, stage)}.tmp"


def begin(workdir: str, stage: str, fingerprint: dict[str, Any], *,
          resumable: bool) -> str:
  """Prepares and returns `<workdir>/<stage>.tmp` for a stage about to run.

  A resumable stage's partial output from an interrupted run with the same
  fingerprint is kept (the stage resumes it); otherwise the folder starts empty.

  Raises:
    WorkdirConflict: the stage is committed already, or (resumable) the temp
      folder holds partial work from a different setup.
  """
  final, tmp = stage_dir(workdir, stage), temp_dir(workdir, stage)
  if os.path.exists(final):
    raise WorkdirConflict(f"{final} already exists; refusing to overwrite it.")
  started = os.path.join(tmp, STARTED)
  if resumable and os.path.exists(started):
    have = read_json(started).get("fingerprint")
    if have != json_roundtrip(fingerprint):
      raise WorkdirConflict(
          f"{tmp} holds an interrupted '{stage}' run from a different setup (differs in: "
          f"{', '.join(diff_keys(have, fingerprint))}); refusing to overwrite it: use a new "
          f"--workdir or delete {tmp}.")
    return tmp
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  write_json(started, {"fingerprint": fingerprint})
  return tmp


def commit(workdir: str, stage: str, fingerprint: dict[str, Any],
           summary: dict[str, Any]) -> str:
  """Writes the summary and marker (with `tda.verify.record_files`: every file's size
  and sha256) into the temp folder and renames it into place."""
  tmp, final = temp_dir(workdir, stage), stage_dir(workdir, stage)
  from tda import verify  # pylint: disable=g-import-not-at-top (verify imports workdir)
  write_json(os.path.join(tmp, SUMMARY), summary)
  # Every file's size and sha256: readers refuse what changed after this commit.
  write_json(os.path.join(tmp, MARKER), {"fingerprint": fingerprint,
                                         verify.FILES: verify.record_files(tmp)})
  os.remove(os.path.join(tmp, STARTED))
  os.rename(tmp, final)
  return final


def file_sha256(path: str) -> str:
  """sha256 of a file's bytes, read in 1 MiB pieces."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def digest(obj: Any) -> str:
  """A short stable hash of a JSON-able value (for upstream stages in fingerprints)."""
  blob = json.dumps(json_roundtrip(obj), sort_keys=True).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


@contextlib.contextmanager
def _atomic(path: str, **open_kwargs) -> Iterator[TextIO]:
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "w", **open_kwargs) as f:
      yield f
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_json(path: str, obj: Any) -> None:
  """Writes JSON (sorted keys, one space indent) atomically."""
  with _atomic(path) as f:
    json.dump(obj, f, indent=1, sort_keys=True, default=str)
    f.write("\n")


def write_text(path: str, text: str) -> None:
  """Writes a UTF-8 text file atomically (newlines as given)."""
  with _atomic(path, encoding="utf-8", newline="") as f:
    f.write(text)


def write_jsonl(path: str, rows) -> None:
  """Writes one JSON value per line atomically."""
  with _atomic(path) as f:
    for r in rows:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")


def publish(src: str, dst: str) -> None:
  """Copies the tree `src` into `dst` (files of the same name replaced atomically)."""
  for root, _, files in os.walk(src):
    out = os.path.join(dst, os.path.relpath(root, src))
    os.makedirs(out, exist_ok=True)
    for f in files:
      tmp = os.path.join(out, f"{f}.tmp-{os.getpid()}")
      shutil.copyfile(os.path.join(root, f), tmp)
      os.replace(tmp, os.path.join(out, f))


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def iter_jsonl(path: str) -> Iterator[tuple[int, Any]]:
  """(line number, parsed value) of each non-blank line; bad JSON names path:line."""
  with open(path) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        yield lineno, json.loads(line)
      except json.JSONDecodeError as e:
        raise errors.UserError(f"{path}:{lineno}: bad JSON: {e.msg}") from e


def read_jsonl(path: str) -> list[dict[str, Any]]:
  return [row for _, row in iter_jsonl(path)]


"""Workdir layout and the write-once / commit-atomically protocol every stage uses.

A stage writes its outputs into `<workdir>/<stage>.tmp-<pid>/`, then writes a
`COMMITTED.json` marker (what it was computed from) and renames the folder to
`<workdir>/<stage>/`. A later run that finds the folder committed with the same
fingerprint skips the stage; one with a different fingerprint stops with a clear
error instead of overwriting (delete the folder, or use another workdir).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Any, Iterator

MARKER = "COMMITTED.json"


class WorkdirConflict(RuntimeError):
  """The workdir holds committed work computed from something else."""


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
  """Top-level keys whose values differ between two fingerprints."""
  have, want = have or {}, json_roundtrip(want)
  return sorted(k for k in set(want) | set(have) if have.get(k) != want.get(k))


@contextlib.contextmanager
def atomic_stage(workdir: str, stage: str, fingerprint: dict[str, Any],
                 extra: dict[str, Any] | None = None) -> Iterator[str]:
  """Yields a temp folder; on success commits it as `<workdir>/<stage>`."""
  final = stage_dir(workdir, stage)
  if os.path.exists(final):
    raise WorkdirConflict(f"{final} already exists; refusing to overwrite it.")
  tmp = f"{final}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    yield tmp
    write_json(os.path.join(tmp, MARKER),
               {"fingerprint": fingerprint, **(extra or {})})
    os.rename(tmp, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def write_json(path: str, obj: Any) -> None:
  """Writes JSON via write-then-rename so readers never see half a file."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True, default=str)
    f.write("\n")
  os.replace(tmp, path)


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def write_jsonl(path: str, rows) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    for r in rows:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  os.replace(tmp, path)


def iter_jsonl(path: str) -> Iterator[tuple[int, Any]]:
  """(line number, parsed value) of each non-blank line; bad JSON names path:line."""
  with open(path) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        yield lineno, json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: bad JSON: {e.msg}") from e


def read_jsonl(path: str) -> list[dict[str, Any]]:
  return [row for _, row in iter_jsonl(path)]


def write_text(path: str, text: str) -> None:
  """Writes a UTF-8 text file via write-then-rename (newlines kept as given)."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8", newline="") as f:
    f.write(text)
  os.replace(tmp, path)

"""The one filesystem layer of the pipeline: local paths and `gs://bucket/path` alike.

Every file the pipeline reads or writes goes through here (etils.epath), through
tensorstore (`kvstore(path)` gives the spec for a local or a gs:// path) or through
orbax (which takes gs:// paths itself). Paths stay plain strings; `os.path.join`
is pure string work and is correct for `gs://` URIs too.

Clients and their settings for `gs://`:
  * etils.epath: its fsspec backend (gcsfs). With TensorFlow installed epath would
    pick tf.io.gfile, whose GCS endpoint cannot be changed; this module sets
    `EPATH_USE_TF=false` (unless already set) so every process uses gcsfs, which
    takes Application Default Credentials (on a TPU VM: the VM's service account)
    and `STORAGE_EMULATOR_HOST` for an emulator. Its listings cache is off (below).
  * tensorstore's `gcs` kvstore: Application Default Credentials;
    `TENSORSTORE_GCS_HTTP_URL` for an emulator (and `GOOGLE_AUTH_TOKEN_FOR_TESTING`
    to skip credentials there).
  * orbax: epath for its metadata, tensorstore for arrays (both as above).

Writes are whole-file: a reader sees the old bytes or the new ones. GCS objects
are atomic by nature; local files are written to a temp name and renamed over
(one file, never a folder). Folders are never renamed: a stage commits by
writing its marker last (`tda.workdir`).
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import hashlib
import io
import os
import shutil
import tempfile
from typing import IO, Iterator

os.environ.setdefault("EPATH_USE_TF", "false")  # Before epath picks a gs:// backend.

from etils import epath  # pylint: disable=g-import-not-at-top,wrong-import-position
import fsspec  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

# gcsfs caches folder listings per process: objects written since by tensorstore,
# orbax or another process would stay invisible (`exists` false, `listdir` short).
fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)

SCHEMES = ("gs://",)


def is_remote(path: str) -> bool:
  """True for an object-store URI (gs://...)."""
  return str(path).startswith(SCHEMES)


def check_scheme(path: str) -> None:
  """Raises on a URI scheme the pipeline does not support (s3://, ...)."""
  p = str(path)
  if "://" in p and not is_remote(p):
    raise ValueError(f"unsupported path {p!r}: a workdir is a local path or "
                     f"gs://bucket/path")


def Path(path: str) -> epath.Path:  # pylint: disable=invalid-name
  return epath.Path(path)


def abspath(path: str) -> str:
  """Absolute local path; URIs unchanged."""
  return str(path) if is_remote(path) else os.path.abspath(path)


def exists(path: str) -> bool:
  return epath.Path(path).exists()


def isdir(path: str) -> bool:
  return epath.Path(path).is_dir()


def isfile(path: str) -> bool:
  p = epath.Path(path)
  return p.exists() and not p.is_dir()


def makedirs(path: str) -> None:
  """Creates `path` and its parents (on GCS: nothing to create)."""
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def listdir(path: str) -> list[str]:
  """Names in folder `path`, sorted ([] when it does not exist)."""
  p = epath.Path(path)
  if not p.is_dir():
    return []
  return sorted(c.name for c in p.iterdir())


def walk_files(root: str) -> list[str]:
  """Every file under `root`, as sorted '/'-separated paths relative to it."""
  base = epath.Path(root)
  if not base.is_dir():
    return []
  out = []
  top = str(base)
  for folder, _, files in base.walk():
    # epath's gcsfs walk yields folders without the "gs://" prefix.
    name = str(folder)
    if is_remote(top) and not is_remote(name):
      name = "gs://" + name.lstrip("/")
    rel = os.path.relpath(name, top)
    out.extend(f if rel == "." else f"{rel}/{f}" for f in files)
  return sorted(out)


def remove(path: str) -> None:
  """Removes a file if it exists."""
  p = epath.Path(path)
  if p.exists():
    p.unlink()


def rmtree(path: str) -> None:
  """Removes a folder and everything under it, if it exists."""
  p = epath.Path(path)
  if p.exists():
    p.rmtree()


def getsize(path: str) -> int:
  return epath.Path(path).stat().length


def open(path: str, mode: str = "r", **kwargs) -> IO:  # pylint: disable=redefined-builtin
  """Opens a file for reading (or for a whole write: prefer `write_*`)."""
  return epath.Path(path).open(mode, **kwargs)


def read_bytes(path: str) -> bytes:
  return epath.Path(path).read_bytes()


def read_text(path: str) -> str:
  return epath.Path(path).read_text(encoding="utf-8")


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **open_kwargs) -> Iterator[IO]:
  """A file opened for writing that appears at `path` whole, or not at all.

  Local: written to a temp name in the same folder and renamed over `path`.
  Its folder is created locally if missing (GCS has no folders to create).
  GCS: written to a local temp file and uploaded when the block succeeds (an
  object exists only once its upload finishes: a reader sees the old object or
  the new one; a failed block uploads nothing).
  """
  if is_remote(path):
    with tempfile.TemporaryDirectory(prefix="tda-") as tmp_dir:
      tmp = os.path.join(tmp_dir, "part")
      with builtins.open(tmp, mode, **open_kwargs) as f:
        yield f
      copy_file(tmp, path)
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # As on GCS.
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with builtins.open(tmp, mode, **open_kwargs) as f:
      yield f
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_bytes(path: str, data: bytes) -> None:
  with atomic_open(path, "wb") as f:
    f.write(data)


def write_text(path: str, text: str) -> None:
  """Writes UTF-8 text whole (newlines as given)."""
  with atomic_open(path, "w", encoding="utf-8", newline="") as f:
    f.write(text)


def save_npy(path: str, x) -> None:
  """`np.save` to a local or gs:// path (written whole)."""
  buf = io.BytesIO()
  np.save(buf, np.asarray(x))
  write_bytes(path, buf.getvalue())


def load_npy(path: str):
  return np.load(io.BytesIO(read_bytes(path)))


def copy_file(src: str, dst: str) -> None:
  """Copies one file (either side local or remote), replacing `dst` whole."""
  if not is_remote(src) and not is_remote(dst):
    tmp = f"{dst}.tmp-{os.getpid()}"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return
  epath.Path(src).copy(epath.Path(dst), overwrite=True)


def copy_tree(src: str, dst: str) -> None:
  """Copies every file under `src` into `dst` (files of the same name replaced)."""
  for rel in walk_files(src):
    out = os.path.join(dst, rel)
    makedirs(os.path.dirname(out))
    copy_file(os.path.join(src, rel), out)


@contextlib.contextmanager
def local_dir(path: str, *, upload: bool) -> Iterator[str]:
  """A local folder standing for `path`, for libraries that only read/write local
  files (ScaNN's serialised index): `path` itself when local; else a temp folder
  filled from `path` (when it exists) and, with `upload`, copied back on success."""
  if not is_remote(path):
    if upload:
      makedirs(path)
    yield path
    return
  with tempfile.TemporaryDirectory(prefix="tda-") as tmp:
    if exists(path):
      copy_tree(path, tmp)
    yield tmp
    if upload:
      copy_tree(tmp, path)


_LOCAL_CACHE: list[str] = []


def local_file(path: str) -> str:
  """A local path with the bytes of file `path`, for readers of local files only
  (SentencePiece): `path` itself when local, else a copy in a temp folder of this
  process (removed at exit)."""
  if not is_remote(path):
    return path
  if not _LOCAL_CACHE:
    _LOCAL_CACHE.append(tempfile.mkdtemp(prefix="tda-"))
    atexit.register(shutil.rmtree, _LOCAL_CACHE[0], ignore_errors=True)
  out = os.path.join(_LOCAL_CACHE[0], hashlib.sha256(path.encode()).hexdigest()[:16],
                     os.path.basename(path))
  if not os.path.exists(out):
    os.makedirs(os.path.dirname(out), exist_ok=True)
    copy_file(path, out)
  return out


def kvstore(path: str) -> dict:
  """Tensorstore kvstore spec of a folder: the `file` driver, or `gcs` for gs://."""
  p = str(path)
  if p.startswith("gs://"):
    bucket, _, key = p[len("gs://"):].partition("/")
    if not bucket:
      raise ValueError(f"no bucket in {p!r}")
    return {"driver": "gcs", "bucket": bucket, "path": key.rstrip("/") + "/"}
  check_scheme(p)
  return {"driver": "file", "path": os.path.abspath(p)}

"""The host allocator policy of a tda process: glibc's malloc keeps freed memory.

XLA:CPU gives each call of a compiled program its temporaries as one block from
malloc: 166 MB a call for the factored gradient kernel on the default model and
batch (32 × 128 tokens). glibc serves any block over its mmap threshold (at most
32 MiB) with a fresh `mmap` and returns it with `munmap` when it is freed, so every
call faults the whole block back in, a 4 KiB page at a time, with the kernel
zeroing each page. On the default model that was about a third of the gradient
kernel's time and a quarter of a train step's (`scripts/bench_host_settings.py`
measures it, side by side, with the page faults per call).

`retain_freed_memory` sets malloc (`mallopt`) to serve every block from the one
main heap (M_ARENA_MAX 1), never by mmap (M_MMAP_MAX 0), and to keep what is freed
(M_TRIM_THRESHOLD at its largest), so the next call reuses pages already resident.
The process's resident size then stays at its high-water mark instead of falling
back between calls.

It only helps while malloc has its one main arena: once a thread has its own
arena (jax makes 16 when its backend starts on this machine), new threads go on
using those, a large block asked for there must come from the main heap on a retry
every time, and that measured slower than glibc's default. So `tda` applies it when
the package is first imported, before jax, TensorFlow or torch start their thread
pools (importing them is fine; numpy's and jax's imports make no arena), and skips
it, saying why in `STATUS`, when other arenas exist already (`malloc_info`). It is for processes whose XLA device is the host. With an accelerator (a TPU's
`/dev/accel*` or `/dev/vfio/*`, a GPU's `/dev/nvidia*`, unless `JAX_PLATFORMS`
names `cpu` first) the temporaries live on the device, and the host's many runtime
threads are better served by glibc's per-thread arenas, so it is not applied.
`TDA_HOST_MALLOC` (the environment, read at that import) overrides: `system`
keeps glibc's defaults, `retain` applies it even with an accelerator. Other C
libraries are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys

ENV = "TDA_HOST_MALLOC"
CHOICES = ("auto", "retain", "system")
_ACCELERATORS = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*")

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

# What the import did: 'retain' (applied) or 'system: <why not>'.
STATUS = "system: not applied yet"


def _arenas(libc) -> int:
  """How many malloc arenas the process has (the `<heap nr=` entries of glibc's
  `malloc_info`); -1 if that could not be read."""
  buf, size = ctypes.c_char_p(), ctypes.c_size_t()
  libc.open_memstream.restype = ctypes.c_void_p
  fp = libc.open_memstream(ctypes.byref(buf), ctypes.byref(size))
  if not fp:
    return -1
  try:
    ok = libc.malloc_info(0, ctypes.c_void_p(fp)) == 0
  finally:
    libc.fclose(ctypes.c_void_p(fp))
  text = ctypes.string_at(buf, size.value).decode(errors="replace")
  libc.free(buf)
  return text.count("<heap nr=") if ok else -1


def _accelerator() -> str | None:
  """The first accelerator device node, unless JAX_PLATFORMS puts the CPU first."""
  platforms = os.environ.get("JAX_PLATFORMS", "").split(",")[0].strip().lower()
  if platforms == "cpu":
    return None
  for pattern in _ACCELERATORS:
    found = sorted(glob.glob(pattern))
    if found:
      return found[0]
  return None


def _glibc():
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    version = libc.gnu_get_libc_version
  except (OSError, AttributeError):
    return None  # Not glibc (musl, ...): its malloc has no such knobs.
  version.restype = ctypes.c_char_p
  return libc


def retain_freed_memory(choice: str | None = None) -> str:
  """Applies the policy once, if `choice` (default: $TDA_HOST_MALLOC, else 'auto':
  when no accelerator is present) asks for it and the process can take it; returns
  and records `STATUS`.

  Raises:
    ValueError: `choice` (or the environment variable) is not one of CHOICES.
  """
  global STATUS
  choice = choice if choice is not None else os.environ.get(ENV, "auto")
  if choice not in CHOICES:
    raise ValueError(f"{ENV} must be one of {CHOICES}, got {choice!r}")
  if STATUS == "retain":
    return STATUS
  if choice == "system":
    STATUS = f"system: {ENV}=system"
    return STATUS
  if choice == "auto":
    device = _accelerator()
    if device is not None:
      STATUS = (f"system: an accelerator is present ({device}): XLA's temporaries live "
                f"there ({ENV}=retain applies the policy anyway)")
      return STATUS
  libc = _glibc()
  if libc is None:
    STATUS = "system: not glibc"
    return STATUS
  arenas = _arenas(libc)
  if arenas != 1:
    STATUS = (f"system: malloc had {arenas} arenas already (threads had started; the "
              "policy only helps when set while there is one)")
    return STATUS
  ok = (libc.mallopt(_M_ARENA_MAX, 1) and libc.mallopt(_M_MMAP_MAX, 0)
        and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
  STATUS = "retain" if ok else "system: mallopt refused a parameter"
  return STATUS

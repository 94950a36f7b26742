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
What that costs, for every allocation of the process (numpy's and torch's too):
memory freed is never returned to the system, so the resident size stays at its
high-water mark; blocks of growing sizes can fragment the one heap (RSS above the
largest live set); `calloc`'d memory (`np.zeros`) that reuses the heap is zeroed
eagerly instead of mapped lazily; and every thread takes the one arena's lock (a
per-thread cache serves small blocks). Where transparent huge pages are always on,
glibc's default faults in 2 MiB pages and the gain is smaller. Whether it applied:
`tda.host_memory.STATUS` ('retain', or 'system: <why not>'; the benchmarks print it
as `host_malloc`).

It only helps while malloc has its one main arena: once a thread has its own
arena (jax makes 16 when its backend starts on this machine), new threads go on
using those, a large block asked for there must come from the main heap on a retry
every time, and that measured slower than glibc's default. So `tda` applies it when
the package is first imported, before jax, TensorFlow or torch start their thread
pools (importing numpy and jax makes no arena, as a test checks), and skips it,
saying why in `STATUS`, when other arenas exist already (`malloc_info`).

It is for processes whose XLA device is the host. With an accelerator device node
(`/dev/accel*`, `/dev/vfio/N`: TPUs, and other devices of those subsystems;
`/dev/nvidiaN`, `/dev/kfd`: NVIDIA and AMD GPUs), unless `JAX_PLATFORMS` names
`cpu` first, the temporaries live on the device and the host's many runtime threads
are better served by glibc's per-thread arenas, so it is not applied (a platform
chosen later with `jax.config` is not seen). It is not applied either where the
environment already tunes malloc (`MALLOC_*` variables, `glibc.malloc` tunables),
where another malloc is interposed (LD_PRELOAD jemalloc or tcmalloc), or with
another C library. `TDA_HOST_MALLOC` (read at that import) overrides the device
rule: `system` keeps glibc's defaults, `retain` applies it even with an accelerator.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
import tempfile

ENV = "TDA_HOST_MALLOC"
CHOICES = ("auto", "retain", "system")
_ACCELERATORS = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/kfd")

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

# What the import did: 'retain' (applied) or 'system: <why not>'.
STATUS = "system: not applied yet"


def _arenas(libc) -> int:
  """How many malloc arenas the process has (the `<heap nr=` entries of glibc's
  `malloc_info`, written to a temporary file); -1 if that could not be read."""
  libc.fopen.restype = ctypes.c_void_p
  libc.fopen.argtypes = (ctypes.c_char_p, ctypes.c_char_p)
  with tempfile.NamedTemporaryFile(mode="r", suffix=".xml") as f:
    fp = libc.fopen(f.name.encode(), b"w")
    if not fp:
      return -1
    try:
      ok = libc.malloc_info(0, ctypes.c_void_p(fp)) == 0
    finally:
      libc.fclose(ctypes.c_void_p(fp))
    return f.read().count("<heap nr=") if ok else -1


def _own_tuning() -> str | None:
  """The environment's own malloc settings, if any (they are left as they are)."""
  names = sorted(k for k in os.environ if k.startswith("MALLOC_"))
  if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
    names.append("GLIBC_TUNABLES")
  return ", ".join(names) or None


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
  """glibc, when it is the process's C library and its malloc is the one in use."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL("libc.so.6")
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
  except (OSError, AttributeError):
    return None  # Not glibc (musl, ...): its malloc has no such knobs.
  return libc


def _interposed(libc) -> bool:
  """Whether the malloc the process calls is not glibc's (LD_PRELOAD jemalloc, ...):
  mallopt would then tune an allocator nobody uses."""
  addr = lambda f: ctypes.cast(f, ctypes.c_void_p).value
  return addr(ctypes.CDLL(None).malloc) != addr(libc.malloc)


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
  try:
    STATUS = _apply()
  except Exception as e:  # pylint: disable=broad-except
    STATUS = f"system: could not be applied ({type(e).__name__}: {e})"
  return STATUS


def _apply() -> str:
  own = _own_tuning()
  if own:
    return f"system: the environment tunes malloc itself ({own})"
  libc = _glibc()
  if libc is None:
    return "system: not glibc"
  if _interposed(libc):
    return "system: another malloc is interposed (LD_PRELOAD)"
  arenas = _arenas(libc)
  if arenas < 0:
    return "system: malloc_info could not be read"
  if arenas != 1:
    return (f"system: malloc had {arenas} arenas already (threads had started; the "
            "policy only helps when set while there is one)")
  done = [name for name, param, value in (("M_MMAP_MAX", _M_MMAP_MAX, 0),
                                          ("M_TRIM_THRESHOLD", _M_TRIM_THRESHOLD, 2**31 - 1),
                                          ("M_ARENA_MAX", _M_ARENA_MAX, 1))
          if libc.mallopt(param, value)]
  if len(done) < 3:
    return f"system: mallopt took only {done or 'none'} of the three parameters"
  return "retain"

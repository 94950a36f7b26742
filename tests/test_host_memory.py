"""tda.host_memory: the malloc policy set at `import tda`, checked in fresh processes
(it is process-wide and must come before any thread starts)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tda import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

glibc_only = pytest.mark.skipif(host_memory._glibc() is None,
                                reason="the policy is glibc's mallopt; this C library has none")


def _python(code: str, **env) -> subprocess.CompletedProcess:
  # Without the caller's own malloc settings (they turn the policy off, by design).
  e = {k: v for k, v in os.environ.items()
       if k not in (host_memory.ENV, "GLIBC_TUNABLES", "LD_PRELOAD")
       and not k.startswith("MALLOC_")}
  e.update(env, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  # The test session's forced device count is not wanted: one device, one program.
  e["XLA_FLAGS"] = ""
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e,
                        cwd=ROOT, timeout=300)


@glibc_only
def test_import_applies_the_policy_in_a_fresh_process():
  r = _python("import tda; from tda import host_memory as h; print(h.STATUS)")
  assert r.returncode == 0, r.stderr
  assert r.stdout.strip() == "retain"


@glibc_only
def test_the_environment_opts_out_and_a_bad_value_is_refused():
  r = _python("import tda; from tda import host_memory as h; print(h.STATUS)",
              TDA_HOST_MALLOC="system")
  assert r.stdout.strip() == "system: TDA_HOST_MALLOC=system", r.stderr
  r = _python("import tda", TDA_HOST_MALLOC="always")
  assert r.returncode != 0
  assert ("TDA_HOST_MALLOC must be one of ('auto', 'retain', 'system'), got 'always'"
          in r.stderr)


@glibc_only
def test_started_threads_with_their_own_arenas_skip_the_policy_and_say_so():
  """jax's and numpy's imports make no malloc arena, so `import tda` after them still
  applies the policy; once jax's backend has started its threads it is skipped."""
  r = _python("import numpy, jax\n"
              "import tda; from tda import host_memory as h; print(h.STATUS)")
  assert r.returncode == 0, r.stderr
  assert r.stdout.strip() == "retain", r.stdout
  r = _python("import jax, jax.numpy as jnp\n"
              "jnp.ones(3).block_until_ready()\n"
              "import tda; from tda import host_memory as h; print(h.STATUS)")
  assert r.returncode == 0, r.stderr
  assert r.stdout.startswith("system: malloc had "), r.stdout
  assert "arenas already" in r.stdout


# A program whose 64 MiB temporary (a [4096, 4096] float32 product) is over glibc's
# largest mmap threshold (32 MiB): the minor page faults of 5 calls after a warm-up.
_FAULTS = """
import tda
import json, resource
import jax, jax.numpy as jnp
from tda import host_memory
x = jnp.ones((4096, 64), jnp.float32)
f = jax.jit(lambda x: jnp.sum(jnp.tanh(x @ x.T) @ x[:, :8]))
for _ in range(3):
  jax.block_until_ready(f(x))
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  jax.block_until_ready(f(x))
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 5
print(json.dumps({"status": host_memory.STATUS, "faults_per_call": faults}))
"""


def _thp_always() -> bool:
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      return "[always]" in f.read()
  except OSError:
    return False


@glibc_only
@pytest.mark.skipif(_thp_always(), reason="transparent huge pages are always on: a fresh "
                    "mapping faults in 2 MiB pages, too few to count against 4 KiB ones")
def test_retained_memory_stops_the_per_call_page_faults():
  """Under glibc's defaults each call maps its temporary afresh and faults every page
  of it in (64 MiB: 16,384 pages); with the policy the pages stay resident."""
  out = {}
  for choice in ("system", "retain"):
    r = _python(_FAULTS, TDA_HOST_MALLOC=choice)
    assert r.returncode == 0, r.stderr[-2000:]
    out[choice] = json.loads(r.stdout.strip().splitlines()[-1])
  assert out["retain"]["status"] == "retain"
  assert out["system"]["status"].startswith("system")
  assert out["system"]["faults_per_call"] > 8_000, out
  assert out["retain"]["faults_per_call"] < 0.1 * out["system"]["faults_per_call"], out


def test_an_accelerator_leaves_glibcs_defaults_unless_told(monkeypatch, tmp_path):
  """'auto' applies the policy only where XLA's device is the host: a device node of
  an accelerator (here a stand-in file matched by the patterns) turns it off, unless
  JAX_PLATFORMS puts the CPU first."""
  (tmp_path / "accel0").write_text("")
  monkeypatch.setattr(host_memory, "_ACCELERATORS", (str(tmp_path / "accel*"),))
  monkeypatch.setattr(host_memory, "STATUS", "system: not applied yet")
  monkeypatch.setenv("JAX_PLATFORMS", "")
  assert host_memory._accelerator() == str(tmp_path / "accel0")
  status = host_memory.retain_freed_memory("auto")
  assert status.startswith("system: an accelerator is present (") and "accel0" in status
  assert host_memory.STATUS == status
  monkeypatch.setenv("JAX_PLATFORMS", "cpu,tpu")
  assert host_memory._accelerator() is None
  monkeypatch.setattr(host_memory, "_ACCELERATORS", (str(tmp_path / "none*"),))
  monkeypatch.setenv("JAX_PLATFORMS", "")
  assert host_memory._accelerator() is None


@glibc_only
def test_the_environments_own_malloc_settings_are_left_alone():
  code = "import tda; from tda import host_memory as h; print(h.STATUS)"
  r = _python(code, MALLOC_ARENA_MAX="2")
  assert r.stdout.strip() == "system: the environment tunes malloc itself (MALLOC_ARENA_MAX)"
  r = _python(code, GLIBC_TUNABLES="glibc.malloc.mmap_max=0")
  assert r.stdout.strip() == "system: the environment tunes malloc itself (GLIBC_TUNABLES)"


@glibc_only
@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler for the shim")
def test_an_interposed_malloc_is_left_alone(tmp_path):
  """A malloc preloaded in front of glibc's (as jemalloc or tcmalloc would be): mallopt
  would tune an allocator nobody calls, so the import leaves it, and does not crash."""
  src = tmp_path / "shim.c"
  src.write_text(
      "#include <stddef.h>\n"
      "extern void *__libc_malloc(size_t); extern void __libc_free(void *);\n"
      "extern void *__libc_calloc(size_t, size_t);\n"
      "extern void *__libc_realloc(void *, size_t);\n"
      "void *malloc(size_t n) { return __libc_malloc(n); }\n"
      "void free(void *p) { __libc_free(p); }\n"
      "void *calloc(size_t a, size_t b) { return __libc_calloc(a, b); }\n"
      "void *realloc(void *p, size_t n) { return __libc_realloc(p, n); }\n")
  lib = tmp_path / "shim.so"
  subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(lib), str(src)], check=True)
  r = _python("import tda; from tda import host_memory as h; print(h.STATUS)",
              LD_PRELOAD=str(lib))
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.strip() == "system: another malloc is interposed (LD_PRELOAD)"


def test_retain_overrides_the_accelerator_rule(monkeypatch, tmp_path):
  """TDA_HOST_MALLOC=retain goes past the device check (in this process, whose jax
  threads have their arenas, it then stops at the arena check)."""
  (tmp_path / "accel0").write_text("")
  monkeypatch.setattr(host_memory, "_ACCELERATORS", (str(tmp_path / "accel*"),))
  monkeypatch.setattr(host_memory, "STATUS", "system: not applied yet")
  monkeypatch.setenv("JAX_PLATFORMS", "")
  status = host_memory.retain_freed_memory("retain")
  assert not status.startswith("system: an accelerator")

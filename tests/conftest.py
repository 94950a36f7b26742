"""Test set-up: 4 forced host CPU devices, so sharded code runs as on a pod slice."""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# With the `tpu` extra installed, keep every test process on the CPU backend (the
# compile-only TPU devices of tda.compile_check work regardless) and let several
# processes load libtpu at once.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


import subprocess  # noqa: E402

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def runlocal_run(tmp_path_factory):
  """One finished default run, shrunk (`trackstar_tiny.py:runlocal`), built once per
  test session and shared (read-only) by the pipeline, query and serve tests."""
  w = str(tmp_path_factory.mktemp("runlocal"))
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  p = subprocess.run([sys.executable, "-m", "tda.run",
                      "--config=configs/trackstar_tiny.py:runlocal", f"--workdir={w}"],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  if p.returncode != 0:
    raise AssertionError(f"tda.run failed:\n{p.stderr[-4000:]}")
  return w

"""Test set-up: 4 forced host CPU devices, so sharded code runs as on a pod slice;
the session's one shared `:runlocal` run (and a query engine over it)."""

import os
import subprocess
import sys

import pytest

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# With the `tpu` extra installed, keep every test process on the CPU backend (the
# compile-only TPU devices of tda.compile_check work regardless) and let several
# processes load libtpu at once.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


@pytest.fixture(scope="session")
def runlocal_engine(runlocal_run):
  """`tda.query.Engine` over `runlocal_run`, loaded once per session."""
  from tda import query as query_lib
  return query_lib.engine_from_flags(runlocal_run)

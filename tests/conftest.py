"""Test set-up: 4 forced host CPU devices, so sharded code runs as on a pod slice;
the session's one shared `:runlocal` run (and a query engine over it)."""

import os
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
# Before any test starts jax's backend (its threads): the session process takes
# tda's host allocator policy too (tda.host_memory).
import tda  # noqa: E402,F401  pylint: disable=g-import-not-at-top,unused-import


@pytest.fixture(scope="session")
def default_run(tmp_path_factory):
  """One default pipeline run (`trackstar_tiny.py:runlocal`), shared by the end-to-end
  tests; they read it, copy it, or rerun it without changing committed stages."""
  from tests.helpers import run_tda
  # Inner loop only: TDA_TEST_DEFAULT_RUN names a finished run of the current code's
  # `:runlocal` to reuse instead of computing one (CI never sets it).
  reuse = os.environ.get("TDA_TEST_DEFAULT_RUN")
  w = reuse or str(tmp_path_factory.mktemp("default"))
  run_tda(w)  # On a reused, finished run every stage is verified and skipped.
  return w


@pytest.fixture(scope="session")
def runlocal_engine(default_run):
  """`tda.query.Engine` over `default_run`, loaded once per session."""
  from tda import query as query_lib
  return query_lib.engine_from_flags(default_run)


# Debian's chromium driven by Playwright (never a downloaded browser): the viewer and
# serve tests' browser, skipped with the reason when either is missing.
CHROMIUM = os.environ.get("TDA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def browser():
  try:
    from playwright.sync_api import sync_playwright  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    pytest.skip(f"playwright not installed ({e}); pip install playwright==1.64.1")
  if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} missing; apt-get install -y chromium chromium-driver")
  with sync_playwright() as p:
    b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    yield b
    b.close()

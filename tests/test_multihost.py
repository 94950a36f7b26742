"""Two processes on localhost (CPU collectives) write the same tables and retrieve
the same proponents as one process."""

import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from tda import tables as tables_lib
from tda import workdir as wd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/trackstar_tiny.py:runlocal"
# Small shards so both processes own several; methods that need both variants.
OVERRIDES = ["--config.tables.rows_per_shard=16",
             "--config.eval.methods=('exp2','trackstar','bm25')"]


# Three pipeline subprocesses (one of them two processes): minutes.
pytestmark = pytest.mark.slow


def _env(**extra):
  return {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", **extra}


def _run(workdir, stages, **env):
  return subprocess.Popen([sys.executable, "-m", "tda.run", f"--config={CONFIG}",
                           f"--workdir={workdir}", f"--config.stages={stages}", *OVERRIDES],
                          cwd=ROOT, env=_env(**env), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _wait(p):
  out, _ = p.communicate(timeout=900)
  assert p.returncode == 0, out[-4000:]


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  _wait(_run(one, "world,vocab,train,model_eval"))
  shutil.copytree(one, two)
  stages = "gradients,tables,retrieval"
  _wait(_run(one, stages))
  port = _free_port()
  procs = [_run(two, stages, TDA_COORDINATOR=f"localhost:{port}", TDA_NUM_PROCESSES="2",
                TDA_PROCESS_ID=str(i)) for i in range(2)]
  for p in procs:
    _wait(p)
  for name in ("exp2", "trackstar"):
    t1 = tables_lib.Table.open(os.path.join(one, "tables", name))
    t2 = tables_lib.Table.open(os.path.join(two, "tables", name))
    writers = {info["process_index"] for info in t2.shard_infos}
    assert len(t2.shard_infos) >= 4 and writers == {0, 1}, t2.shard_infos
    ids1, x1 = t1.read_all()
    ids2, x2 = t2.read_all()
    assert ids1 == ids2
    # TrackStar's R_train is summed over the processes' shares of the sample (another
    # float order), and R^{-1/2} amplifies that: its vectors agree to ~6e-5 (cosine
    # > 0.99999); exp2 uses no R and agrees to float32 rounding.
    np.testing.assert_allclose(x2, x1, rtol=1e-5, atol=1e-6 if name == "exp2" else 2e-4)
    cos = np.einsum("nd,nd->n", x1, x2) / (np.linalg.norm(x1, axis=1) *
                                           np.linalg.norm(x2, axis=1) + 1e-30)
    assert cos[np.linalg.norm(x1, axis=1) > 0].min() > 0.99999
    t2.verify()
  for m in ("exp2", "trackstar", "bm25"):
    r1 = wd.read_json(os.path.join(one, "retrieval", f"{m}.json"))
    r2 = wd.read_json(os.path.join(two, "retrieval", f"{m}.json"))
    assert r1["top_ids"] == r2["top_ids"] and r1["bottom_ids"] == r2["bottom_ids"]
  s2 = wd.read_json(os.path.join(two, "gradients", "summary.json"))
  assert s2["processes"] == 2


@pytest.mark.parametrize("axes", ["r_mesh", "data=4,model=1"])
def test_r_train_is_summed_on_the_global_mesh(tmp_path, axes):
  """Two processes of two devices each add their own rows into one R sharded over all
  four devices: every process gets the same R, the sum over both processes' rows
  within `hessian.r_error_bound`."""
  from tda import hessian
  from tests import multihost_r_worker as worker
  port = _free_port()
  procs = []
  for i in range(2):
    env = _env(TDA_COORDINATOR=f"localhost:{port}", TDA_NUM_PROCESSES="2",
               TDA_PROCESS_ID=str(i), XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=ROOT)
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "tests.multihost_r_worker", str(tmp_path / f"{i}.npz"), axes],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  for p in procs:
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-4000:]
  got = [np.load(tmp_path / f"{i}.npz") for i in range(2)]
  assert all(int(g["devices"]) == 4 for g in got)
  if axes == "r_mesh":  # The run's R mesh: each process's 2 devices one MODEL row.
    assert str(got[0]["mesh"]) == str({"data": 2, "model": 2})
  assert all("spans several processes" in str(g["refused"]) for g in got)
  assert np.array_equal(got[0]["r"], got[1]["r"])  # One R, copied to every host.
  x = np.concatenate([worker.rows(0), worker.rows(1)]).astype(np.float64)
  ref = x.T @ x
  assert int(got[0]["n"]) == len(x) == 471
  # 128 rows a step (64 from each process), ⌈301 / 64⌉ = 5 steps.
  bound = hessian.r_error_bound(r_dd=ref, n=len(x), chunk=2 * 64, steps=5)
  err = np.abs(got[0]["r"] - ref)
  assert (err <= bound).all(), (err / bound).max()
  # Both processes' rows are in it: leaving either out is far outside the bound.
  for p in range(2):
    xp = worker.rows(p).astype(np.float64)
    assert (np.abs(got[0]["r"] - (ref - xp.T @ xp)) > bound).any()


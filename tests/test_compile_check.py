"""tda.compile_check: compile-only TPU devices (with the .[tpu] extra), CPU fallback."""

import json
import os
import subprocess
import sys

# Before any backend starts: libtpu must not probe GCE metadata or insist on the
# machine-wide lockfile another JAX process (with libtpu installed) may hold.
for _k, _v in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
               ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
  os.environ.setdefault(_k, _v)

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import trackstar_8b
from tda import compile_check as cc
from tda import sharding
from tda import topology

GIB = 1 << 30
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _small_config(mesh_axes=(("data", -1), ("model", 1))):
  c = trackstar_8b.get_config("runlocal")
  c.index.chunk_rows = 1024  # Keeps the scoring compile to a second.
  c.mesh.axes = mesh_axes
  return c


needs_libtpu = pytest.mark.skipif(
    cc.libtpu_version() is None,
    reason="libtpu not installed (pip install -e '.[tpu]'); compile-only TPU checks skipped")


# --- Without TPU -------------------------------------------------------------------

def test_topology_catalogue_counts_chips_and_names_cloud_slices():
  v5e = topology.get("v5e-256")
  assert (v5e.topology_name, v5e.chips, v5e.hbm_gib) == ("v5e:16x16", 256, 16.0)
  v4 = topology.get("v4-128")  # Cloud counts v4 TensorCores, two per chip.
  assert (v4.topology_name, v4.chips, v4.accelerator_type) == ("v4:4x4x4", 64, "v4-128")
  assert all(t.chips * 2 == int(name.split("-")[1]) for name, t in topology.TOPOLOGIES.items()
             if not name.startswith("v5e"))


def test_per_process_programs_compile_on_a_one_host_slice():
  assert topology.host_slice("v5e-256") == "v5e-4"
  assert topology.host_slice("v5e-8") == "v5e-8"  # One 8-chip host.
  assert topology.host_slice("v4-128") == "v4-8"
  assert topology.host_slice("v5p-512") == "v5p-8"


def test_unknown_topology_lists_known_ones():
  with pytest.raises(ValueError, match=r"unknown topology 'v9-1'.*v5e-256.*v4-8.*v5p-8"):
    cc.check(config=_small_config(), topology_name="v9-1", steps=("r_step",))


def test_mesh_not_dividing_devices_is_a_clear_error():
  n = len(jax.devices("cpu"))
  with pytest.raises(ValueError, match=f"does not divide the {n} available devices"):
    cc.check(config=_small_config((("data", -1), ("model", 3))), topology_name="cpu",
             steps=("r_step",))


def test_unknown_step_or_nonpositive_batch_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown steps"):
    cc.check(config=_small_config(), topology_name="cpu", steps=("train",))
  with pytest.raises(ValueError, match="batch_per_chip must be > 0"):
    cc.check(config=_small_config(), topology_name="cpu", batch_per_chip=0)


def test_cpu_fallback_mesh_shapes_and_argument_bytes():
  """Forced host devices: the config's mesh and exact per-device argument sizes."""
  n = len(jax.devices("cpu"))
  model = 2 if n % 2 == 0 else 1
  rep = cc.check(config=_small_config((("data", -1), ("model", model))),
                 topology_name="cpu", batch_per_chip=2, queries=8, r_batch=6,
                 steps=("r_step", "scoring"))  # The kernel compiles in the TPU test.
  assert rep["mesh"] == {"data": n // model, "model": model}
  assert rep["hbm_gib"] is None
  r = rep["steps"]["r_step"]
  d = r["d"]
  assert d == 2 * 4 * 8 * 8  # 2 layers x 4 groups, one 8 x 8 block each.
  # R's own mesh (`sharding.r_mesh`): one process's n devices are one MODEL row.
  assert r["r_mesh"] == {"data": 1, "model": n}
  assert r["rows"] == 6  # Rounded up to the DATA axis (1).
  # R [d, d] f32 split over data x model, plus φ [B, d] f32 rows split over data.
  expect = 4 * d * d // n + 4 * r["rows"] * d
  assert r["memory_bytes"]["argument"] == expect
  assert r["memory_bytes"]["output"] == 4 * d * d // n
  assert r["function"] == "tda.hessian.r_accumulate"
  e = rep["eigh_plan"]  # The eigendecomposition's plan: R's tile per chip, host eigh.
  assert e["d"] == d and e["r_bytes_per_chip"] == 4 * d * d // n
  assert e["eigh_bytes_per_chip"] == 0 and e["eigh_host_bytes_peak"] == 3 * 8 * d * d
  # R's copy to the hosts: the run's own row-slice step, one DATA shard of rows
  # (here all d rows) replicated on each device.
  t = r["to_host"]
  assert t["function"] == "tda.hessian.rows_replicated" and t["fits"]
  assert t["memory_bytes"]["output"] == 4 * d * d
  # The scoring chunk is split over every device; queries are replicated.
  s = rep["steps"]["scoring"]
  assert s["chunk_rows"] % n == 0
  assert s["memory_bytes"]["argument"] >= 4 * (s["chunk_rows"] // n) * d + 4 * 8 * d
  assert s["flops"] >= 2 * 8 * (s["chunk_rows"] // n) * d


def test_search_largest_doubles_then_bisects():
  best, trials = cc.search_largest(fits=lambda n: n <= 37, start=4)
  assert best == 37
  assert [n for n, _ in trials[:5]] == [4, 8, 16, 32, 64]
  assert [n for n, _ in trials[5:]] == [48, 40, 36, 38, 37]
  assert cc.search_largest(fits=lambda n: False, start=4)[0] == 0
  assert cc.search_largest(fits=lambda n: True, start=3, limit=20)[0] == 20


def test_search_largest_follows_a_good_guess_and_survives_a_bad_one():
  fits = lambda n: n <= 37
  best, trials = cc.search_largest(fits=fits, start=4,
                                   guess=lambda lo, hi: 37 if lo < 37 else 38)
  assert best == 37 and [n for n, _ in trials] == [4, 37, 38]
  # A guess outside (lo, hi) is ignored: plain doubling / bisection.
  best, trials = cc.search_largest(fits=fits, start=4, guess=lambda lo, hi: lo)
  assert best == 37 and len(trials) == 10


# --- Compile-only TPU devices (needs libtpu) ----------------------------------------

@pytest.mark.slow  # Compiles the gradient kernel for a TPU slice.
@needs_libtpu
def test_v5e_2x2_compiles_small_model_within_hbm():
  rep = cc.check(config=_small_config(), topology_name="v5e-4", batch_per_chip=2,
                 queries=16)
  assert rep["device_kind"].startswith("TPU v5")
  assert rep["chips"] == 4 and rep["mesh"] == {"data": 4, "model": 1}
  assert rep["libtpu"] == cc.libtpu_version()
  q = rep["steps"]["queries"]  # Query batches: one 32-token bucket, head on 8 rows.
  assert q["seq_len"] == 32 and q["loss_rows"] == 8
  assert q["flops"] < rep["steps"]["gradients"]["flops"]
  for name in ("gradients", "queries", "r_step", "scoring"):
    s = rep["steps"][name]
    assert s["fits"], name
    assert 0 < s["total_bytes"] < 16 * GIB, name
    assert s["memory_bytes"]["argument"] > 0, name
    assert s["flops"] > 0, name
  # The default backend stays CPU: compile-only devices do not replace it.
  assert jax.default_backend() == "cpu"


@needs_libtpu
def test_oom_is_a_does_not_fit_result():
  devices = cc.topology_devices(name="v5e-4")
  mesh = sharding.make_mesh(axes=(("data", -1), ("model", 1)), devices=devices)
  big = jax.ShapeDtypeStruct((1 << 17, 1 << 17), jnp.float32,
                             sharding=NamedSharding(mesh, P()))  # 64 GiB replicated.
  lowered = jax.jit(lambda x: x * 2).lower(big)
  rep = cc.compile_report(lowered, hbm_bytes=16 * GIB)
  assert rep["fits"] is False
  assert "HBM" in rep["error"] or "RESOURCE_EXHAUSTED" in rep["error"]
  assert rep["hbm_available_bytes"] == 15.75 * GIB  # v5e: what XLA may use of 16 GiB.


def test_hbm_limit_parsed_from_both_oom_message_forms():
  v4 = ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent error. "
        "Ran out of memory in memory space hbm. Used 31.04G of 30.75G hbm. Exceeded hbm "
        "capacity by 305.55M.")
  assert cc.hbm_limit_from_error(v4) == 30.75 * GIB
  assert cc.hbm_limit_from_error("... exceeds the available HBM (15.75G) ...") == 15.75 * GIB
  assert cc.hbm_limit_from_error("RESOURCE_EXHAUSTED: something else") is None


@needs_libtpu
def test_model_axis_wider_than_a_host_is_a_clear_error():
  # Every process featurises on its own host's chips: a MODEL axis of 16 cannot be
  # laid over a v5e host's 4 chips, on any slice.
  c = trackstar_8b.get_config()
  c.mesh.axes = (("data", -1), ("model", 16))
  with pytest.raises(ValueError, match="does not divide the 4 available devices"):
    cc.check(config=c, topology_name="v5e-256", steps=("r_step",))


@pytest.mark.slow  # A subprocess that compiles.
def test_cli_json_prints_the_report_on_one_line_and_writes_output(tmp_path):
  out_path = tmp_path / "R.json"
  out = subprocess.run(
      [sys.executable, "-m", "tda.compile_check", "--config=configs/trackstar_8b.py:runlocal",
       "--topology=cpu", "--steps=r_step", "--r_batch=8", "--json", f"--output={out_path}"],
      cwd=ROOT, capture_output=True, text=True, timeout=600, check=True,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.stdout.count("\n") == 1  # Progress went to stderr.
  rep = json.loads(out.stdout)
  assert rep == json.loads(out_path.read_text())
  assert rep["topology"] == "cpu" and list(rep["steps"]) == ["r_step"]
  assert rep["steps"]["r_step"]["fits"] is True


def test_report_names_why_a_step_does_not_fit():
  base = {"config": "c", "topology": "v5e-256", "chips": 256, "device_kind": "TPU v5 lite",
          "mesh": {"data": 16, "model": 16}, "hbm_gib": 16.0, "jax": "x", "libtpu": "y"}
  over = {**base, "steps": {"gradients": {"fits": False, "total_bytes": 16.96 * GIB}}}
  assert "needs 16.96 GiB per chip of 16.0 GiB HBM" in cc.format_report(over)
  oom = {**base, "steps": {"gradients": {"fits": False, "error": "RESOURCE_EXHAUSTED: x"}}}
  assert "DOES NOT FIT: RESOURCE_EXHAUSTED: x" in cc.format_report(oom)

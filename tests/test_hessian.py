"""R, R^{-1/2}, λ and the ablation switches (DESIGN.md §2 table)."""

import numpy as np
import pytest

from tda import hessian
from tda import methods as methods_lib
from tda import protocol

GRADIENT = methods_lib.gradient(methods_lib.METHODS)


def _data(n=400, d=24, seed=0):
  rng = np.random.default_rng(seed)
  mix = np.linalg.qr(rng.normal(size=(d, d)))[0] * np.linspace(3, 0.5, d)[None, :]
  return (rng.normal(size=(n, d)) @ mix).astype(np.float32)


def test_whitening_gives_identity_covariance_on_fit_sample():
  x = _data()
  s, n = hessian.autocorrelation(vectors_nd=x, chunk=64)
  r = s / n
  np.testing.assert_allclose(r, x.astype(np.float64).T @ x / len(x), rtol=1e-4, atol=1e-4)
  w = hessian.inv_sqrt(r_dd=r, damping=0.0)
  y = x.astype(np.float64) @ w
  np.testing.assert_allclose(y.T @ y / len(y), np.eye(x.shape[1]), atol=1e-3)
  # Block-diagonal: identity within each block.
  wb = hessian.inv_sqrt(r_dd=r, damping=0.0, block_sizes=[8, 16])
  yb = x.astype(np.float64) @ wb
  cov = yb.T @ yb / len(yb)
  np.testing.assert_allclose(cov[:8, :8], np.eye(8), atol=1e-3)
  np.testing.assert_allclose(cov[8:, 8:], np.eye(16), atol=1e-3)
  assert np.abs(wb[:8, 8:]).max() == 0.0


def test_damping_adds_a_multiple_of_the_identity_before_inverting():
  r = np.diag([100.0, 1.0, 0.01])
  w = hessian.inv_sqrt(r_dd=r, damping=1.0)  # δ = mean eigenvalue = 33.67.
  np.testing.assert_allclose(np.diag(w), (np.diag(r) + np.trace(r) / 3) ** -0.5, rtol=1e-5)
  # Any R: W is symmetric and whitens R + δI exactly (the defining property of
  # (R + δI)^{-1/2}), so damping changes the eigenvalues, never the eigenvectors.
  a = np.random.default_rng(0).normal(size=(6, 6))
  r = a @ a.T + 1e-3 * np.eye(6)
  for damping in (0.0, 0.1, 1.0):
    w = np.asarray(hessian.inv_sqrt(r_dd=r, damping=damping), np.float64)
    delta = damping * np.trace(r) / 6
    np.testing.assert_allclose(w, w.T, atol=1e-6)
    np.testing.assert_allclose(w @ (r + delta * np.eye(6)) @ w, np.eye(6), atol=1e-4)


def test_mix_is_unnormalised_unless_the_labelled_variant_asks():
  rt, re = np.diag([4.0, 2.0, 2.0]), np.diag([0.0, 0.0, 9.0])
  np.testing.assert_allclose(hessian.mix(r_train=rt, r_eval=re, lam=0.9), 0.9 * re + 0.1 * rt)
  m = hessian.mix(r_train=rt, r_eval=re, lam=0.9, normalise=True)
  np.testing.assert_allclose(m, 0.9 * re / 3 + 0.1 * rt / (8 / 3))
  with pytest.raises(ValueError, match="λ must be in"):
    hessian.mix(r_train=rt, r_eval=re, lam=1.5)


def test_lambda_rule_downweights_exactly_the_top_k_eval_directions_on_raw_scales():
  # R_eval's eigenbasis is the axes; ratios e_i / t_i = 8, 4, 1, 0.25.
  rt = np.diag([1.0, 2.0, 3.0, 4.0])
  re = np.diag([8.0, 8.0, 3.0, 1.0])
  for k, rho in ((1, 8.0), (2, 4.0), (3, 1.0)):
    lam, info = hessian.lambda_top_k(r_train=rt, r_eval=re, top_k=k)
    np.testing.assert_allclose(lam, 1 / (1 + rho))
    assert info["top_k"] == k and info["dominated"] == k - 1  # The K-th is the tie point.
    eps = 1e-6  # Just above λ, exactly K directions are weighted more by R_eval.
    dominated = (lam + eps) * np.diag(re) > (1 - lam - eps) * np.diag(rt)
    assert dominated.sum() == k
  # Scale invariance: λ/(1-λ) absorbs a scale of R_eval; the mixed R's shape is unchanged.
  lam1, _ = hessian.lambda_top_k(r_train=rt, r_eval=re, top_k=2)
  lam2, _ = hessian.lambda_top_k(r_train=rt, r_eval=100 * re, top_k=2)
  m1 = hessian.mix(r_train=rt, r_eval=re, lam=lam1)
  m2 = hessian.mix(r_train=rt, r_eval=100 * re, lam=lam2)
  np.testing.assert_allclose(m1 / np.trace(m1), m2 / np.trace(m2), rtol=1e-9)
  assert lam2 < lam1
  # Rank-deficient R_eval (few dev queries): K beyond its rank is a clear error.
  with pytest.raises(ValueError, match="fewer than K=3"):
    hessian.lambda_top_k(r_train=rt, r_eval=np.diag([1.0, 1.0, 0.0, 0.0]), top_k=3)
  assert hessian.top_k_of(65536, 1000 / 65536) == 1000 and hessian.top_k_of(320, 1000 / 65536) == 5


def test_shared_eigendecomposition_gives_each_damping_its_own_inverse_sqrt():
  a = np.random.default_rng(0).normal(size=(6, 6))
  r = a @ a.T
  e = hessian.eigen(r_dd=r, block_sizes=[2, 4])
  for damping in (1e-3, 1.0):
    np.testing.assert_allclose(e.inv_sqrt(damping),
                               hessian.inv_sqrt(r_dd=r, damping=damping, block_sizes=[2, 4]))
    assert np.all(e.inv_sqrt(damping)[:2, 2:] == 0)


def test_each_ablation_switch_changes_only_what_it_claims():
  raw, cor = _data(seed=1), _data(seed=2)
  q_raw, q_cor = _data(n=50, seed=3), _data(n=50, seed=4)
  r_train = {"raw": raw.T @ raw / len(raw), "corrected": cor.T @ cor / len(cor)}
  r_eval = {"raw": q_raw.T @ q_raw / 50, "corrected": q_cor.T @ q_cor / 50}
  wh = hessian.build_whiteners(methods=GRADIENT, r_train=r_train, r_eval=r_eval,
                               lambda_rule="fixed", lam=0.9, damping=0.1)
  x = {"raw": raw[:20], "corrected": cor[:20]}
  g = {m: wh.transform(method=m, vectors_nd=x[methods_lib.switches(m).variant]) for m in GRADIENT}
  unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)
  np.testing.assert_allclose(g["exp1"], raw[:20], rtol=1e-6)             # Nothing applied.
  np.testing.assert_allclose(g["exp2"], unit(raw[:20]), rtol=1e-5)       # + unit norm only.
  np.testing.assert_allclose(g["exp3"], unit(g["trak"]), rtol=1e-4, atol=1e-6)  # TRAK + unit norm.
  assert wh.matrices["exp3"] is wh.matrices["trak"]                      # Same R_train, shared.
  assert wh.matrices["exp5"] is not wh.matrices["exp3"]                  # Corrected R differs.
  np.testing.assert_allclose(g["exp4"], unit(cor[:20]), rtol=1e-5)       # Correction, no R.
  np.testing.assert_allclose(g["trackstar_no_task_r"], g["exp5"])
  assert not np.allclose(g["trackstar"], g["exp5"])                      # Only R differs...
  assert wh.matrices["trackstar"] is not wh.matrices["exp5"]
  assert methods_lib.switches("trackstar").variant == methods_lib.switches("exp5").variant  # ...not the variant.
  assert wh.lam == 0.9


def test_unknown_method_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown method 'trakk'"):
    methods_lib.switches("trakk")
  with pytest.raises(ValueError, match=r"unknown method\(s\) \['trakk'\] in eval.methods"):
    methods_lib.check(["trackstar", "trakk"])
  with pytest.raises(ValueError, match="not a gradient method"):
    methods_lib.switches("bm25")


# --- R on device (`hessian.r_accumulate`) -------------------------------------------

def _mesh_2x2():
  import jax
  from tda import sharding
  if len(jax.devices()) < 4:
    pytest.skip("needs 4 forced host devices (tests/conftest.py sets them)")
  return sharding.make_mesh(axes=(("data", 2), ("model", 2)), devices=jax.devices()[:4])


def test_r_is_accumulated_sharded_on_the_mesh_within_its_float32_bound():
  import jax
  from jax.sharding import PartitionSpec as P
  from tda import sharding
  mesh = _mesh_2x2()
  # Heavy-tailed scales, d not a multiple of the mesh (padded), rows not of the chunk.
  rng = np.random.default_rng(1)
  x = (rng.standard_t(3, size=(1000, 70)) * np.geomspace(30, 0.01, 70)).astype(np.float32)
  ref = x.astype(np.float64).T @ x.astype(np.float64)
  r, n = hessian.autocorrelation(vectors_nd=x, chunk=96, mesh=mesh)
  assert n == 1000 and r.shape == (70, 70) and r.dtype == np.float64
  bound = hessian.r_error_bound(r_dd=ref, n=n, chunk=96)
  assert (np.abs(r - ref) <= bound).all(), (np.abs(r - ref) / bound).max()
  assert not np.array_equal(r, ref)  # float32 accumulation: not the float64 sum.
  # The bound is tight enough to mean something: ~1e-5 relative at these sizes.
  assert bound.max() / np.abs(ref).max() < 1e-4
  # One step's output stays sharded as R's input: a (d/2 × d/2) tile per device.
  dp, rows = hessian.r_shapes(mesh=mesh, d=70, rows=96)
  r_abs, x_abs = hessian.r_arguments(mesh=mesh, d=dp, rows=rows)
  out = hessian.r_accumulate(jax.device_put(np.zeros(r_abs.shape, np.float32), r_abs.sharding),
                             jax.device_put(x[:rows, :dp] if dp == 70 else
                                            np.pad(x[:rows], ((0, 0), (0, dp - 70))),
                                            x_abs.sharding),
                             **hessian.r_step_options(mesh))
  assert out.sharding.spec == P(sharding.DATA, sharding.MODEL)
  assert {s.data.shape for s in out.addressable_shards} == {(dp // 2, dp // 2)}
  assert len(out.addressable_shards) == 4


def test_the_runs_r_train_is_the_reference_within_the_bound():
  """`featurize.fit_whiteners` (what the 'gradients' stage calls) on the 4 forced devices."""
  from tda import featurize
  from tests.helpers import tiny_config
  c = tiny_config()
  rng = np.random.default_rng(2)
  train = {"corrected": (rng.normal(size=(600, 48)) * np.geomspace(10, 0.1, 48)
                         ).astype(np.float32)}
  queries = {"corrected": rng.normal(size=(20, 48)).astype(np.float32)}
  fit = featurize.fit_whiteners(c, methods=["trackstar"], queries=queries, train=train)
  x = train["corrected"].astype(np.float64)
  ref = x.T @ x
  bound = hessian.r_error_bound(r_dd=ref, n=len(x)) / len(x)
  assert (np.abs(fit.r_train["corrected"] - ref / len(x)) <= bound).all()


def test_compile_check_compiles_the_runs_r_step_itself(monkeypatch):
  import jax
  from tda import compile_check as cc
  mesh = _mesh_2x2()
  # The compile check looks up `hessian.r_accumulate` itself, not a copy of it.
  lowered_by = []
  real = hessian.r_accumulate

  class Spy:
    def lower(self, *args, **kwargs):
      lowered_by.append(args)
      return real.lower(*args, **kwargs)

  monkeypatch.setattr(hessian, "r_accumulate", Spy())
  cc.lower_r_step(mesh=mesh, d=70, batch=96)
  assert len(lowered_by) == 1
  monkeypatch.setattr(hessian, "r_accumulate", real)
  # The same jitted object, and the same program for the same arguments: what the
  # run lowers for its placed arrays is what the compile check lowers.
  lowered = cc.lower_r_step(mesh=mesh, d=70, batch=96)
  dp, rows = hessian.r_shapes(mesh=mesh, d=70, rows=96)
  r_abs, x_abs = hessian.r_arguments(mesh=mesh, d=dp, rows=rows)
  run_lowered = hessian.r_accumulate.lower(
      jax.device_put(np.zeros(r_abs.shape, np.float32), r_abs.sharding),
      jax.device_put(np.zeros(x_abs.shape, np.float32), x_abs.sharding),
      **hessian.r_step_options(mesh))
  assert lowered.as_text() == run_lowered.as_text()
  rep = cc.check_r_step(cc._Target(config=None, devices=list(mesh.devices.flat), mesh=mesh,
                                   hbm=None, log=lambda s: None), d=70, r_batch=96)
  # The check runs it on R's own mesh over those devices, the one the run builds
  # (`sharding.r_mesh`: here one process, so 1 × 4).
  from tda import sharding
  r_mesh = sharding.r_mesh(list(mesh.devices.flat))
  assert rep["function"] == "tda.hessian.r_accumulate"
  assert rep["r_mesh"] == dict(r_mesh.shape) == {"data": 1, "model": 4}
  assert rep["d_padded"] == hessian.r_shapes(mesh=r_mesh, d=70, rows=96)[0]


def test_eigh_plan_at_the_8b_dimension():
  plan = hessian.eigh_plan(d=65536, block_sizes=None, mesh_shape={"data": 16, "model": 16},
                           variants=1, tables=1)
  assert plan["r_bytes_total"] == 4 * 65536 ** 2 == 16 << 30
  assert plan["r_bytes_per_chip"] == 64 << 20  # A 4,096² float32 tile on each of 256 chips.
  assert plan["r_to_host_bytes_per_chip"] == 1 << 30  # 4,096 rows of R replicated a step.
  assert plan["dtype"] == "float32" and plan["eigh_bytes_per_chip"] == 0
  # Six float32 65,536² matrices at the peak: R_train, R_eval and the mixed R with the
  # eigendecomposition's three: 96 GiB per host. Forming R^{-1/2} (once: the sweep
  # runs in the eigenbasis) holds five.
  assert plan["host_bytes_total"] == 6 * (16 << 30) and plan["host_peak_phase"] == "eigh"
  assert plan["host_bytes_by_phase"]["inv_sqrt"] == 5 * (16 << 30)
  blocks = hessian.eigh_plan(d=65536, block_sizes=[4096] * 16,
                             mesh_shape={"data": 16, "model": 16})
  assert blocks["eigh_host_bytes_peak"] == 3 * 4 * 4096 ** 2
  assert blocks["eigh_flops"] * 256 == pytest.approx(plan["eigh_flops"])


@pytest.mark.parametrize("blocks", [None, [768] * 3])
def test_eigh_plan_is_the_measured_host_peak(blocks):
  """What the host really allocates (numpy, traced) in `featurize.fit_whiteners` (R
  to the host, λ, the eigendecomposition, the dev sweep in R's eigenbasis and the
  chosen R^{-1/2}) is `eigh_plan`'s peak."""
  import tracemalloc
  from tda import featurize
  from tests.helpers import tiny_config
  d = 2304  # Above HOST_FLOAT64_MAX: the float32 host path of the 8B run.
  c = tiny_config()
  c.hessian.block_diagonal = blocks is not None
  c.hessian.lambda_rule, c.hessian.lambda_top_k_fraction = "top_k", 0.02
  c.hessian.damping_candidates = (0.1, 1.0, 10.0)
  rng = np.random.default_rng(0)
  train = {"corrected": (rng.normal(size=(3 * d, d)) * np.geomspace(10, 0.1, d)
                         ).astype(np.float32)}
  queries = {"corrected": rng.normal(size=(100, d)).astype(np.float32)}
  pool = rng.normal(size=(300, d)).astype(np.float32)
  dev = featurize.DevPool(queries=queries, pool={"corrected": pool},
                          relevant_qp=np.eye(100, 300, dtype=bool))
  tracemalloc.start()
  try:
    fit = featurize.fit_whiteners(c, methods=["trackstar"], queries=queries, train=train,
                                  block_sizes=blocks or [d], dev=dev)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert fit.whiteners.matrices["trackstar"].dtype == np.float32
  sw = fit.sweep["trackstar"]
  assert len(sw["dev_mrr"]) == 3 + sw["extended_by"]  # Extensions rescale in place.
  plan = hessian.eigh_plan(d=d, block_sizes=blocks, mesh_shape={"data": 1}, variants=1,
                           tables=1, sweep_rows=400)
  m = 4 * d * d
  assert 0.9 * plan["host_bytes_total"] <= peak <= 1.05 * plan["host_bytes_total"], (
      peak / m, {k: v / m for k, v in plan["host_bytes_by_phase"].items()})


def test_sample_effect_measures_what_r_s_sample_does_to_an_unnormalised_score():
  """Whitening with R fitted on a half of the candidates amplifies the other half
  (outside R's sample) when R is poorly determined; with R fitted on all of them the
  scores are the whitened dot products; a huge damping makes R irrelevant."""
  rng = np.random.default_rng(0)
  n, d, q = 40, 16, 12
  # Anisotropic candidates (a few strong directions), queries near their own one.
  pool = rng.normal(size=(n, d)) * np.geomspace(10.0, 0.1, d)
  queries = pool[:q] + 0.1 * rng.normal(size=(q, d)) * np.geomspace(10.0, 0.1, d)
  rel = np.zeros((q, n), bool)
  rel[np.arange(q), np.arange(q)] = True
  r_all = pool.T @ pool / n
  out = hessian.sample_effect(pool_nd=pool, queries_qd=queries, relevant_qn=rel,
                              r_as_run=r_all, dampings=[1e-6, 1e6], seed=3)
  assert (out["half"], out["candidates"], out["queries"], out["top"]) == (20, 40, 12, 10)
  w = hessian.inv_sqrt(r_dd=r_all, damping=1e-6)
  ranks = protocol.first_relevant_rank(scores_qn=(queries @ w) @ (pool @ w).T,
                                       relevant_qn=rel)
  low, high = out["by_damping"]
  assert low["mrr_as_run"] == pytest.approx(protocol.mrr_from_ranks(ranks))
  assert out["unwhitened_mrr"] == pytest.approx(protocol.mrr_from_ranks(
      protocol.first_relevant_rank(scores_qn=queries @ pool.T, relevant_qn=rel)))
  # 20 samples for 16 dimensions: the half outside R's sample takes most of the top 10
  # and carries larger whitened norms.
  assert low["out_of_sample_share_top"] > 0.6 and low["norm_out_over_in"] > 1.5  # 0.75, 1.91
  # Damping far above every eigenvalue: R ~ c·I, so both match the unwhitened ranking.
  assert high["mrr_as_run"] == pytest.approx(out["unwhitened_mrr"])
  assert high["mrr_half"] == pytest.approx(out["unwhitened_mrr"])
  with pytest.raises(ValueError, match="relevant"):
    hessian.sample_effect(pool_nd=pool, queries_qd=queries, relevant_qn=rel[:, :5],
                          r_as_run=r_all, dampings=[1.0])

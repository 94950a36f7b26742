"""Gradient engine: factored kernel vs reference vs a loop of jax.grad, typed
correction records, sharding, projection statistics, no recompilation, bad inputs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from optax._src import factorized

from tda import correction as corr_lib
from tda import featurize
from tda import gradients as grad_lib
from tda import model as model_lib
from tda import projection as proj
from tda import sharding
from tests import helpers


@functools.lru_cache(maxsize=None)
def _setup(optimizer="adafactor", pooling="block", block="parallel", adam_v="materialise",
           min_dim=32, k=8, tie=True):
  c = helpers.tiny_config(**{"train.optimizer": optimizer, "model.block": block,
                             "train.min_dim_size_to_factor": min_dim,
                             "model.tie_embeddings": tie})
  model, params, opt_state = helpers.trained_state(c)
  plan = proj.make_plan(param_shapes=params, pooling=pooling, k_in=k, k_out=k,
                        layers_per_block=1)
  mats = proj.plan_matrices(seed=3, plan=plan)
  corrs = corr_lib.member_corrections(opt_state=opt_state, plan=plan, eps=1e-12, adam_v=adam_v)
  return model, params, opt_state, plan, mats, corrs


def _run(kind, model, params, plan, mats, corrs, toks, mask):
  make = grad_lib.make_factored_kernel if kind == "factored" else grad_lib.make_reference_kernel
  fn = jax.jit(make(model=model, plan=plan, has_corrections=corrs is not None))
  out = fn(params, mats, corrs, toks, mask)
  return {k: np.asarray(v) for k, v in out.items()}


def _assert_close(a, b, cos_min=0.9999, rel_max=1e-4):
  cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
  rel = np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)
  assert cos.min() >= cos_min, cos
  assert rel.max() <= rel_max, rel


def _batch(n=4, t=24, vocab=512, seed=5):
  toks = helpers.random_tokens(n, t, vocab, seed=seed, min_len=10)
  return toks, (toks != 0).astype(np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("block", ["parallel", "sequential"])
@pytest.mark.parametrize("pooling", ["block", "layer"])
def test_factored_kernel_matches_reference_with_adafactor_corrections(block, pooling):
  model, params, _, plan, mats, corrs = _setup(block=block, pooling=pooling)
  kinds = corr_lib.describe(corrs)
  assert kinds["factored"] >= 8 and kinds["full"] >= 1  # Both paths exercised.
  toks, mask = _batch()
  f = _run("factored", model, params, plan, mats, corrs, toks, mask)
  r = _run("reference", model, params, plan, mats, corrs, toks, mask)
  for v in ("raw", "corrected"):
    _assert_close(f[v], r[v])
  np.testing.assert_allclose(f["loss"], r["loss"], rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adafactor", "adam"])
def test_untied_head_is_a_member_and_kernels_agree(optimizer):
  model, params, _, plan, mats, corrs = _setup(optimizer=optimizer, block="sequential",
                                               tie=False)
  assert params["lm_head"]["kernel"].shape == (64, 512)
  first = plan.blocks[0]
  assert first.name == "embed" and [m.name for m in first.members] == [
      "embed/embedding", "lm_head/kernel"]
  assert first.members[1].kind == proj.DENSE
  cov = proj.coverage(plan, params)
  assert cov["by_kind"]["head"] == {**cov["by_kind"]["head"], "params": 64 * 512,
                                    "attributed": 64 * 512, "tensors": 1}
  assert cov["attributed_share"] == 1.0 and not cov["not_attributed"]
  toks, mask = _batch()
  f = _run("factored", model, params, plan, mats, corrs, toks, mask)
  r = _run("reference", model, params, plan, mats, corrs, toks, mask)
  for v in ("raw", "corrected"):
    _assert_close(f[v], r[v])
  # Same d as the tied model's plan: the head shares the embedding's block.
  tied = {k: v for k, v in params.items() if k != "lm_head"}
  assert plan.dim == proj.make_plan(param_shapes=tied, pooling="block", k_in=8, k_out=8,
                                    layers_per_block=1).dim


@pytest.mark.slow
def test_query_mask_keeps_only_target_token_gradients():
  model, params, _, plan, mats, corrs = _setup()
  toks, _ = _batch()
  mask = np.zeros_like(toks, np.float32)
  mask[:, 6:9] = 1.0  # "target" positions.
  f = _run("factored", model, params, plan, mats, corrs, toks, mask)
  r = _run("reference", model, params, plan, mats, corrs, toks, mask)
  _assert_close(f["corrected"], r["corrected"])
  # Changing tokens after the target cannot change a causal model's target gradient.
  toks2 = toks.copy()
  toks2[:, 12:] = 7
  f2 = _run("factored", model, params, plan, mats, corrs, toks2, mask)
  np.testing.assert_allclose(f2["corrected"], f["corrected"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tie", [True, False])
def test_head_on_the_target_rows_only_gives_the_full_heads_vectors(tie):
  """A query's loss is on its target tokens: the fused head then runs on those
  positions only (`loss_rows`), with the same vectors, the tied embedding's logit
  term (tie) or the untied `lm_head` member included; too few rows is a NaN row,
  never a silently wrong vector."""
  model, params, _, plan, mats, corrs = _setup(block="parallel" if tie else "sequential",
                                               tie=tie)
  toks, _ = _batch(t=40)
  mask = np.zeros_like(toks, np.float32)
  mask[:, 7:10] = 1.0            # Three target tokens.
  mask[1, 7] = 0.0               # Row 1: two.
  assert grad_lib.loss_rows_for(toks, mask) == 8
  passage = (toks != 0).astype(np.float32)
  assert grad_lib.loss_rows_for(toks, passage) is None           # Passages: every row,
  assert grad_lib.loss_rows_for(toks[:, :12], passage[:, :12]) is None  # even short ones.
  assert grad_lib.loss_rows_for(toks[:, :12], mask[:, :12]) is None  # 8 is not < half.
  kernel = jax.jit(grad_lib.make_factored_kernel(model=model, plan=plan, has_corrections=True),
                   static_argnames=("loss_rows",))
  run = lambda rows: {k: np.asarray(v) for k, v in
                      kernel(params, mats, corrs, toks, mask, loss_rows=rows).items()}
  full, rows8 = run(None), run(8)
  for v in ("raw", "corrected", "loss"):
    np.testing.assert_allclose(rows8[v], full[v], rtol=1e-5, atol=1e-6 * np.abs(full[v]).max())
  _assert_close(rows8["corrected"], _run("reference", model, params, plan, mats, corrs,
                                         toks, mask)["corrected"])
  rows2 = run(2)
  overflow = np.array([True, False, True, True])
  assert np.isnan(rows2["loss"][overflow]).all()
  assert not np.isfinite(rows2["corrected"][overflow]).any()     # Every block, head too.
  np.testing.assert_allclose(rows2["corrected"][1], full["corrected"][1], rtol=1e-5,
                             atol=1e-6 * np.abs(full["corrected"]).max())
  # The Featurizer picks the rows from the mask itself, and compiles per row count.
  mesh = sharding.make_mesh(axes=(("data", -1), ("model", 1)))
  feat = featurize.Featurizer(model=model, params=params, plan=plan, mats=mats, corrs=corrs,
                              mesh=mesh, batch_size=4, bucket=40)
  out = feat(tokens_nt=toks, mask_nt=mask, ids=list("abcd"))
  assert not out["bad_ids"] and feat.compiled_shapes == 1
  np.testing.assert_allclose(out["corrected"], full["corrected"], rtol=1e-5,
                             atol=1e-6 * np.abs(full["corrected"]).max())
  feat(tokens_nt=toks, mask_nt=(toks != 0).astype(np.float32), ids=list("abcd"))
  assert feat.compiled_shapes == 2   # Passage masks: the full head, another program.


@pytest.mark.slow
def test_reference_kernel_matches_python_loop_of_grad():
  model, params, _, plan, mats, corrs = _setup()
  toks, mask = _batch(n=3)
  r = _run("reference", model, params, plan, mats, corrs, toks, mask)
  for i in range(3):
    g = jax.grad(lambda p: model_lib.example_losses(
        model, {"params": p}, toks[i:i + 1], mask[i:i + 1])[0])(params)
    parts = []
    for b in plan.blocks:
      acc = 0.0
      for m in b.members:
        inv = corr_lib.full_inv_sqrt(corrs[m.name])
        gm = np.asarray(model_lib.param_at(g, m.path) * inv, np.float64)
        p_in, p_out = (np.asarray(x, np.float64) for x in mats[m.name])
        acc = acc + (np.outer(p_in[:, 0], p_out @ gm) if m.kind == proj.VECTOR
                     else p_in @ gm @ p_out.T)
      parts.append(np.ravel(acc))
    want = np.concatenate(parts)
    np.testing.assert_allclose(r["corrected"][i], want, rtol=2e-4, atol=1e-5 * np.abs(want).max())


@pytest.mark.slow
def test_adam_v_materialised_is_exact_and_rank1_fit_is_approximate():
  model, params, _, plan, mats, corrs = _setup(optimizer="adam")
  assert corr_lib.describe(corrs) == {"factored": 0, "full": len(plan.members)}
  toks, mask = _batch()
  f = _run("factored", model, params, plan, mats, corrs, toks, mask)
  r = _run("reference", model, params, plan, mats, corrs, toks, mask)
  _assert_close(f["corrected"], r["corrected"])
  *_, corrs1 = _setup(optimizer="adam", adam_v="rank1")
  assert corr_lib.describe(corrs1)["factored"] > 0
  f1 = _run("factored", model, params, plan, mats, corrs1, toks, mask)
  cos = np.sum(f1["corrected"] * r["corrected"], 1) / (
      np.linalg.norm(f1["corrected"], axis=1) * np.linalg.norm(r["corrected"], axis=1))
  assert cos.min() > 0.0 and cos.max() < 0.99999  # Related, but not the exact quantity.


@pytest.mark.slow
def test_featurizer_on_4_devices_matches_1_device():
  assert jax.device_count() == 4
  model, params, _, plan, mats, corrs = _setup()
  toks, mask = _batch(n=8)
  outs = []
  for devs in (jax.devices()[:1], jax.devices()):
    mesh = sharding.make_mesh(axes=(("data", -1), ("model", 1)), devices=devs)
    feat = featurize.Featurizer(model=model, params=params, plan=plan, mats=mats, corrs=corrs,
                                mesh=mesh, batch_size=8, bucket=8)
    outs.append(feat(tokens_nt=toks, mask_nt=mask, ids=[str(i) for i in range(8)]))
  for v in ("raw", "corrected"):
    np.testing.assert_allclose(outs[0][v], outs[1][v], rtol=1e-6, atol=1e-6 * np.abs(outs[0][v]).max())


def test_featurizer_compiles_once_across_batches_and_padded_last_batch():
  model, params, _, plan, mats, corrs = _setup()
  mesh = sharding.make_mesh(axes=(("data", -1), ("model", 1)))
  feat = featurize.Featurizer(model=model, params=params, plan=plan, mats=mats, corrs=corrs,
                              mesh=mesh, batch_size=4, bucket=32)
  compiles = []

  def on_event(event, duration, **kwargs):
    del duration
    if event.endswith("backend_compile_duration") and kwargs.get("fun_name") == "jit(kernel)":
      compiles.append(event)

  jax.monitoring.register_event_duration_secs_listener(on_event)
  try:
    toks = helpers.random_tokens(11, 32, 512, seed=2)  # 11 = 4 + 4 + 3 (padded).
    feat(tokens_nt=toks, mask_nt=(toks != 0).astype(np.float32),
         ids=[str(i) for i in range(11)])
    assert feat.compiled_shapes == 1
    toks2 = helpers.random_tokens(7, 32, 512, seed=3)
    out = feat(tokens_nt=toks2, mask_nt=(toks2 != 0).astype(np.float32), ids=list("abcdefg"))
    assert feat.compiled_shapes == 1
  finally:
    jax.monitoring.unregister_event_duration_listener(on_event)
  assert len(compiles) == 1  # The shape count is what XLA actually compiled.
  # Padded rows do not leak into real ones: the same example alone gives the same vector.
  alone = feat(tokens_nt=toks2[:1], mask_nt=(toks2[:1] != 0).astype(np.float32), ids=["a"])
  np.testing.assert_allclose(alone["corrected"][0], out["corrected"][0], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_length_buckets_give_the_same_vectors_as_one_length():
  model, params, _, plan, mats, corrs = _setup()
  mesh = sharding.make_mesh(axes=(("data", -1), ("model", 1)))
  toks = helpers.random_tokens(6, 64, 512, seed=4, min_len=5)
  mask = (toks != 0).astype(np.float32)
  ids = [str(i) for i in range(6)]
  bucketed = featurize.Featurizer(model=model, params=params, plan=plan, mats=mats, corrs=corrs,
                                  mesh=mesh, batch_size=4, bucket=16)(tokens_nt=toks, mask_nt=mask,
                                                                      ids=ids)
  full = featurize.Featurizer(model=model, params=params, plan=plan, mats=mats, corrs=corrs,
                              mesh=mesh, batch_size=4, bucket=64)(tokens_nt=toks, mask_nt=mask,
                                                                  ids=ids)
  _assert_close(bucketed["corrected"], full["corrected"], rel_max=1e-5)


def test_projection_preserves_inner_products_in_expectation():
  """Two-sided Gaussian projection: E<Pa,Pb> = <a,b>, spread ~ sqrt(2/d)·|a||b|."""
  member = proj.Member(("w", "kernel"), proj.DENSE, (48, 40))
  rng = np.random.default_rng(0)
  a = rng.normal(size=(48, 40))
  b = 0.6 * a + 0.8 * rng.normal(size=(48, 40))
  true = float(np.sum(a * b))
  scale = np.linalg.norm(a) * np.linalg.norm(b)
  errs = []
  for seed in range(200):
    p_in, p_out = (np.asarray(x, np.float64) for x in proj.member_matrices(
        seed=seed, member=member, k_in=16, k_out=16))
    errs.append((np.sum((p_in @ a @ p_out.T) * (p_in @ b @ p_out.T)) - true) / scale)
  errs = np.asarray(errs)
  # Mean error ~ 0 within 4 standard errors; spread within 2x the JL scale sqrt(2/d).
  assert abs(errs.mean()) < 4 * errs.std() / np.sqrt(len(errs))
  assert errs.std() < 2 * np.sqrt(2 / 256)
  # Same seed and member: identical matrices (every host sees the same projection).
  m1 = proj.member_matrices(seed=7, member=member, k_in=4, k_out=4)
  m2 = proj.member_matrices(seed=7, member=member, k_in=4, k_out=4)
  np.testing.assert_array_equal(m1[0], m2[0])


def test_factored_record_reproduces_optax_full_inv_sqrt_v():
  """s_in[i] · s_out[j] is the 1/sqrt(V_ij) optax itself applies (factored params)."""
  model, params, opt_state, plan, mats, corrs = _setup()
  _, fs = corr_lib.second_moments(opt_state)
  checked = 0
  for m in plan.members:
    corr = corrs[m.name]
    if not isinstance(corr, corr_lib.FactoredCorrection):
      continue
    assert corr.s_in.shape == (m.shape[0],) and corr.s_out.shape == (m.shape[1],)
    shape = m.shape
    d1, d0 = (0, 1) if shape[0] <= shape[1] else (1, 0)
    r = np.asarray(model_lib.param_at(fs.v_row, m.path), np.float64)
    c = np.asarray(model_lib.param_at(fs.v_col, m.path), np.float64)
    v = (np.expand_dims(r / r.mean(), d0) * np.expand_dims(c, d1))
    full = np.asarray(corr_lib.full_inv_sqrt(corr))
    np.testing.assert_allclose(full, v ** -0.5, rtol=1e-4)
    np.testing.assert_array_equal(
        full, np.asarray(corr.s_in)[:, None] * np.asarray(corr.s_out)[None, :])
    checked += 1
  assert checked >= 8


def test_full_record_equal_to_factored_product_gives_the_same_vectors():
  """Both factored-kernel paths (rescale the factors; materialise then multiply)
  implement the same record formula."""
  model, params, _, plan, mats, corrs = _setup()
  as_full = {name: corr_lib.FullCorrection(inv_sqrt_v=corr_lib.full_inv_sqrt(c))
             for name, c in corrs.items()}
  assert corr_lib.describe(as_full) == {"factored": 0, "full": len(plan.members)}
  toks, mask = _batch()
  f = _run("factored", model, params, plan, mats, corrs, toks, mask)
  g = _run("factored", model, params, plan, mats, as_full, toks, mask)
  np.testing.assert_allclose(g["raw"], f["raw"], rtol=1e-6, atol=1e-6 * np.abs(f["raw"]).max())
  _assert_close(g["corrected"], f["corrected"], cos_min=0.999999, rel_max=1e-5)


def test_correction_records_are_pytrees_whose_class_is_the_kind():
  *_, plan, _, corrs = _setup()
  kinds = corr_lib.describe(corrs)
  assert kinds["factored"] > 0 and kinds["full"] > 0
  mesh = sharding.make_mesh(axes=(("data", -1), ("model", 1)))
  placed = jax.device_put(corrs, sharding.replicated(mesh))
  same = jax.jit(lambda c: c)(placed)
  for name, c in corrs.items():
    assert type(same[name]) is type(c)
    for a, b in zip(jax.tree.leaves(c), jax.tree.leaves(same[name])):
      np.testing.assert_array_equal(a, b)
  leaves = {type(c): len(jax.tree.leaves(c)) for c in corrs.values()}
  assert leaves == {corr_lib.FactoredCorrection: 2, corr_lib.FullCorrection: 1}
  assert sum(kinds.values()) == len(plan.members)


@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (64, 64), (512, 64), (3, 3, 3),
                                   (8, 2, 8), (2, 16, 4), (5, 7, 7, 1)])
def test_factored_axes_agree_with_optax(shape):
  assert corr_lib.factored_axes(shape) == factorized._factored_dims(shape, True, 0)


def test_factored_axes_refuse_vectors():
  with pytest.raises(ValueError, match="2 or more dimensions"):
    corr_lib.factored_axes((64,))


def test_corrected_variant_needs_corrections():
  model, params, _, plan, mats, corrs = _setup()
  with pytest.raises(ValueError, match="needs the optimizer corrections"):
    grad_lib.make_factored_kernel(model=model, plan=plan, has_corrections=False,
                                  variants=("corrected",))
  kernel = grad_lib.make_factored_kernel(model=model, plan=plan, has_corrections=True)
  toks, mask = _batch()
  with pytest.raises(ValueError, match="without correction records"):
    kernel(params, mats, None, toks, mask)


def test_missing_optimizer_state_is_a_clear_error():
  c = helpers.tiny_config()
  model, params, _ = helpers.trained_state(c, steps=1)
  plan = proj.make_plan(param_shapes=params, pooling="layer", k_in=4, k_out=4)
  with pytest.raises(ValueError, match="no second moment"):
    corr_lib.member_corrections(opt_state=(), plan=plan, eps=1e-12)


def test_non_finite_gradients_are_zeroed_and_flagged_by_id():
  model, params, _, plan, mats, corrs = _setup()
  bad = jax.tree.map(lambda x: x, params)
  bad["layer_1"]["mlp"]["down"]["kernel"] = bad["layer_1"]["mlp"]["down"]["kernel"].at[0, 0].set(jnp.nan)
  mesh = sharding.make_mesh(axes=(("data", -1), ("model", 1)))
  feat = featurize.Featurizer(model=model, params=bad, plan=plan, mats=mats, corrs=corrs,
                              mesh=mesh, batch_size=4, bucket=32)
  toks = helpers.random_tokens(3, 32, 512, seed=9)
  out = feat(tokens_nt=toks, mask_nt=(toks != 0).astype(np.float32), ids=["x", "y", "z"])
  assert out["bad_ids"] == ["x", "y", "z"]
  assert np.all(out["corrected"] == 0)


def test_paper_pooling_plan_covers_every_parameter_once():
  c = helpers.tiny_config(**{"model.n_layers": 4})
  shapes = model_lib.param_shapes(model_lib.Transformer(model_lib.model_config(c)), 8)
  plan = proj.make_plan(param_shapes=shapes, pooling="block", k_in=8, k_out=8,
                        layers_per_block=2, groups=("attn_in", "attn_out", "mlp_in", "mlp_out"),
                        embed_block="first")
  assert len(plan.blocks) == 8 and plan.dim == 8 * 64
  names = {m.name for m in plan.members}
  assert len(names) == len(jax.tree.leaves(shapes))  # Every parameter is covered once.
  layer = proj.make_plan(param_shapes=shapes, pooling="layer", k_in=8, k_out=8)
  assert len(layer.blocks) == 1 + 4 * 7  # Embedding + one block per matrix.

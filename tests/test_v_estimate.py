"""V estimated from per-example gradients (`tda.v_estimate`, stage 'second_moments')
and the coverage report (`tda.projection.coverage`)."""

import copy
import functools
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tda import config as config_lib
from tda import correction as corr_lib
from tda import model as model_lib
from tda import projection as proj
from tda import v_estimate
from tda.stages import second_moments as sm_stage
from tests import helpers


@functools.lru_cache(maxsize=None)
def _model():
  c = helpers.tiny_config()
  model = model_lib.Transformer(model_lib.model_config(c))
  params = model_lib.init_params(model, jax.random.key(0), 32)
  return c, model, params


def _example_grads(model, params, toks):
  def loss(p, t):
    nll = model_lib.example_losses(model, {"params": p}, t[None])[0]
    return nll / jnp.maximum(jnp.sum(t[1:] != 0), 1)
  return [jax.grad(loss)(params, jnp.asarray(t)) for t in toks]


def _flat(tree):
  return v_estimate._flat(tree)


@pytest.mark.slow
def test_estimate_is_the_sample_mean_of_squared_per_example_gradients():
  c, model, params = _model()
  toks = helpers.random_tokens(5, 24, 512, seed=3, min_len=8)
  # Batch 2: a padded last batch; bucket 8: several lengths.
  stats = v_estimate.estimate(model=model, params=params, tokens_nt=toks, batch_size=2,
                              min_dim_size_to_factor=32, length_bucket=8)
  sq = [{k: np.square(np.asarray(g, np.float64)) + 1e-30 for k, g in _flat(gr).items()}
        for gr in _example_grads(model, params, toks)]
  factored = 0
  for k, shape in ((k, v.shape) for k, v in _flat(params).items()):
    mean_sq = np.mean([s[k] for s in sq], axis=0)
    dims = v_estimate.factored_dims(shape, 32)
    if dims is None:
      np.testing.assert_allclose(stats["v"][k], mean_sq, rtol=2e-4, atol=1e-12)
      assert stats["v_row"][k].shape == (1,)
    else:
      factored += 1
      d1, d0 = dims
      np.testing.assert_allclose(stats["v_row"][k], mean_sq.mean(axis=d0), rtol=2e-4, atol=1e-12)
      np.testing.assert_allclose(stats["v_col"][k], mean_sq.mean(axis=d1), rtol=2e-4, atol=1e-12)
      assert stats["v"][k].shape == (1,)
  assert factored == 15  # Every matrix (all have both sides >= 32); vectors full.


@pytest.mark.slow
def test_estimate_on_one_example_is_optax_adafactor_state_after_one_step():
  """Layout check: at step 1 Adafactor's decay is 0, so its state is exactly the
  factored g² of the one gradient it saw (same v_row/v_col axes, same threshold)."""
  c, model, params = _model()
  toks = helpers.random_tokens(1, 24, 512, seed=4)
  stats = v_estimate.estimate(model=model, params=params, tokens_nt=toks, batch_size=1,
                              min_dim_size_to_factor=64, length_bucket=24)
  (g,) = _example_grads(model, params, toks)
  tx = optax.scale_by_factored_rms(min_dim_size_to_factor=64, decay_rate=0.8)
  _, st = tx.update(g, tx.init(params), params)
  for stat in ("v_row", "v_col", "v"):
    for k, ref in _flat(getattr(st, stat)).items():
      np.testing.assert_allclose(stats[stat][k], np.asarray(ref), rtol=2e-4, atol=1e-12,
                                 err_msg=f"{stat} {k}")


@pytest.mark.slow
def test_saved_estimate_gives_the_same_correction_records(tmp_path):
  c, model, params = _model()
  toks = helpers.random_tokens(4, 16, 512, seed=5)
  stats = v_estimate.estimate(model=model, params=params, tokens_nt=toks, batch_size=4,
                              min_dim_size_to_factor=32)
  v_estimate.save(str(tmp_path / "v.npz"), stats, factored=True)
  state = v_estimate.load(str(tmp_path / "v.npz"))
  assert isinstance(state, optax.FactoredState)
  plan = proj.make_plan(param_shapes=params, pooling="block", k_in=4, k_out=4)
  corrs = corr_lib.member_corrections(opt_state=state, plan=plan, eps=1e-12)
  for m in plan.members:
    cls = corr_lib.FullCorrection if m.kind == proj.VECTOR else corr_lib.FactoredCorrection
    assert isinstance(corrs[m.name], cls), m.name
  # The implied V of the saved state is the one its own statistics give.
  cmp = v_estimate.compare(state, state, params)
  assert min(r["cos_v"] for r in cmp.values()) > 1 - 1e-9
  # Adam runs: an element-wise nu.
  full = v_estimate.estimate(model=model, params=params, tokens_nt=toks, batch_size=4,
                             min_dim_size_to_factor=32, factored=False)
  v_estimate.save(str(tmp_path / "a.npz"), full, factored=False)
  adam = v_estimate.load(str(tmp_path / "a.npz"))
  corrs = corr_lib.member_corrections(opt_state=adam, plan=plan, eps=1e-12)
  assert corr_lib.describe(corrs) == {"factored": 0, "full": len(plan.members)}


@pytest.mark.slow
def test_estimated_v_is_close_to_a_trained_adafactor_v():
  """On a model trained a few steps on the same data, the per-example estimate
  points the same way as the optimizer's V (positive statistics: a loose bound)."""
  c = helpers.tiny_config()
  model, params, opt_state = helpers.trained_state(c, steps=3)
  toks = helpers.random_tokens(8, 32, 512, seed=1)  # trained_state's batch.
  stats = v_estimate.estimate(model=model, params=params, tokens_nt=toks, batch_size=8,
                              min_dim_size_to_factor=32)
  cmp = v_estimate.compare(v_estimate.load_stats(stats, factored=True), opt_state, params)
  assert set(cmp) == set(_flat(params))
  assert np.median([r["cos_v"] for r in cmp.values()]) > 0.5


def test_sample_rows_are_seeded_sorted_and_capped():
  c = config_lib.base_config()
  c.gradients.v_estimate_samples = 10
  a, b = v_estimate.sample_rows(c, 100), v_estimate.sample_rows(c, 100)
  np.testing.assert_array_equal(a, b)
  assert len(a) == 10 and np.all(np.diff(a) > 0)
  assert len(v_estimate.sample_rows(c, 4)) == 4


def test_coverage_counts_add_up_to_the_parameter_count():
  c = helpers.tiny_config()
  params = model_lib.param_shapes(model_lib.Transformer(model_lib.model_config(c)), 32)
  total = model_lib.count_params(params)
  plan = proj.make_plan(param_shapes=params, pooling="block", k_in=4, k_out=4)
  cov = proj.coverage(plan, params)
  assert cov["total_params"] == total
  assert cov["attributed_params"] == total and cov["attributed_share"] == 1.0
  assert sum(r["params"] for r in cov["by_kind"].values()) == total
  assert cov["by_kind"]["embeddings"]["params"] == 512 * 64
  assert cov["by_kind"]["norms"]["params"] == 3 * 64
  assert cov["by_kind"]["head"]["params"] == 0
  assert cov["not_attributed"] == []
  # A plan without the norms: they are reported, with the reason; counts still add up.
  part = plan.restrict(lambda m: m.kind != proj.VECTOR)
  cov = proj.coverage(part, params)
  missing = sum(m["params"] for m in cov["not_attributed"])
  assert cov["attributed_params"] + missing == total
  assert missing == 3 * 64 and cov["by_kind"]["norms"]["attributed"] == 0
  assert {m["kind"] for m in cov["not_attributed"]} == {"norms"}
  assert all(m["reason"] for m in cov["not_attributed"])
  assert "coverage:" in proj.format_coverage(cov)


class _FakeCtx:
  """The context accessors the stage uses, over a tiny model and random corpus."""

  def __init__(self, config, tmp_path, model, params):
    self.config, self.workdir, self.checkpoint_step = config, str(tmp_path), 3
    self.trained = (model, types.SimpleNamespace(params=params), {})
    toks = helpers.random_tokens(6, 16, 512, seed=9)
    self.arrays = (types.SimpleNamespace(tokens_nt=toks, ids=[str(i) for i in range(6)]), None)
    self.corpus = toks  # len() is what the stage asks of it; rows come from corpus_rows.

  def corpus_rows(self, rows):
    return [self.arrays[0].ids[i] for i in rows], self.arrays[0].tokens_nt[rows]

  def upstream(self, *stages):
    return {s: "digest" for s in stages}

  def stage_dir(self, stage):
    return os.path.join(self.workdir, stage)


@pytest.mark.slow
def test_second_moments_stage_checkpoint_does_nothing_estimate_saves_v(tmp_path):
  c, model, params = _model()
  c = copy.deepcopy(c)
  ctx = _FakeCtx(c, tmp_path, model, params)
  out = tmp_path / "second_moments"
  out.mkdir()
  summary = sm_stage.run(ctx, str(out))
  assert summary["v_source"] == "checkpoint" and os.listdir(out) == []
  assert sm_stage.load(ctx) is None  # The engine reads the checkpoint's state.
  fp_ck = sm_stage.fingerprint(ctx)
  c.gradients.v_source = "estimate"
  c.gradients.v_estimate_samples = 4
  fp = sm_stage.fingerprint(ctx)
  assert fp["v_estimate_samples"] == 4 and fp["train_step"] == 3 and fp != fp_ck
  assert set(fp["upstream"]) == {"world", "vocab", "train"}
  summary = sm_stage.run(ctx, str(out))
  assert summary["samples"] == 4 and summary["factored_params"] == 15
  assert summary["full_params"] == 3 and summary["num_params"] == model_lib.count_params(params)
  assert isinstance(sm_stage.load(ctx), optax.FactoredState)
  c.gradients.v_source = "adam"
  with pytest.raises(ValueError, match="v_source"):
    sm_stage.fingerprint(ctx)

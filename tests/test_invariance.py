"""An example's vector does not depend on how it was batched: the batch size, the
length bucket (how much padding it ran with) and the number of devices the batch
was sharded over (1, 2 or 4 of the forced host devices) all give the same vector."""

import functools

import jax
import numpy as np
import pytest

from tda import correction as corr_lib
from tda import featurize
from tda import projection as proj
from tda import sharding
from tests import helpers

TOL = 1e-6


@functools.lru_cache(maxsize=None)
def _setup():
  c = helpers.tiny_config()
  model, params, opt_state = helpers.trained_state(c, steps=2)
  plan = proj.make_plan(param_shapes=params, pooling="block", k_in=8, k_out=8,
                        layers_per_block=1)
  mats = proj.plan_matrices(seed=3, plan=plan)
  corrs = corr_lib.member_corrections(opt_state=opt_state, plan=plan, eps=1e-12)
  toks = helpers.random_tokens(6, 32, 512, seed=7, min_len=5)
  return model, params, plan, mats, corrs, toks


def _vectors(*, batch_size, bucket, n_devices):
  model, params, plan, mats, corrs, toks = _setup()
  mesh = sharding.make_mesh(axes=(("data", -1), ("model", 1)),
                            devices=jax.devices()[:n_devices])
  feat = featurize.Featurizer(model=model, params=params, plan=plan, mats=mats, corrs=corrs,
                              mesh=mesh, batch_size=batch_size, bucket=bucket)
  return feat(tokens_nt=toks, mask_nt=(toks != 0).astype(np.float32),
              ids=[str(i) for i in range(len(toks))])


def _assert_same(a, b):
  for v in ("raw", "corrected"):
    scale = np.abs(a[v]).max(axis=1, keepdims=True)
    err = np.abs(a[v] - b[v]) / scale
    assert err.max() <= TOL, (v, err.max())
  np.testing.assert_allclose(a["loss"], b["loss"], rtol=TOL)


@pytest.mark.slow
@pytest.mark.parametrize("batch_size,bucket,n_devices", [
    (1, 32, 1),   # Batch size.
    (8, 32, 1),
    (4, 8, 1),    # Length bucket: each example at its own length rounded to 8.
    (4, 32, 2),   # Devices.
    (4, 32, 4),
    (8, 8, 4),    # All at once.
])
def test_vector_is_independent_of_batch_size_padding_and_device_count(
    batch_size, bucket, n_devices):
  assert jax.device_count() == 4
  ref = _vectors(batch_size=4, bucket=32, n_devices=1)
  _assert_same(_vectors(batch_size=batch_size, bucket=bucket, n_devices=n_devices), ref)

"""Tests for tda.batches: resumable training batches (no TensorFlow)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from tda import batches


@pytest.mark.parametrize("n,batch_size", [(12, 4), (10, 4), (3, 8)])
def test_batch_indices_cover_each_example_once_per_epoch(n, batch_size):
  epochs = 3
  steps = -(-epochs * n // batch_size)
  stream = np.concatenate([batches.batch_indices(n=n, step=s, batch_size=batch_size, seed=7)
                           for s in range(steps)])
  for e in range(epochs):
    assert sorted(stream[e * n:(e + 1) * n].tolist()) == list(range(n))
  # Epochs are reshuffled (not the same order every epoch).
  assert stream[:n].tolist() != stream[n:2 * n].tolist() or n < 4


def test_batch_at_is_a_pure_function_of_step_and_seed():
  tokens_nt = np.arange(40 * 5, dtype=np.int32).reshape(40, 5)
  a = batches.batch_at(tokens_nt=tokens_nt, step=13, batch_size=6, seed=1)
  b = batches.batch_at(tokens_nt=tokens_nt, step=13, batch_size=6, seed=1)
  np.testing.assert_array_equal(a, b)
  assert a.shape == (6, 5) and a.dtype == np.int32
  # Rows are whole rows of the corpus.
  assert all((r[0] % 5 == 0) and (r == np.arange(r[0], r[0] + 5)).all() for r in a)
  c = batches.batch_at(tokens_nt=tokens_nt, step=13, batch_size=6, seed=2)
  assert not np.array_equal(a, c)
  # seed+1 epoch 0 is not seed epoch 1 (no aliasing of the two).
  e1 = batches.batch_indices(n=40, step=40 // 8, batch_size=8, seed=1)
  e0 = batches.batch_indices(n=40, step=0, batch_size=8, seed=2)
  assert not np.array_equal(e0, e1)
  with pytest.raises(ValueError, match="step"):
    batches.batch_at(tokens_nt=tokens_nt, step=-1, batch_size=6, seed=1)


def test_length_grouped_batches_cover_each_example_once_per_epoch_and_resume():
  rng = np.random.default_rng(0)
  lengths = rng.integers(5, 120, size=50)
  nb = 50 // 4
  epoch0 = [batches.length_grouped_indices(lengths_n=lengths, step=s, batch_size=4, seed=3, group=3)
            for s in range(nb)]
  flat = np.concatenate(epoch0)
  assert len(set(flat.tolist())) == len(flat) == nb * 4  # No row twice within an epoch.
  spread = np.mean([np.ptp(lengths[b]) for b in epoch0])
  uniform = np.mean([np.ptp(lengths[batches.batch_indices(n=50, step=s, batch_size=4, seed=3)])
                     for s in range(nb)])
  assert spread < 0.6 * uniform  # Similar lengths per batch.
  again = batches.length_grouped_indices(lengths_n=lengths, step=7, batch_size=4, seed=3, group=3)
  np.testing.assert_array_equal(again, epoch0[7])  # A pure function of the step.


def test_importing_batches_does_not_load_tensorflow():
  code = "import sys, tda.batches; print('tensorflow' in sys.modules)"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True, cwd=root)
  assert out.stdout.strip() == "False"

"""Training: checkpoints restore exactly; a killed run resumes to the same params."""

import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from tda import train as train_lib
from tda import workdir as wd
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tree_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_checkpoint_save_restore_identical(tmp_path):
  c = helpers.tiny_config()
  model, params, opt_state = helpers.trained_state(c, steps=2)
  mngr = train_lib.checkpoint_manager(str(tmp_path / "ck"))
  train_lib.save(mngr, train_lib.TrainState(2, params, opt_state), {"note": "x"})
  tx = train_lib.make_optimizer(c)
  state, meta = train_lib.restore(mngr, train_lib.abstract_state(c, model, tx))
  assert state.step == 2 and meta["note"] == "x" and meta["step"] == 2
  _tree_equal(state.params, params)
  _tree_equal(state.opt_state, opt_state)  # The full optimizer state, V included.


_TRAIN_SCRIPT = r"""
import sys, numpy as np
sys.path.insert(0, {root!r})
from tests import helpers
from tda import train
c = helpers.tiny_config(**{{"train.steps": 12, "train.checkpoint_every": 3, "train.log_every": 3}})
toks = helpers.random_tokens(40, 32, 512, seed=1, min_len=8)
def on_step(s):
  print("STEP", s, flush=True)
  if {slow}:
    import time; time.sleep(0.3)
train.train(c, sys.argv[1], tokens_nt=toks, on_step=on_step)
print("DONE", flush=True)
"""


def _run_training(workdir, kill_after=None):
  script = _TRAIN_SCRIPT.format(root=ROOT, slow=kill_after is not None)
  env = {**os.environ, "XLA_FLAGS": ""}
  p = subprocess.Popen([sys.executable, "-c", script, workdir], stdout=subprocess.PIPE,
                       stderr=subprocess.DEVNULL, text=True, env=env)
  if kill_after is None:
    out, _ = p.communicate(timeout=300)
    assert "DONE" in out
    return
  for line in p.stdout:
    if line.startswith("STEP") and int(line.split()[1]) >= kill_after:
      p.send_signal(signal.SIGKILL)
      break
  p.wait(timeout=60)
  assert p.returncode == -signal.SIGKILL


@pytest.mark.slow  # Three training subprocesses.
def test_killed_training_resumes_to_same_params(tmp_path):
  full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
  _run_training(full)
  _run_training(killed, kill_after=7)  # Killed between the checkpoints at 6 and 9.
  assert train_lib.latest_step(killed) < 12
  _run_training(killed)  # Resumes from the last checkpoint.
  c = helpers.tiny_config(**{"train.steps": 12, "train.checkpoint_every": 3, "train.log_every": 3})
  _, a, _ = train_lib.load_trained(c, full)
  _, b, _ = train_lib.load_trained(c, killed)
  assert a.step == b.step == 12
  _tree_equal(a.params, b.params)
  _tree_equal(a.opt_state, b.opt_state)


@pytest.mark.slow  # Trains and checkpoints; tests/test_pipeline.py refuses end to end too.
def test_workdir_with_other_model_shape_is_refused(tmp_path):
  c = helpers.tiny_config(**{"train.steps": 2, "train.checkpoint_every": 1})
  toks = helpers.random_tokens(16, 32, 512, seed=1)
  w = str(tmp_path)
  train_lib.train(c, w, tokens_nt=toks)
  before = sorted(os.listdir(w))
  other = helpers.tiny_config(**{"train.steps": 2, "model.d_model": 96})
  with pytest.raises(wd.WorkdirConflict, match="d_model"):
    train_lib.train(other, w, tokens_nt=toks)
  with pytest.raises(wd.WorkdirConflict, match="d_model"):
    train_lib.load_trained(other, w)
  assert sorted(os.listdir(w)) == before

"""Small shared builders for tests: a tiny model, a few training steps, a context."""

import os
import subprocess
import sys

import jax
import numpy as np

from tda import config as config_lib
from tda import model as model_lib
from tda import train as train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tda(workdir, *overrides, config="configs/trackstar_tiny.py:runlocal", check=True,
            env=None, **popen_kwargs):
  """`python -m tda.run` in a subprocess on one CPU device; raises on failure if `check`."""
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", **(env or {})}
  p = subprocess.run([sys.executable, "-m", "tda.run", f"--config={config}",
                      f"--workdir={workdir}", *overrides], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=900, **popen_kwargs)
  if check and p.returncode != 0:
    raise AssertionError(f"tda.run failed:\n{p.stderr[-4000:]}")
  return p


def tiny_config(**overrides):
  c = config_lib.base_config()
  c.data.vocab_size = 512
  m = c.model
  m.d_model, m.n_layers, m.n_heads, m.head_dim, m.d_ff = 64, 2, 2, 32, 128
  c.train.min_dim_size_to_factor = 32
  c.train.batch_size = 8
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def random_tokens(n, t, vocab, seed=0, min_len=None):
  rng = np.random.default_rng(seed)
  toks = rng.integers(3, vocab, size=(n, t)).astype(np.int32)
  if min_len is not None:
    for i, l in enumerate(rng.integers(min_len, t + 1, size=n)):
      toks[i, l:] = 0
  return toks


def trained_state(config, steps=3, seq=32, seed=0):
  """(model, params, opt_state) after a few real optimizer steps on random data."""
  model = model_lib.Transformer(model_lib.model_config(config))
  tx = train_lib.make_optimizer(config)
  params = model_lib.init_params(model, jax.random.key(seed), seq)
  opt_state = tx.init(params)
  step = jax.jit(train_lib.make_train_step(model, tx))
  toks = random_tokens(8, seq, config.data.vocab_size, seed=seed + 1)
  for _ in range(steps):
    params, opt_state, _ = step(params, opt_state, toks)
  return model, params, opt_state


def context(config, workdir):
  """A pipeline context over `workdir`."""
  from tda import context as context_lib
  return context_lib.Context(config=config, workdir=str(workdir))


def file_snapshot(d, *, contents=False):
  """{relative path: mtime (and bytes, with `contents`)} of every file under `d`."""
  out = {}
  for root, _, files in os.walk(d):
    for name in files:
      p = os.path.join(root, name)
      mtime = os.stat(p).st_mtime_ns
      if contents:
        with open(p, "rb") as f:
          out[os.path.relpath(p, d)] = (mtime, f.read())
      else:
        out[os.path.relpath(p, d)] = mtime
  return out

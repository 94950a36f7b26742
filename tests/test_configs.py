"""Every config file loads, is locked, and the large shapes are what they claim."""

import glob
import importlib.util
import os

import jax
import pytest

from tda import model as model_lib
from tda import topology

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def load(path, arg=None):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod, mod.get_config(arg)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
@pytest.mark.parametrize("arg", [None, "runlocal"])
def test_config_loads_and_is_locked(path, arg):
  mod, c = load(path, arg)
  assert c.is_locked
  with pytest.raises(AttributeError):
    c.model.no_such_key = 1  # A mistyped override fails loudly.
  shapes = model_lib.param_shapes(model_lib.Transformer(model_lib.model_config(c)), 8)
  assert model_lib.count_params(shapes) > 0
  if hasattr(mod, "sweep"):
    for override in mod.sweep():
      for key in override:
        node = c
        for part in key.split("."):
          node = node[part]  # Every swept key exists.


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_plans_on_a_known_topology(path):
  _, c = load(path)
  assert topology.get(c.plan.topology).chips > 0


@pytest.mark.parametrize("name,target,tol", [("trackstar_8b", 8e9, 0.05),
                                             ("trackstar_1b", 1e9, 0.10),
                                             ("trackstar_154m", 154e6, 0.05)])
def test_large_configs_have_their_named_parameter_count(name, target, tol):
  _, c = load(os.path.join(ROOT, "configs", f"{name}.py"))
  model = model_lib.Transformer(model_lib.model_config(c))
  shapes = model_lib.param_shapes(model, 8)  # jax.eval_shape: nothing allocated.
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes))
  n = model_lib.count_params(shapes)
  assert abs(n - target) / target <= tol, n

"""Attributing an existing model (`model.checkpoint`): the train stage adopts the
checkpoint instead of training, every model-reading stage uses it, another
checkpoint in the same workdir is refused, and bad checkpoints are clear errors."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tda import config as config_lib
from tda import model as model_lib
from tda import pipeline
from tda import train as train_lib
from tda import workdir as wd
from tda.stages import train as train_stage
from tests import helpers
from tests import test_pipeline


def _save_checkpoint(path, config, steps=(2, 3), seed=0):
  """Orbax checkpoints of a tiny model at `steps`, laid out as the train stage writes them."""
  model, params, opt_state = helpers.trained_state(config, steps=1, seed=seed)
  mngr = train_lib.checkpoint_manager(str(path), max_to_keep=None)
  meta = {"model": dataclasses.asdict(model_lib.model_config(config))}
  saved = {}
  for s in steps:
    params = jax.tree.map(lambda x: x + 0.01, params)
    train_lib.save(mngr, train_lib.TrainState(s, params, opt_state), meta)
    saved[s] = params
  return saved


def _config(checkpoint=None, **overrides):
  c = helpers.tiny_config(**overrides)
  c.model.checkpoint = None if checkpoint is None else str(checkpoint)
  return config_lib.finalize(c)


def _with(config, **model):
  c = config.copy_and_resolve_references()
  for k, v in model.items():
    setattr(c.model, k, v)
  return config_lib.finalize(c)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  path = tmp_path_factory.mktemp("external") / "checkpoints"
  saved = _save_checkpoint(path, helpers.tiny_config())
  return path, saved


def test_train_stage_adopts_the_checkpoint_and_writes_none(ckpt, tmp_path):
  path, saved = ckpt
  before = helpers.file_snapshot(path)
  ctx = helpers.context(_config(path), tmp_path)
  assert pipeline.run_stage(ctx, train_stage)
  assert sorted(os.listdir(tmp_path / "train")) == ["COMMITTED.json", "summary.json"]
  ext = ctx.summary("train")["external_checkpoint"]
  assert ext["path"] == str(path) and ext["step"] == 3 and ext["format"] == "orbax"
  assert len(ext["structure_sha256"]) == 16
  assert ctx.checkpoint_dir == str(path)
  assert ctx.checkpoint_steps == [2, 3] and ctx.checkpoint_step == 3
  _, state, _ = ctx.trained
  assert state.step == 3
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(saved[3])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not pipeline.run_stage(helpers.context(_config(path), tmp_path), train_stage)  # Skipped.
  assert helpers.file_snapshot(path) == before  # The external checkpoint is only read.


def test_chosen_step_bounds_the_steps_later_stages_see(ckpt, tmp_path):
  path, saved = ckpt
  ctx = helpers.context(_with(_config(path), checkpoint_step=2), tmp_path)
  pipeline.run_stage(ctx, train_stage)
  assert ctx.checkpoint_step == 2 and ctx.checkpoint_steps == [2]
  _, state, _ = ctx.trained
  np.testing.assert_array_equal(np.asarray(jax.tree.leaves(state.params)[0]),
                                np.asarray(jax.tree.leaves(saved[2])[0]))


def test_another_checkpoint_in_the_same_workdir_is_refused(ckpt, tmp_path):
  path, _ = ckpt
  pipeline.run_stage(helpers.context(_config(path), tmp_path), train_stage)
  before = helpers.file_snapshot(tmp_path)
  with pytest.raises(wd.WorkdirConflict, match=r"differs in: .*external_checkpoint\.step"):
    pipeline.run_stage(helpers.context(_with(_config(path), checkpoint_step=2), tmp_path), train_stage)
  copy = tmp_path.parent / f"{tmp_path.name}_copy"
  shutil.copytree(path, copy)
  with pytest.raises(wd.WorkdirConflict, match=r"external_checkpoint\.path"):
    pipeline.run_stage(helpers.context(_config(copy), tmp_path), train_stage)
  other = tmp_path.parent / f"{tmp_path.name}_other"
  _save_checkpoint(other, helpers.tiny_config(**{"model.d_ff": 256}), steps=(3,))
  with pytest.raises(wd.WorkdirConflict, match=r"external_checkpoint\.structure_sha256"):
    pipeline.run_stage(helpers.context(_config(other, **{"model.d_ff": 256}), tmp_path), train_stage)
  # Later stages refuse to read a train stage committed from another checkpoint.
  with pytest.raises(wd.WorkdirConflict, match="refusing to mix"):
    helpers.context(_config(copy), tmp_path).checkpoint_dir
  with pytest.raises(wd.WorkdirConflict, match="refusing to mix"):
    helpers.context(_config(), tmp_path).checkpoint_dir
  assert helpers.file_snapshot(tmp_path) == before


def test_shape_mismatch_names_the_first_leaf_and_both_shapes(ckpt, tmp_path):
  path, _ = ckpt
  with pytest.raises(train_lib.CheckpointMismatch,
                     match=r"first mismatching leaf 'params/layer_0/mlp/\w+/kernel': "
                           r"checkpoint shape \([\d, ]+\) vs config shape \([\d, ]+\)"):
    pipeline.run_stage(helpers.context(_config(path, **{"model.d_ff": 96}), tmp_path), train_stage)
  assert not os.path.exists(tmp_path / "train")
  have = {"params/a": ((2, 3), "float32"), "params/b": ((4,), "float32")}
  want = {"params/a": ((2, 3), "float32"), "params/b": ((5,), "float32")}
  with pytest.raises(train_lib.CheckpointMismatch,
                     match=r"'params/b': checkpoint shape \(4,\) vs config shape \(5,\)"):
    train_lib.check_tree_shapes(have=have, want=want, where="x")
  with pytest.raises(train_lib.CheckpointMismatch, match=r"'params/c'.*\(absent\)"):
    train_lib.check_tree_shapes(have=have, want={**have, "params/c": ((1,), "float32")},
                                where="x")
  # The shape check also guards every restore.
  with pytest.raises(train_lib.CheckpointMismatch, match="first mismatching leaf"):
    train_lib.check_tree_shapes(have=train_lib.checkpoint_leaf_shapes(path, 3),
                                want=train_lib.config_leaf_shapes(
                                    helpers.tiny_config(**{"model.d_ff": 96})), where="x")


def test_checkpoint_tree_shapes_match_the_config_without_loading(ckpt):
  path, _ = ckpt
  have = train_lib.checkpoint_leaf_shapes(path, 3)
  assert have == train_lib.config_leaf_shapes(helpers.tiny_config())
  assert "params/embed/embedding" in have


def test_missing_step_lists_the_available_ones(ckpt, tmp_path):
  path, _ = ckpt
  with pytest.raises(FileNotFoundError, match=r"step 7 .*available steps: \[2, 3\]"):
    pipeline.run_stage(helpers.context(_with(_config(path), checkpoint_step=7), tmp_path), train_stage)
  with pytest.raises(FileNotFoundError, match=r"available steps: \[2, 3\]"):
    train_lib.load_trained(helpers.tiny_config(), str(path), 7)
  assert not os.path.exists(tmp_path / "train")


def test_no_checkpoint_or_unreadable_one_names_the_supported_formats(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="holds no checkpoint.*supported formats: orbax"):
    pipeline.run_stage(helpers.context(_config(empty), tmp_path / "w1"), train_stage)
  with pytest.raises(FileNotFoundError, match="not a folder.*supported formats: orbax"):
    pipeline.run_stage(helpers.context(_config(tmp_path / "nowhere"), tmp_path / "w2"), train_stage)
  junk = tmp_path / "junk"
  (junk / "5" / "state").mkdir(parents=True)
  (junk / "5" / "state" / "weights.bin").write_bytes(b"\0" * 16)
  with pytest.raises(ValueError, match="cannot read a checkpoint tree.*supported formats: orbax"):
    pipeline.run_stage(helpers.context(_config(junk), tmp_path / "w3"), train_stage)
  assert not os.path.exists(tmp_path / "nowhere")
  for w in ("w1", "w2", "w3"):
    assert not os.path.exists(tmp_path / w / "train")


def test_unsupported_format_lists_the_supported_ones(ckpt, tmp_path):
  path, _ = ckpt
  with pytest.raises(ValueError, match=r"checkpoint_format='safetensors' is not supported; "
                                       r"supported formats: orbax"):
    pipeline.run_stage(helpers.context(_with(_config(path), checkpoint_format="safetensors"), tmp_path),
                       train_stage)


def _proponents(workdir):
  path = os.path.join(workdir, "results", "proponents", "trackstar.jsonl")
  return [(r["example_id"], r["proponent_ids"]) for r in map(json.loads, open(path))]


@pytest.mark.slow
def test_attributing_a_finished_runs_checkpoint_reproduces_it(default_run, tmp_path):
  # The session's default run is the finished run; a second run attributes its
  # checkpoint (with its vocabulary) for two of its methods and must give the same.
  w, w2 = default_run, str(tmp_path / "W2")
  before = helpers.file_snapshot(w)
  test_pipeline.run_tda(
      w2, "--config.eval.methods=('trackstar','bm25')", "--config.trend.sizes=()",
      f"--config.model.checkpoint={w}/train/checkpoints",
      f"--config.data.vocab_path={w}/vocab/spm.model")
  assert sorted(os.listdir(os.path.join(w2, "train"))) == ["COMMITTED.json", "summary.json"]
  assert helpers.file_snapshot(w) == before  # Nothing in the first run was touched.
  assert _proponents(w2) == _proponents(w)
  m1, m2 = (json.load(open(os.path.join(d, "results", "metrics.json"))) for d in (w, w2))
  assert m2["methods"]["trackstar"]["mrr"] == m1["methods"]["trackstar"]["mrr"]
  assert m2["methods"]["bm25"]["mrr"] == m1["methods"]["bm25"]["mrr"]


def test_params_only_checkpoint_needs_estimated_v_and_gets_a_fresh_optimizer_state(tmp_path):
  config = helpers.tiny_config()
  model, params, _ = helpers.trained_state(config, steps=1)
  mngr = train_lib.checkpoint_manager(str(tmp_path / "ck"), max_to_keep=None)
  mngr.save(4, args=ocp.args.Composite(
      state=ocp.args.StandardSave({"params": params}),
      meta=ocp.args.JsonSave({"model": dataclasses.asdict(model.cfg), "step": 4})))
  mngr.wait_until_finished()
  with pytest.raises(train_lib.CheckpointMismatch, match="v_source='estimate'"):
    train_lib.load_trained(_config(tmp_path / "ck"), str(tmp_path / "ck"))
  estimate = _config(tmp_path / "ck", **{"gradients.v_source": "estimate"})
  assert train_stage.fingerprint(helpers.context(estimate, tmp_path / "w"))["external_checkpoint"]["step"] == 4
  _, state, _ = train_lib.load_trained(estimate, str(tmp_path / "ck"))
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  fresh = train_lib.make_optimizer(estimate).init(params)
  assert jax.tree.structure(state.opt_state) == jax.tree.structure(fresh)

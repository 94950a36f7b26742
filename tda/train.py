"""Training: optax Adafactor (factored V, as the paper's models) or Adam,
orbax checkpoints holding params, the full optimizer state, the step and the data
position, and exact resume after interruption.

The data position is the step: `tda.batches.batch_at(step=...)` is a pure function of
(step, seed), so a resumed run sees exactly the batches the uninterrupted run saw.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath

from tda import batches
from tda import errors
from tda import faults
from tda import fs
from tda import model as model_lib
from tda import progress
from tda import sharding
from tda import workdir as wd


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The training optimizer (also used by tail-patching, with its own LR)."""
  t = config.train
  return make_optimizer_from(optimizer=t.optimizer, learning_rate=lr_schedule(config),
                             train=t)


def make_optimizer_from(*, optimizer: str, learning_rate, train) -> optax.GradientTransformation:
  chain = []
  if train.grad_clip:
    chain.append(optax.clip_by_global_norm(train.grad_clip))
  if optimizer == "adafactor":
    chain.append(optax.adafactor(
        learning_rate=learning_rate,
        min_dim_size_to_factor=train.min_dim_size_to_factor,
        decay_rate=train.adafactor_decay_rate,
        multiply_by_parameter_scale=False,
        clipping_threshold=1.0,
        weight_decay_rate=train.weight_decay or None))
  elif optimizer == "adam":
    chain.append(optax.adamw(learning_rate, b1=train.adam_b1, b2=train.adam_b2,
                             eps=train.adam_eps, weight_decay=train.weight_decay))
  else:
    raise ValueError(f"train.optimizer must be 'adafactor' or 'adam', got {optimizer!r}")
  return optax.chain(*chain)


def lr_schedule(config: ml_collections.ConfigDict):
  t = config.train
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.learning_rate, warmup_steps=max(1, t.warmup_steps),
      decay_steps=max(t.steps, t.warmup_steps + 1), end_value=0.1 * t.learning_rate)


@flax.struct.dataclass
class TrainState:
  step: int = flax.struct.field(pytree_node=False)
  params: Any
  opt_state: Any


def fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What a training run's checkpoints depend on."""
  return {"model": model_lib.config_record(model_lib.model_config(config)),
          "train": config.train.to_dict(), "seed": config.seed,
          "data.seq_len": config.data.seq_len}


def checkpoint_manager(path: str, *, max_to_keep: int | None = 2,
                       cleanup_tmp: bool = False) -> ocp.CheckpointManager:
  """Orbax's manager of a local or gs:// folder; `cleanup_tmp` (the writer's) removes
  steps a killed save left unfinalized."""
  return ocp.CheckpointManager(
      fs.abspath(path),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           cleanup_tmp_directories=cleanup_tmp))


def save(mngr: ocp.CheckpointManager, state: TrainState, meta: dict[str, Any]) -> None:
  mngr.save(state.step, args=ocp.args.Composite(
      state=ocp.args.StandardSave({"params": state.params, "opt_state": state.opt_state}),
      meta=ocp.args.JsonSave({**meta, "step": state.step})))
  mngr.wait_until_finished()
  faults.point("train", "checkpoint")


def restore(mngr: ocp.CheckpointManager, abstract_state: TrainState,
            step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
  step = mngr.latest_step() if step is None else step
  target = {"params": abstract_state.params, "opt_state": abstract_state.opt_state}
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
  return TrainState(step=step, params=out.state["params"],
                    opt_state=out.state["opt_state"]), out.meta


def read_meta(mngr: ocp.CheckpointManager, step: int | None = None) -> dict[str, Any]:
  step = mngr.latest_step() if step is None else step
  return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def make_train_step(model: model_lib.Transformer, tx: optax.GradientTransformation):
  """(params, opt_state, tokens_bt) -> (params, opt_state, mean token loss)."""

  def loss_fn(params, tokens_bt):
    nll_b = model_lib.example_losses(model, {"params": params}, tokens_bt)
    return jnp.sum(nll_b) / jnp.maximum(jnp.sum(tokens_bt[:, 1:] != 0), 1)

  def step_fn(params, opt_state, tokens_bt):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens_bt)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step_fn


def init_state(config, model, tx) -> TrainState:
  params = model_lib.init_params(model, jax.random.key(config.seed), config.data.seq_len)
  return TrainState(step=0, params=params, opt_state=tx.init(params))


def abstract_state(config, model, tx) -> TrainState:
  return jax.eval_shape(lambda: init_state(config, model, tx))


def available_steps(checkpoint_dir: str) -> list[int]:
  """Steps of all finalized checkpoints.

  Read from the folder names (locally orbax finalizes a step by renaming its temp
  folder to the step number; on gs:// the step folder gets `commit_success.txt`
  last, which orbax's `is_path_finalized` checks), not through a
  CheckpointManager, whose creation is a collective in multi-process jobs: any
  one process may ask.
  """
  return sorted(int(n) for n in fs.listdir(checkpoint_dir) if n.isdigit() and (
      not fs.is_remote(checkpoint_dir)
      or ocp.step.is_path_finalized(os.path.join(checkpoint_dir, n))))


def latest_step(checkpoint_dir: str) -> int | None:
  """Step of the newest checkpoint (None when there is none)."""
  steps = available_steps(checkpoint_dir)
  return steps[-1] if steps else None


def load_trained(config: ml_collections.ConfigDict, checkpoint_dir: str,
                 step: int | None = None):
  """Restores (model, TrainState, meta) from the checkpoints in `checkpoint_dir`.

  Params and optimizer state come back as jax.Arrays sharded by
  `tda.sharding.param_shardings` over this process's mesh (`sharding.process_mesh`).
  `checkpoint_dir` may be the run's Hugging Face folder (`model.checkpoint` with
  `model.checkpoint_format='hf_llama'`): params only, a fresh optimizer state.
  """
  model = model_lib.Transformer(model_lib.model_config(config))
  tx = make_optimizer(config)
  if (config.model.checkpoint and config.model.checkpoint_format == "hf_llama"
      and fs.abspath(checkpoint_dir) == fs.abspath(config.model.checkpoint)):
    return _load_hf(config, checkpoint_dir, model, tx, sharding.process_mesh(config))
  mngr = checkpoint_manager(checkpoint_dir, max_to_keep=None)
  if mngr.latest_step() is None:
    raise errors.MissingInput(f"no checkpoint in {checkpoint_dir}; run the train stage")
  step = resolve_step(checkpoint_dir, step)
  _check_checkpoint_shape(config, read_meta(mngr, step), checkpoint_dir)
  have, where = checkpoint_leaf_shapes(checkpoint_dir, step), step_dir(checkpoint_dir, step)
  params_only = not has_optimizer_state(have)
  check_tree_shapes(have=have, where=where,
                    want=expected_leaf_shapes(config, params_only=params_only, where=where))
  # Straight into the sharding rules' layout (tda.sharding.PARAM_RULES) on this
  # process's mesh, the one its featurisation runs on: no device ever holds a
  # replica, and the arrays stay sharded jax.Arrays.
  mesh = sharding.process_mesh(config)
  abstract = abstract_state(config, model, tx)
  shardings = sharding.param_shardings(abstract, mesh, params=abstract.params,
                                       strict=sharding.strict(config))
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract, shardings)
  if not params_only:
    state, meta = restore(mngr, target, step)
    return model, state, meta
  # Params only (V estimated or no correction): the optimizer state is a fresh
  # `tx.init`, laid out like a restored one; tail-patching steps from it.
  logging.warning("%s holds no optimizer state: tail-patching starts from a freshly "
                  "initialised %s state", where, config.train.optimizer)
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore({"params": target.params}),
      meta=ocp.args.JsonRestore()))
  params = out.state["params"]
  opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
  return model, TrainState(step=step, params=params, opt_state=opt_state), out.meta


def _check_checkpoint_shape(config, meta: dict[str, Any], where: str) -> None:
  want = model_lib.from_record(model_lib.config_record(model_lib.model_config(config)))
  have = model_lib.from_record(meta.get("model", {}))
  diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
  if diff:
    detail = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
    raise wd.WorkdirConflict(
        f"the checkpoint in {where} is of a different model ({detail}); refusing to "
        "restore or overwrite it: use another --workdir.")


# --- Checks on a checkpoint before restoring it (also an external one) ----------

CHECKPOINT_FORMATS = ("orbax", "hf_llama")
_ORBAX_LAYOUT = ("orbax: <checkpoint>/<step>/ with items 'state' = {'params', 'opt_state'} "
                 "(StandardSave) and 'meta' (JsonSave, holding 'model' = the model config)")


class CheckpointMismatch(errors.UserError):
  """A checkpoint's tree does not fit the model and optimizer the config builds."""


def check_checkpoint_format(fmt: str) -> None:
  """Raises unless `fmt` (`model.checkpoint_format`) is a supported format."""
  if fmt not in CHECKPOINT_FORMATS:
    raise errors.UserError(f"model.checkpoint_format={fmt!r} is not supported; supported "
                     f"formats: {', '.join(CHECKPOINT_FORMATS)}")


def step_dir(checkpoint_dir: str, step: int) -> str:
  return os.path.join(fs.abspath(checkpoint_dir), str(step))


def resolve_step(checkpoint_dir: str, step: int | None) -> int:
  """`step`, or the newest one when None; a step not saved lists the available ones."""
  steps = available_steps(checkpoint_dir)
  if not steps:
    raise errors.MissingInput(
        f"{checkpoint_dir} holds no checkpoint (no <step>/ folder); supported formats: "
        f"{_ORBAX_LAYOUT}")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise errors.MissingInput(f"checkpoint step {step} is not in {checkpoint_dir}; "
                            f"available steps: {steps}")
  return step


def _path_str(path) -> str:
  """'params/layer_0/attn/q/kernel' for a jax key path (dict keys, fields, indices)."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def leaf_shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """{leaf path: (shape, dtype name)} of a tree of arrays, abstract arrays or
  orbax array metadata, in sorted path order."""
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return dict(sorted((_path_str(p), (tuple(int(d) for d in x.shape), np.dtype(x.dtype).name))
                     for p, x in leaves))


def config_leaf_shapes(config: ml_collections.ConfigDict) -> dict[str, tuple[tuple[int, ...], str]]:
  """Leaf shapes of the {params, opt_state} tree the config's model and optimizer build."""
  model = model_lib.Transformer(model_lib.model_config(config))
  state = abstract_state(config, model, make_optimizer(config))
  return leaf_shapes({"params": state.params, "opt_state": state.opt_state})


def checkpoint_leaf_shapes(checkpoint_dir: str,
                           step: int) -> dict[str, tuple[tuple[int, ...], str]]:
  """Leaf shapes of the saved `state` item, read from orbax's tree metadata (no arrays
  are loaded); an unreadable folder names the supported formats."""
  where = os.path.join(step_dir(checkpoint_dir, step), "state")
  try:
    tree = ocp.StandardCheckpointHandler().metadata(epath.Path(where))
    return leaf_shapes(getattr(tree, "tree", tree))
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"cannot read a checkpoint tree in {where} ({type(e).__name__}: {e}); "
                     f"supported formats: {_ORBAX_LAYOUT}") from e


def read_step_meta(checkpoint_dir: str, step: int) -> dict[str, Any]:
  """The `meta` item of one step (read from its file: no CheckpointManager, no barrier)."""
  where = os.path.join(step_dir(checkpoint_dir, step), "meta")
  try:
    # The handler alone: a Checkpointer's restore is a barrier across processes, and
    # this runs on one (the train stage's leader) as well as on all (fingerprints).
    return ocp.JsonCheckpointHandler().restore(epath.Path(where), args=ocp.args.JsonRestore())
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"cannot read the checkpoint's meta in {where} ({type(e).__name__}: "
                     f"{e}); supported formats: {_ORBAX_LAYOUT}") from e


def structure_hash(shapes: dict[str, tuple[tuple[int, ...], str]]) -> str:
  """A short hash of a tree's leaf paths, shapes and dtypes (`leaf_shapes`)."""
  blob = json.dumps([[p, list(s), d] for p, (s, d) in sorted(shapes.items())]).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def has_optimizer_state(shapes: dict[str, tuple[tuple[int, ...], str]]) -> bool:
  """Whether a checkpoint tree (`leaf_shapes`) holds an optimizer state."""
  return any(p.startswith("opt_state/") for p in shapes)


def expected_leaf_shapes(config: ml_collections.ConfigDict, *, params_only: bool,
                         where: str) -> dict[str, tuple[tuple[int, ...], str]]:
  """The leaves a checkpoint must hold for this config: params and optimizer state,
  or params alone when V is estimated (`gradients.v_source='estimate'`) or the
  correction is off.

  Raises:
    CheckpointMismatch: a params-only checkpoint where the V correction needs the
      optimizer's second moments.
  """
  want = config_leaf_shapes(config)
  if not params_only:
    return want
  g = config.gradients
  if g.correction and g.v_source != "estimate":
    raise CheckpointMismatch(
        f"the checkpoint in {where} holds params but no optimizer state, and the V "
        "correction reads V from it: set gradients.v_source='estimate' (V from squared "
        "per-example gradients over a corpus sample) or gradients.correction=False.")
  return {p: v for p, v in want.items() if p.startswith("params/")}


def check_tree_shapes(*, have: dict[str, tuple[tuple[int, ...], str]],
                      want: dict[str, tuple[tuple[int, ...], str]], where: str) -> None:
  """Raises CheckpointMismatch naming the first leaf (params before optimizer state,
  each in path order) whose shape differs between the checkpoint (`have`) and the
  config (`want`), or that only one of them has."""
  for path in sorted(set(have) | set(want), key=lambda p: (not p.startswith("params/"), p)):
    a = have[path][0] if path in have else None
    b = want[path][0] if path in want else None
    if a != b:
      raise CheckpointMismatch(
          f"the checkpoint in {where} does not fit the config: first mismatching leaf "
          f"'{path}': checkpoint shape {a if a is not None else '(absent)'} vs config "
          f"shape {b if b is not None else '(absent)'}; set model.* (and train.optimizer "
          f"and its options) to the checkpoint's model.")


def describe_checkpoint(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Checks the external checkpoint `model.checkpoint` against the config, without
  loading arrays, and returns what identifies it: absolute path, step, format, the
  hash of its tree's structure, shapes and dtypes, and when that step was committed.

  Raises:
    ValueError: unsupported format, or a folder that is not a readable checkpoint.
    FileNotFoundError: no checkpoint in the folder, or `model.checkpoint_step` is
      not one of its steps (the message lists them).
    CheckpointMismatch: a leaf's shape differs from the config's (first one named).
    WorkdirConflict: the checkpoint's meta records another model config.
  """
  m = config.model
  check_checkpoint_format(m.checkpoint_format)
  path = fs.abspath(m.checkpoint)
  if m.checkpoint_format == "hf_llama":
    return _describe_hf(config)
  if not fs.isdir(path):
    raise errors.MissingInput(f"model.checkpoint={m.checkpoint!r} is not a folder; supported "
                            f"formats: {_ORBAX_LAYOUT}")
  step = resolve_step(path, m.checkpoint_step)
  have = checkpoint_leaf_shapes(path, step)
  where = step_dir(path, step)
  check_tree_shapes(have=have, where=where, want=expected_leaf_shapes(
      config, params_only=not has_optimizer_state(have), where=where))
  _check_checkpoint_shape(config, read_step_meta(path, step), step_dir(path, step))
  committed_at = None
  marker = os.path.join(step_dir(path, step), "_CHECKPOINT_METADATA")
  if fs.exists(marker):
    committed_at = wd.read_json(marker).get("commit_timestamp_nsecs")
  return {"path": path, "step": step, "format": m.checkpoint_format,
          "structure_sha256": structure_hash(have), "commit_timestamp_nsecs": committed_at}


def _describe_hf(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """`describe_checkpoint` of a Hugging Face folder (`tda.hf_checkpoint.describe_folder`);
  it holds params only, so V must be estimated or the correction off."""
  from tda import hf_checkpoint  # pylint: disable=g-import-not-at-top
  m = config.model
  if m.checkpoint_step not in (None, 0):
    raise ValueError(f"model.checkpoint_step={m.checkpoint_step}: a Hugging Face folder "
                     "holds one model (leave model.checkpoint_step unset)")
  out = hf_checkpoint.describe_folder(config)
  expected_leaf_shapes(config, params_only=True, where=out["path"])  # V's source.
  return out


def _load_hf(config: ml_collections.ConfigDict, folder: str, model, tx, mesh):
  """`load_trained` of a Hugging Face folder: params read into the sharding rules'
  NamedShardings (`tda.hf_checkpoint.load_params(shardings=...)`), a fresh optimizer
  state laid out like a restored one, step 0."""
  from tda import hf_checkpoint  # pylint: disable=g-import-not-at-top
  expected_leaf_shapes(config, params_only=True, where=folder)  # V's source.
  abstract = abstract_state(config, model, tx)
  shardings = sharding.param_shardings(abstract, mesh, params=abstract.params,
                                       strict=sharding.strict(config))
  params = hf_checkpoint.load_params(folder, model.cfg, shardings=shardings.params)
  logging.warning("%s holds no optimizer state: tail-patching starts from a freshly "
                  "initialised %s state", folder, config.train.optimizer)
  opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
  meta = {"model": model_lib.config_record(model.cfg), "format": "hf_llama", "step": 0}
  return model, TrainState(step=0, params=params, opt_state=opt_state), meta


def train(config: ml_collections.ConfigDict, checkpoint_dir: str, *,
          tokens_nt: np.ndarray,
          on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
  """Trains (or resumes training from the newest checkpoint) and returns a summary.

  Args:
    config: the run config.
    checkpoint_dir: the orbax checkpoints' folder (resumed when it holds some; a
      checkpoint of another model shape is refused).
    tokens_nt: the tokenised corpus [N, seq_len] (0 = pad).
    on_step: optional callback after each step (tests use it).

  Returns:
    Summary dict: steps, epochs (examples seen / corpus size), final loss, wall
    time, tokens/s.
  """
  t = config.train
  model = model_lib.Transformer(model_lib.model_config(config))
  tx = make_optimizer(config)
  mngr = checkpoint_manager(checkpoint_dir, max_to_keep=t.max_to_keep, cleanup_tmp=True)
  mesh = sharding.make_mesh(config)
  if mngr.latest_step() is not None:
    _check_checkpoint_shape(config, read_meta(mngr), checkpoint_dir)
    state, meta = restore(mngr, abstract_state(config, model, tx))
    logging.info("resumed training at step %d (data position %d examples)",
                 state.step, meta.get("data_position", -1))
  else:
    state = init_state(config, model, tx)

  meta = {"model": model_lib.config_record(model.cfg), "optimizer": t.optimizer,
          "batch_size": t.batch_size, "seed": config.seed}
  step_fn = jax.jit(make_train_step(model, tx), donate_argnums=(0, 1))
  batch_sharding = sharding.batch_sharding(mesh, 2)
  # Placed as the step returns them (replicated over the mesh): a fresh or restored
  # state in another placement would compile the first batch length twice.
  params, opt_state = jax.device_put((state.params, state.opt_state), sharding.replicated(mesh))
  t0, start_step, loss = time.time(), state.step, float("nan")
  tokens_seen = 0
  bar = progress.start(total=t.steps - state.step, desc="train", unit="step")
  for step in range(state.step, t.steps):
    batch = batches.batch_at(tokens_nt=tokens_nt, step=step, batch_size=t.batch_size,
                             seed=config.seed, length_group=t.length_group)
    # Trailing padding changes nothing in a causal LM: drop it, at a few lengths.
    batch = batch[:, :int(model_lib.bucket_lengths(np.array([(batch != 0).sum(1).max()]),
                                         multiple=32, max_len=batch.shape[1])[0])]
    tokens_seen += int((batch != 0).sum())
    params, opt_state, loss_arr = step_fn(params, opt_state,
                                          jax.device_put(batch, batch_sharding))
    done = step + 1
    if done % t.log_every == 0 or done == t.steps:
      loss = float(loss_arr)
      logging.debug("step %d loss %.4f (%.0f tok/s)", done, loss,
                    tokens_seen / max(time.time() - t0, 1e-9))
      bar.set_postfix(loss=f"{loss:.4f}")
    if done % t.checkpoint_every == 0 or done == t.steps:
      save(mngr, TrainState(done, params, opt_state),
           {**meta, "data_position": done * t.batch_size, "loss": float(loss_arr)})
    if on_step is not None:
      on_step(done)
    bar.update(1)
  bar.close()
  wall = time.time() - t0
  return {"steps": t.steps, "epochs": t.steps * t.batch_size / max(len(tokens_nt), 1),
          "resumed_from": start_step, "final_loss": float(loss),
          "wall_s": wall, "tokens_per_s": tokens_seen / max(wall, 1e-9)}

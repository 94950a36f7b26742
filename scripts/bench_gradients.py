"""Gradient-kernel benchmark, measured side by side in one process.

    python scripts/bench_gradients.py [--config=configs/trackstar_tiny.py] [--json]

On the default tiny model and gradient batch (random tokens filling the whole
sequence, so no padding flatters anyone), times per example:
  * one plain training step (forward + backward + Adafactor update),
  * the factored kernel (both the raw and the corrected variant, as the default
    pipeline computes them; and the corrected variant alone),
  * the reference kernel (vmap of grad, materialised per-example gradients),
interleaved A/B/C rounds (these machines are shared and noisy; the median of the
rounds is reported). Peak memory is XLA's own account of each compiled program
(`memory_analysis()`: arguments + outputs + temporaries).

Prints `factored_over_train_step` (goal <= 0.9) and `reference_over_factored`
(goal >= 20 at the default d).
"""

from __future__ import annotations

import time

from absl import app
from absl import flags
from ml_collections import config_flags

from tda import cli

_CONFIG = config_flags.DEFINE_config_file("config", "configs/trackstar_tiny.py",
                                          "Experiment config (model and gradient settings).")
_JSON = cli.define_json_flag()
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved timing rounds.")
_SEQ = flags.DEFINE_integer("seq_len", 128, "Tokens per example.")


def _peak_bytes(jitted, *args) -> int:
  m = jitted.lower(*args).compile().memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)


def measure() -> dict:
  """Times and peak memory of each kernel; the figures `main` reports."""
  import jax
  import numpy as np
  from tda import correction as corr_lib
  from tda import featurize
  from tda import gradients as grad_lib
  from tda import model as model_lib
  from tda import projection as proj
  from tda import train as train_lib

  config = _CONFIG.value
  g = config.gradients
  b, t = g.batch_size, _SEQ.value
  model = model_lib.Transformer(model_lib.model_config(config))
  tx = train_lib.make_optimizer(config)
  params = model_lib.init_params(model, jax.random.key(0), t)
  opt_state = tx.init(params)
  rng = np.random.default_rng(0)
  vocab = model.cfg.vocab_size
  tokens = rng.integers(3, vocab, size=(b, t)).astype(np.int32)
  mask = np.ones((b, t), np.float32)

  step = jax.jit(train_lib.make_train_step(model, tx))
  for _ in range(3):  # A real (non-zero) Adafactor state.
    params, opt_state, _ = step(params, opt_state, tokens)

  plan = featurize.plan_from_config(config, params)
  mats = proj.plan_matrices(seed=g.seed, plan=plan)
  corrs = corr_lib.member_corrections(opt_state=opt_state, plan=plan, eps=g.eps)
  factored = jax.jit(grad_lib.make_factored_kernel(model=model, plan=plan, has_corrections=True))
  corrected_only = jax.jit(grad_lib.make_factored_kernel(
      model=model, plan=plan, has_corrections=True, variants=("corrected",)))
  reference = jax.jit(grad_lib.make_reference_kernel(model=model, plan=plan,
                                                     has_corrections=True))

  def forward(params, tokens_bt, mask_bt):
    return model_lib.example_losses(model, {"params": params}, tokens_bt, mask_bt)

  def activation_grads(params, tokens_bt, mask_bt):
    """Forward + backward to the layer outputs only: the factored kernel minus projection."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens_bt[:, :-1]))
    perts = jax.tree.map(lambda x: jax.numpy.zeros(x.shape, x.dtype), shapes["perturbations"])
    def loss(perts):
      nll, st = model_lib.example_losses(model, {"params": params, "perturbations": perts},
                                         tokens_bt, mask_bt, mutable=["intermediates"])
      return nll.sum(), st
    return jax.grad(loss, has_aux=True)(perts)

  runs = {
      "forward": (jax.jit(forward), (params, tokens, mask)),
      "activation_grads": (jax.jit(activation_grads), (params, tokens, mask)),
      "train_step": (step, (params, opt_state, tokens)),
      "factored": (factored, (params, mats, corrs, tokens, mask)),
      "factored_corrected_only": (corrected_only, (params, mats, corrs, tokens, mask)),
      "reference": (reference, (params, mats, corrs, tokens, mask)),
  }
  peak = {name: _peak_bytes(fn, *args) for name, (fn, args) in runs.items()}
  for fn, args in runs.values():  # Compile and warm up.
    jax.block_until_ready(fn(*args))
  times = {name: [] for name in runs}
  for _ in range(_ROUNDS.value):
    for name, (fn, args) in runs.items():
      reps = 1 if name == "reference" else 3
      t0 = time.perf_counter()
      for _ in range(reps):
        out = fn(*args)
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - t0) / reps)
  per_ex = {name: float(np.median(v)) / b for name, v in times.items()}
  res = {
      "batch": b, "seq_len": t, "d": plan.dim, "params": model_lib.count_params(params),
      "devices": jax.device_count(),
      "factored_over_train_step": per_ex["factored"] / per_ex["train_step"],
      "factored_corrected_only_over_train_step":
          per_ex["factored_corrected_only"] / per_ex["train_step"],
      "reference_over_factored": per_ex["reference"] / per_ex["factored"],
  }
  for name in runs:
    res[f"{name}_examples_per_s"] = 1.0 / per_ex[name]
    res[f"{name}_tokens_per_s"] = t / per_ex[name]
    res[f"{name}_peak_bytes"] = peak[name]
  res["forward_share_of_factored"] = per_ex["forward"] / per_ex["factored"]
  res["activation_grads_share_of_factored"] = per_ex["activation_grads"] / per_ex["factored"]
  return res


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  with cli.stdout_to_stderr(_JSON.value):
    res = measure()
  if _JSON.value:
    cli.print_json(res)
    return
  print(f"model {res['params']:,} params, batch {res['batch']} x {res['seq_len']} tokens, "
        f"d = {res['d']}, {res['devices']} device(s), median of {_ROUNDS.value} "
        "interleaved rounds")
  print(f"{'kernel':<26}{'examples/s':>12}{'tokens/s':>12}{'peak MiB':>10}")
  for name in [k[:-len("_examples_per_s")] for k in res if k.endswith("_examples_per_s")]:
    print(f"{name:<26}{res[name + '_examples_per_s']:>12.1f}{res[name + '_tokens_per_s']:>12.0f}"
          f"{res[name + '_peak_bytes'] / 2**20:>10.1f}")
  print(f"factored_over_train_step   {res['factored_over_train_step']:.3f}  (goal <= 0.9)")
  print(f"  corrected variant only   {res['factored_corrected_only_over_train_step']:.3f}")
  print(f"reference_over_factored    {res['reference_over_factored']:.1f}  (goal >= 20)")
  print("where the factored kernel's time goes (share of its time): forward "
        f"{res['forward_share_of_factored']:.2f}, + backward to activations "
        f"{res['activation_grads_share_of_factored']:.2f}, the rest is projection")


if __name__ == "__main__":
  app.run(main)

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

Also times the kernel on a query-shaped batch (32 tokens, loss on the last 3) with
the LM head on every row and on the target rows only (`loss_rows`), and prints the
ratio and the largest difference between their vectors.

Prints `factored_over_train_step` (goal <= 0.55) and `reference_over_factored` (the
time of vmap(grad), which materialises every example's full gradient, over the
factored kernel's; it grows with the parameter count, and at the tiny model's 738K
parameters it is small), and how far from the machine's limit the kernel
runs: `achieved_gflops` (the corrected kernel's analytic FLOPs,
`tda.plan.kernel_flops`, over its time; XLA's cost analysis counts a loop's body
once, and the kernel's fused LM head is a loop), `peak_gflops` (a 2048^3 matmul of the model's
compute dtype, same process) and `achieved_over_peak`.

    python scripts/bench_gradients.py --profile=prof.json [--trace_dir=T] [--json]

instead writes a per-phase breakdown of the corrected kernel (forward, activation
backward, projection/contraction, correction, whitening, host I/O: differences of
nested programs, each timed in interleaved rounds, with XLA's FLOPs and bytes per
program) for the bench shape and for scripts/bench_vs_bergson.py's shape (its
4-layer d_model-256 model, dense members only, 16 x 16 per module, batch 16 x 128).
Every program and the Featurizer run in each round, and a phase is the median of
its per-round differences, printed with their range over the rounds; a phase whose
range reaches 0 or below is marked as within the machine's noise (its median may
even be negative; the shares count a negative median as 0). XLA's FLOPs count a
loop's body once: the fused LM head's (`tda.gradients.fused_head`) is counted for
one chunk of rows.
"""

from __future__ import annotations

import copy
import json
import os
import time

from absl import app
from absl import flags
from ml_collections import config_flags

from tda import cli
from tda import host_memory

_CONFIG = config_flags.DEFINE_config_file("config", "configs/trackstar_tiny.py",
                                          "Experiment config (model and gradient settings).")
_JSON = cli.define_json_flag()
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved timing rounds.")
_SEQ = flags.DEFINE_integer("seq_len", 128, "Tokens per example.")


_PROFILE = flags.DEFINE_string(
    "profile", None, "Write a per-phase breakdown (forward, activation backward, "
    "projection/contraction, correction, whitening, host I/O) of the bench shape and the "
    "bergson-bench shape (scripts/bench_vs_bergson.py's model) to this JSON file, with "
    "XLA's cost analysis (FLOPs, bytes accessed) of each phase's program.")
_TRACE = flags.DEFINE_string("trace_dir", None, "With --profile: also write a "
                             "jax.profiler trace of one factored-kernel call per shape here.")


def _peak_bytes(jitted, *args) -> int:
  m = jitted.lower(*args).compile().memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)


def _cost(jitted, *args) -> dict:
  """XLA's analytic cost of the compiled program: FLOPs and bytes accessed."""
  c = jitted.lower(*args).compile().cost_analysis()
  c = c[0] if isinstance(c, (list, tuple)) else c
  return {"flops": float(c.get("flops", 0.0)), "bytes": float(c.get("bytes accessed", 0.0))}


def _time(runs: dict, rounds: int, reps: dict | None = None,
          faults: dict | None = None, per_round: bool = False) -> dict:
  """Median seconds per call of each (fn, args), interleaved rounds after a warm-up
  (with `per_round`, each round's instead: a list per name). With `faults` (a dict),
  also the median minor page faults per call of each, into it (the process's count
  around the calls: what the host allocator costs, `tda.host_memory`)."""
  import resource
  import jax
  import numpy as np
  for fn, args in runs.values():
    jax.block_until_ready(fn(*args))
  times = {name: [] for name in runs}
  flts = {name: [] for name in runs}
  for _ in range(rounds):
    for name, (fn, args) in runs.items():
      n = (reps or {}).get(name, 3)
      f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      t0 = time.perf_counter()
      for _ in range(n):
        out = fn(*args)
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - t0) / n)
      flts[name].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / n)
  if faults is not None:
    faults.update({name: float(np.median(v)) for name, v in flts.items()})
  if per_round:
    return times
  return {name: float(np.median(v)) for name, v in times.items()}


def peak_gflops(dtype, n: int = 2048, rounds: int = 5) -> float:
  """The machine's matmul rate in this process: an n × n × n product of `dtype`."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
  mm = jax.jit(lambda x, y: x @ y)
  t = _time({"mm": (mm, (a, a))}, rounds)["mm"]
  return 2 * n ** 3 / t / 1e9


def bergson_shape_config(base):
  """scripts/bench_vs_bergson.py's model and projection on `base`: a 4-layer Llama
  (d_model 256, d_ff 688, 4 heads, vocab 8192, untied-free), 16 x 16 per module."""
  c = copy.deepcopy(base)
  m = c.model
  m.block, m.scale_embeddings = "sequential", False
  m.d_model, m.n_layers, m.n_heads, m.head_dim, m.n_kv_heads = 256, 4, 4, 64, 4
  m.d_ff, m.vocab_size, m.max_len = 688, 8192, 128
  c.data.vocab_size = 8192
  c.gradients.k_in = c.gradients.k_out = 16
  c.gradients.batch_size = 16
  return c


class _Setup:
  """Model, a few-steps-trained state, plan, matrices and corrections for one shape."""

  def __init__(self, config, *, seq_len: int, dense_only: bool = False, eps=None):
    import jax
    import numpy as np
    from tda import correction as corr_lib
    from tda import featurize
    from tda import model as model_lib
    from tda import projection as proj
    from tda import train as train_lib
    g = config.gradients
    self.b, self.t = g.batch_size, seq_len
    self.model = model_lib.Transformer(model_lib.model_config(config))
    tx = train_lib.make_optimizer(config)
    params = model_lib.init_params(self.model, jax.random.key(0), seq_len)
    opt_state = tx.init(params)
    rng = np.random.default_rng(0)
    self.tokens = rng.integers(3, self.model.cfg.vocab_size,
                               size=(self.b, seq_len)).astype(np.int32)
    self.mask = np.ones((self.b, seq_len), np.float32)
    self.step = jax.jit(train_lib.make_train_step(self.model, tx))
    for _ in range(3):  # A real (non-zero) Adafactor state.
      params, opt_state, _ = self.step(params, opt_state, self.tokens)
    self.params, self.opt_state = params, opt_state
    plan = featurize.plan_from_config(config, params)
    if dense_only:
      plan = plan.restrict(lambda m: m.kind == proj.DENSE)
    self.plan = plan
    self.mats = proj.plan_matrices(seed=g.seed, plan=plan)
    self.corrs = corr_lib.member_corrections(opt_state=opt_state, plan=plan,
                                             eps=g.eps if eps is None else eps)
    self.n_params = model_lib.count_params(params)

  def forward(self):
    import jax
    from tda import model as model_lib
    model = self.model

    def forward(params, tokens_bt, mask_bt):
      return model_lib.example_losses(model, {"params": params}, tokens_bt, mask_bt)
    return jax.jit(forward), (self.params, self.tokens, self.mask)

  def activation_grads(self):
    """Forward + backward to the layer outputs only, as the factored kernel does them
    (the body to the final hidden states, the fused LM head, the body's backward from
    its dh): the factored kernel minus the projections."""
    import jax
    from tda import gradients as grad_lib
    model = self.model

    def activation_grads(params, tokens_bt, mask_bt):
      deltas, inter, nll, _, _ = grad_lib.fused_activation_grads(model, params, tokens_bt,
                                                                 mask_bt)
      return deltas, inter, nll
    return jax.jit(activation_grads), (self.params, self.tokens, self.mask)

  def kernel(self, variants=None, kind="factored"):
    import jax
    from tda import gradients as grad_lib
    make = (grad_lib.make_factored_kernel if kind == "factored"
            else grad_lib.make_reference_kernel)
    fn = jax.jit(make(model=self.model, plan=self.plan, has_corrections=True,
                      variants=variants))
    return fn, (self.params, self.mats, self.corrs, self.tokens, self.mask)

  def train_step(self):
    return self.step, (self.params, self.opt_state, self.tokens)


def measure() -> dict:
  """Times, peak memory and FLOP rates of each kernel; the figures `main` reports."""
  import jax
  import jax.numpy as jnp
  from tda import model as model_lib
  from tda import plan as plan_lib

  config = _CONFIG.value
  s = _Setup(config, seq_len=_SEQ.value)
  b, t = s.b, s.t
  runs = {
      "forward": s.forward(),
      "activation_grads": s.activation_grads(),
      "train_step": s.train_step(),
      "factored": s.kernel(),
      "factored_corrected_only": s.kernel(("corrected",)),
      "reference": s.kernel(kind="reference"),
  }
  peak = {name: _peak_bytes(fn, *args) for name, (fn, args) in runs.items()}
  cost = {name: _cost(fn, *args) for name, (fn, args) in runs.items()}
  faults = {}
  sec = _time(runs, _ROUNDS.value, reps={"reference": 1}, faults=faults)
  per_ex = {name: v / b for name, v in sec.items()}
  dtype = jnp.dtype(model_lib.model_config(config).dtype)
  peak_rate = peak_gflops(dtype)
  res = {
      "batch": b, "seq_len": t, "d": s.plan.dim, "params": s.n_params,
      "devices": jax.device_count(), "compute_dtype": str(dtype),
      "host_malloc": host_memory.STATUS,
      "factored_over_train_step": per_ex["factored"] / per_ex["train_step"],
      "factored_corrected_only_over_train_step":
          per_ex["factored_corrected_only"] / per_ex["train_step"],
      "reference_over_factored": per_ex["reference"] / per_ex["factored"],
      # The machine's limit: the kernel's analytic FLOPs (tda.plan.kernel_flops; XLA's
      # cost analysis counts the fused head's loop body once) over its time, against a
      # large matmul of the same dtype in this process.
      "achieved_gflops": b * plan_lib.kernel_flops(
          model_cfg=s.model.cfg, plan=s.plan, tokens=t - 1, variants=1)["total"]
          / sec["factored_corrected_only"] / 1e9,
      "peak_gflops": peak_rate,
  }
  res["achieved_over_peak"] = res["achieved_gflops"] / peak_rate
  for name in runs:
    res[f"{name}_examples_per_s"] = 1.0 / per_ex[name]
    res[f"{name}_tokens_per_s"] = t / per_ex[name]
    res[f"{name}_peak_bytes"] = peak[name]
    res[f"{name}_minor_faults_per_call"] = faults[name]
    res[f"{name}_gflops"] = cost[name]["flops"] / sec[name] / 1e9
  res["forward_share_of_factored"] = per_ex["forward"] / per_ex["factored"]
  res["activation_grads_share_of_factored"] = per_ex["activation_grads"] / per_ex["factored"]
  res.update(measure_query_head(s))
  return res


def measure_query_head(s: "_Setup", *, length: int = 32, targets: int = 3) -> dict:
  """The factored kernel on a query-shaped batch (`length` tokens, loss on the last
  `targets`), the LM head on every row against on the target rows only (`loss_rows`,
  as `Featurizer.run_batch` picks it), interleaved rounds; and the largest
  difference between the two programs' vectors."""
  import functools
  import jax
  import numpy as np
  from tda import gradients as grad_lib
  fn = jax.jit(grad_lib.make_factored_kernel(model=s.model, plan=s.plan,
                                             has_corrections=True),
               static_argnames=("loss_rows",))
  tokens = s.tokens[:, :length]
  mask = np.zeros(tokens.shape, np.float32)
  mask[:, -targets:] = 1.0
  rows = grad_lib.loss_rows_for(tokens, mask)
  args = (s.params, s.mats, s.corrs, tokens, mask)
  runs = {"full": (functools.partial(fn, loss_rows=None), args),
          "target_rows": (functools.partial(fn, loss_rows=rows), args)}
  sec = _time(runs, _ROUNDS.value)
  full, sel = (runs[k][0](*args) for k in ("full", "target_rows"))
  diff = max(float(np.max(np.abs(np.asarray(full[v]) - np.asarray(sel[v]))))
             for v in ("raw", "corrected", "loss"))
  return {"query_batch": f"{s.b} x {length} tokens, {targets} target tokens",
          "query_loss_rows": rows,
          "query_full_head_ms": sec["full"] * 1e3,
          "query_target_rows_ms": sec["target_rows"] * 1e3,
          "query_target_rows_over_full_head": sec["target_rows"] / sec["full"],
          "query_target_rows_max_abs_diff": diff}


def profile_shape(name: str, config, *, seq_len: int, dense_only: bool, eps=None,
                  n_examples: int = 64, trace_dir: str | None = None) -> dict:
  """Per-phase time of the corrected factored kernel on one shape, by differences of
  nested programs (each jitted on its own, interleaved rounds):

    forward             the batched forward (losses)
    activation_backward forward + backward to the layer outputs, minus forward
    projection          the raw factored kernel minus the above (contractions)
    correction          corrected-only minus raw-only (the s_in / s_out rescaling)
    whitening           [B, d] @ [d, d] (applying a whitener to the batch's vectors)
    host_io             the Featurizer (bucketing, padding, device_put, device_get,
                        finite check) over `n_examples` minus its kernel calls
  with XLA's cost analysis (FLOPs, bytes accessed) of each program.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  from tda import featurize
  from tda import sharding
  s = _Setup(config, seq_len=seq_len, dense_only=dense_only, eps=eps)
  runs = {"forward": s.forward(), "activation_grads": s.activation_grads(),
          "raw_only": s.kernel(("raw",)), "corrected_only": s.kernel(("corrected",))}
  w = jnp.eye(s.plan.dim, dtype=jnp.float32)
  g = jnp.ones((s.b, s.plan.dim), jnp.float32)
  runs["whitening"] = (jax.jit(lambda g, w: g @ w), (g, w))
  cost = {k: _cost(fn, *args) for k, (fn, args) in runs.items()}
  feat = featurize.Featurizer(model=s.model, params=s.params, plan=s.plan, mats=s.mats,
                              corrs=s.corrs, mesh=sharding.make_mesh(), batch_size=s.b,
                              bucket=seq_len, variants=("corrected",))
  toks = np.tile(s.tokens, (n_examples // s.b, 1))
  mask = np.ones(toks.shape, np.float32)
  batches = len(toks) / s.b
  runs["featurizer"] = (lambda: feat(tokens_nt=toks, mask_nt=mask, ids=list(range(len(toks)))),
                        ())
  load0 = os.getloadavg()[0]
  # Every program and the Featurizer in each round, so a phase (a difference of two
  # programs) is taken within a round, where the machine's load is the least apart.
  rounds = _time(runs, _ROUNDS.value, reps={"featurizer": 1}, per_round=True)
  load1 = os.getloadavg()[0]
  rounds["featurizer"] = [v / batches for v in rounds["featurizer"]]
  sec = {k: float(np.median(v)) for k, v in rounds.items()}
  feat_per_batch = sec.pop("featurizer")
  if trace_dir:
    fn, args = runs["corrected_only"]
    with jax.profiler.trace(os.path.join(trace_dir, name)):
      jax.block_until_ready(fn(*args))
  r = {k: np.asarray(v) for k, v in rounds.items()}
  per_round = {
      "forward": r["forward"],
      "activation_backward": r["activation_grads"] - r["forward"],
      "projection": r["raw_only"] - r["activation_grads"],
      "correction": r["corrected_only"] - r["raw_only"],
      "whitening": r["whitening"],
      "host_io": r["featurizer"] - r["corrected_only"],
  }
  phases = {k: float(np.median(v)) for k, v in per_round.items()}
  ranges = {k: [round(float(v.min()) * 1e3, 3), round(float(v.max()) * 1e3, 3)]
            for k, v in per_round.items()}
  total = sum(max(v, 0.0) for v in phases.values())
  return {
      "shape": name, "batch": s.b, "seq_len": seq_len, "d": s.plan.dim,
      "params": s.n_params, "members": len(s.plan.members),
      "rounds": _ROUNDS.value, "load_average": [round(load0, 2), round(load1, 2)],
      # Median of the per-round differences, and their range over the rounds; a
      # phase whose range reaches 0 or below is within this machine's noise.
      "phase_ms_per_batch": {k: round(v * 1e3, 3) for k, v in phases.items()},
      "phase_ms_range": ranges,
      "phases_within_noise": [k for k, (lo, _) in ranges.items() if lo <= 0.0],
      "phase_share": {k: round(max(v, 0.0) / total, 3) for k, v in phases.items()},
      "program_ms_per_batch": {k: round(v * 1e3, 3) for k, v in sec.items()},
      "featurizer_ms_per_batch": round(feat_per_batch * 1e3, 3),
      "program_gflop": {k: round(v["flops"] / 1e9, 4) for k, v in cost.items()},
      "program_gbytes_accessed": {k: round(v["bytes"] / 1e9, 4) for k, v in cost.items()},
      "program_gflops": {k: round(cost[k]["flops"] / sec[k] / 1e9, 2) for k in sec},
  }


def profile() -> dict:
  import jax.numpy as jnp
  config = _CONFIG.value
  out = {"rounds": _ROUNDS.value, "peak_gflops_f32": peak_gflops(jnp.float32),
         "shapes": [
             profile_shape("bench", config, seq_len=_SEQ.value, dense_only=False,
                           trace_dir=_TRACE.value),
             profile_shape("bergson_bench", bergson_shape_config(config), seq_len=128,
                           dense_only=True, eps=1e-30, trace_dir=_TRACE.value)]}
  return out


def _print_profile(p: dict) -> None:
  for sh in p["shapes"]:
    print(f"{sh['shape']}: batch {sh['batch']} x {sh['seq_len']} tokens, d = {sh['d']}, "
          f"{sh['members']} members, {sh['params']:,} params")
    print(f"  median of {sh['rounds']} rounds, load average {sh['load_average'][0]:.2f} "
          f"-> {sh['load_average'][1]:.2f}")
    print(f"  {'phase':<22}{'ms/batch':>10}{'min':>9}{'max':>9}{'share':>8}")
    for k, v in sh["phase_ms_per_batch"].items():
      lo, hi = sh["phase_ms_range"][k]
      note = "  (range reaches 0: within noise)" if k in sh["phases_within_noise"] else ""
      print(f"  {k:<22}{v:>10.2f}{lo:>9.2f}{hi:>9.2f}{sh['phase_share'][k]:>8.2f}{note}")
    print(f"  featurizer (all of it)  {sh['featurizer_ms_per_batch']:>8.2f}")
    print(f"  {'program':<22}{'ms/batch':>10}{'GFLOP':>10}{'GFLOP/s':>10}")
    for k, v in sh["program_ms_per_batch"].items():
      print(f"  {k:<22}{v:>10.2f}{sh['program_gflop'][k]:>10.3f}{sh['program_gflops'][k]:>10.1f}")
  print(f"peak (f32 matmul, this process): {p['peak_gflops_f32']:.1f} GFLOP/s")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _PROFILE.value:
    with cli.stdout_to_stderr(_JSON.value):
      p = profile()
    with open(_PROFILE.value, "w") as f:
      json.dump(p, f, indent=1)
    if _JSON.value:
      cli.print_json(p)
    else:
      _print_profile(p)
    return
  cli.emit(as_json=_JSON.value, measure=measure, report=_print_result)


def _print_result(res) -> None:
  """The side-by-side figures as a table."""
  print(f"model {res['params']:,} params, batch {res['batch']} x {res['seq_len']} tokens, "
        f"d = {res['d']}, {res['devices']} device(s), median of {_ROUNDS.value} "
        "interleaved rounds")
  print(f"host malloc: {res['host_malloc']} (tda.host_memory)")
  print(f"{'kernel':<26}{'examples/s':>12}{'tokens/s':>12}{'peak MiB':>10}{'faults/call':>13}")
  for name in [k[:-len("_examples_per_s")] for k in res if k.endswith("_examples_per_s")]:
    print(f"{name:<26}{res[name + '_examples_per_s']:>12.1f}{res[name + '_tokens_per_s']:>12.0f}"
          f"{res[name + '_peak_bytes'] / 2**20:>10.1f}"
          f"{res[name + '_minor_faults_per_call']:>13.0f}")
  print(f"factored_over_train_step   {res['factored_over_train_step']:.3f}  (goal <= 0.55)")
  print(f"  corrected variant only   {res['factored_corrected_only_over_train_step']:.3f}")
  print(f"reference_over_factored    {res['reference_over_factored']:.1f}  (vmap(grad), every "
        "example's full gradient materialised)")
  print(f"achieved {res['achieved_gflops']:.1f} GFLOP/s (corrected kernel, analytic FLOP count) "
        f"of a {res['compute_dtype']} matmul's {res['peak_gflops']:.1f}: "
        f"{res['achieved_over_peak']:.2f} of peak")
  print("where the factored kernel's time goes (share of its time): forward "
        f"{res['forward_share_of_factored']:.2f}, + backward to activations "
        f"{res['activation_grads_share_of_factored']:.2f}, the rest is projection")
  print(f"queries ({res['query_batch']}): LM head on {res['query_loss_rows']} target rows "
        f"{res['query_target_rows_ms']:.1f} ms vs every row {res['query_full_head_ms']:.1f} ms "
        f"a batch: {res['query_target_rows_over_full_head']:.3f}x; max |difference| "
        f"{res['query_target_rows_max_abs_diff']:.3g}")


if __name__ == "__main__":
  app.run(main)

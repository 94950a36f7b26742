"""Cost planner, printed before a launch: `python -m tda.plan --config=...`.

    python -m tda.plan --config=configs/trackstar_8b.py [--json] \
        [--compile_report=PATH] [--topology=v5e-256] [--rows=N] [--mfu=0.4]

Reports, from the config alone (shapes by `jax.eval_shape`, nothing allocated):
  * rows (C4: 365M passages for `data.source='tfds'` over `c4/...`), d, bytes per row and table size
    per dtype (float32, bfloat16, int8 with its float32 per-row scale, as
    `tda.tables` stores it);
  * FLOPs per example of the factored gradient kernel, analytic (below), at the full
    sequence length and at the corpus's mean length (what length buckets run);
  * chip-hours for featurisation (corpus + R_train sample) and for exact retrieval
    (2·Q·N·d) at a stated utilisation of the chip's peak bf16 FLOP/s;
  * with `--compile_report` (JSON from `tda.compile_check --output`): per-chip memory
    of each compiled step, the largest batch that fits, and the analytic FLOPs
    cross-checked against XLA's `cost_analysis` (per chip × chips / batch).

Analytic kernel FLOPs for one example of T tokens (a multiply-add = 2 FLOPs):
  forward   2·T·Σ_dense(n_in·n_out) + 2·T·V·D (logits) + 4·T²·H·h·L (QKᵀ, PV)
  backward  the same again: gradients to layer *outputs and inputs* only (dX = δWᵀ);
            weight gradients are never formed. Attention backward is 2× its forward.
  project   per variant (raw, corrected), per dense member
            2·T·(n_in·k_in + n_out·k_out) + 2·T·k_in·k_out; the embedding
            2·T·V·k_in + 2·2·T·D·k_out + 2·2·T·k_in·k_out (logits and lookup terms).
`model.remat` recomputation is not counted: every layer's input and output
gradient is an output of the kernel, so XLA keeps the activations (the compiled
cost_analysis agrees; see the cross-check).
"""

from __future__ import annotations

from typing import Any

from absl import app
from absl import flags
import jax
import ml_collections
from ml_collections import config_flags

from tda import cli
from tda import compile_check
from tda import model as model_lib
from tda import projection as proj
from tda import topology as topology_lib
from tda import workdir as workdir_lib

C4_ROWS = 365_000_000        # C4 en passages (DESIGN.md §1, §5).
C4_TOKENS = 160e9            # > 160B tokens (DESIGN.md §1): ~438 tokens a passage.
TIB = float(1 << 40)
BYTES = {"float32": 4, "bfloat16": 2, "int8": 1}
INT8_SCALE_BYTES = 4         # tda.tables: float32 per-row scale.


def table_bytes(*, rows: int, d: int) -> dict[str, dict[str, float]]:
  """Per dtype: bytes per row and the table's total bytes / TiB."""
  out = {}
  for dtype, item in BYTES.items():
    per_row = d * item + (INT8_SCALE_BYTES if dtype == "int8" else 0)
    out[dtype] = {"bytes_per_row": per_row, "bytes": per_row * rows,
                  "tib": per_row * rows / TIB}
  return out


def kernel_flops(*, model_cfg: model_lib.ModelConfig, plan: proj.Plan, tokens: int,
                 variants: int = 2) -> dict[str, float]:
  """Analytic FLOPs of the factored kernel for one example (module docstring)."""
  t = float(tokens)
  dense = 0.0
  project = 0.0
  for b in plan.blocks:
    for m in b.members:
      if m.kind == proj.DENSE:
        n_in, n_out = m.shape
        if m.path[0] != "lm_head":  # An untied head's matmul is `logits` below.
          dense += n_in * n_out
        project += 2 * t * (n_in * b.k_in + n_out * b.k_out) + 2 * t * b.k_in * b.k_out
      elif m.kind == proj.VECTOR:
        project += 2 * t * m.shape[0] + 2 * m.shape[0] * b.k_out
      else:
        vocab, dm = m.shape
        project += (2 * t * vocab * b.k_in + 4 * t * dm * b.k_out
                    + 4 * t * b.k_in * b.k_out)
  c = model_cfg
  logits = 2 * t * c.vocab_size * c.d_model
  attn = 4 * t * t * c.n_heads * c.head_dim * c.n_layers
  forward = 2 * t * dense + logits + attn
  backward = 2 * t * dense + logits + 2 * attn
  out = {"forward": forward, "backward": backward, "projection": variants * project}
  out["total"] = sum(out.values())
  out["ratio_to_forward"] = out["total"] / forward
  return out


def make_plan_report(*, config: ml_collections.ConfigDict, rows: int | None = None,
                     topology_name: str | None = None, mfu: float | None = None,
                     queries: int | None = None, mean_tokens: float | None = None,
                     compile_report: dict[str, Any] | None = None) -> dict[str, Any]:
  """The planner's numbers (module docstring); arguments override the config's `plan.*`."""
  g = config.gradients
  model_cfg = model_lib.model_config(config)
  seq_len = config.data.seq_len
  _, params, plan = compile_check.model_and_plan(config)
  c4 = config.data.source == "tfds" and str(config.data.tfds_name).startswith("c4/")
  pl = config.plan
  if rows is None:
    rows = pl.rows if pl.rows is not None else (C4_ROWS if c4 else None)
  if rows is not None and rows < 1:
    raise ValueError(f"plan.rows must be >= 1, got {rows}")
  mfu = pl.mfu if mfu is None else mfu
  if not 0 < mfu <= 1:
    raise ValueError(f"plan.mfu must be in (0, 1], got {mfu}")
  queries = pl.queries if queries is None else queries
  topology_name = (topology_name or (compile_report or {}).get("topology") or pl.topology)
  topo = topology_lib.get(topology_name)
  if mean_tokens is None:
    mean_tokens = (pl.mean_tokens if pl.mean_tokens is not None
                   else C4_TOKENS / C4_ROWS if c4 else seq_len)
  # Length buckets pad each example up to a multiple of length_bucket: ~half a bucket.
  run_tokens = min(seq_len, mean_tokens + g.length_bucket / 2)
  variants = 2 if g.correction else 1
  f_full = kernel_flops(model_cfg=model_cfg, plan=plan, tokens=seq_len - 1, variants=variants)
  f_mean = kernel_flops(model_cfg=model_cfg, plan=plan, tokens=run_tokens, variants=variants)
  peak = topo.peak_bf16_tflops * 1e12
  chip_s = lambda flops: flops / (peak * mfu)
  d = plan.dim
  rep: dict[str, Any] = {
      "config": config.name, "params": model_lib.count_params(params), "d": d,
      "seq_len": seq_len, "mean_tokens": mean_tokens, "run_tokens": run_tokens,
      "topology": topology_name, "chips": topo.chips,
      "peak_bf16_tflops": topo.peak_bf16_tflops, "hbm_gib": topo.hbm_gib, "mfu": mfu,
      "rows": rows, "queries": queries, "table_dtype": config.tables.dtype,
      "flops_per_example_full_length": f_full, "flops_per_example_mean_length": f_mean}
  r_train = config.hessian.train_samples
  rep["r_train"] = {"examples": r_train,
                    "chip_hours": r_train * chip_s(f_mean["total"]) / 3600,
                    "accumulate_flops": 2.0 * d * d * r_train,
                    "r_bytes_float32": 4 * d * d}
  pool = config.hessian.sweep_pool
  rep["dev_sweep_pool"] = {"examples": pool, "chip_hours": pool * chip_s(f_mean["total"]) / 3600}
  if rows is not None:
    rep["tables"] = table_bytes(rows=rows, d=d)
    feat_h = rows * chip_s(f_mean["total"]) / 3600
    retr_flops = 2.0 * queries * rows * d
    rep["featurisation"] = {
        "flops": rows * f_mean["total"], "chip_hours": feat_h,
        "chip_hours_at_full_length": rows * chip_s(f_full["total"]) / 3600,
        "wall_hours_on_topology": feat_h / topo.chips}
    rep["retrieval_exact"] = {
        "flops": retr_flops, "chip_hours": chip_s(retr_flops) / 3600,
        "wall_hours_on_topology": chip_s(retr_flops) / 3600 / topo.chips,
        "table_bytes_streamed": rep["tables"][config.tables.dtype]["bytes"]}
  if compile_report is not None:
    rep["compiled"] = _from_compile_report(compile_report, f_full["total"])
  return rep


def _from_compile_report(cr: dict[str, Any], analytic_full: float) -> dict[str, Any]:
  out: dict[str, Any] = {"topology": cr.get("topology"), "libtpu": cr.get("libtpu"),
                         "mesh": cr.get("mesh"), "steps": {}}
  for name, s in cr.get("steps", {}).items():
    out["steps"][name] = {k: s.get(k) for k in ("fits", "total_bytes", "memory_bytes",
                                               "hbm_fraction", "flops", "error")}
  grad = cr.get("steps", {}).get("gradients")
  if grad and grad.get("fits") and grad.get("flops"):
    per_ex = grad["flops"] * cr.get("process_chips", cr["chips"]) / grad["batch"]
    out["flops_per_example_compiled"] = per_ex
    out["compiled_over_analytic"] = per_ex / analytic_full
  if "eigh_plan" in cr:
    out["eigh_plan"] = cr["eigh_plan"]
  if "batch_search" in cr:
    out["largest_batch_per_chip"] = cr["batch_search"]["largest_batch_per_chip"]
    out["largest_batch"] = cr["batch_search"]["largest_batch"]
  return out


def format_plan(rep: dict[str, Any]) -> str:
  t = lambda x: f"{x / 1e12:,.1f} TFLOP"
  f, fm = rep["flops_per_example_full_length"], rep["flops_per_example_mean_length"]
  lines = [
      f"{rep['config']}: {rep['params'] / 1e9:.2f}B params, d = {rep['d']:,}, "
      f"seq_len {rep['seq_len']}, mean {rep['mean_tokens']:.0f} tokens "
      f"(run at ~{rep['run_tokens']:.0f} with length buckets)",
      f"  kernel FLOPs/example at {rep['seq_len']} tokens: {t(f['total'])} (forward "
      f"{t(f['forward'])}, backward {t(f['backward'])}, projection {t(f['projection'])}; "
      f"{f['ratio_to_forward']:.2f}x forward); at mean length {t(fm['total'])}",
      f"  chip: {rep['topology']} ({rep['chips']} chips, {rep['peak_bf16_tflops']:g} "
      f"TFLOP/s bf16, {rep['hbm_gib']:g} GiB HBM) at {100 * rep['mfu']:.0f}% MFU"]
  if rep["rows"] is not None:
    lines.append(f"  rows: {rep['rows']:,}")
    for dt, tb in rep["tables"].items():
      lines.append(f"    {dt:8s} {tb['bytes_per_row']:,} B/row -> {tb['tib']:.1f} TiB")
    fe, re_ = rep["featurisation"], rep["retrieval_exact"]
    lines.append(f"  featurisation: {fe['chip_hours']:,.0f} chip-hours "
                 f"(~{fe['wall_hours_on_topology']:,.1f} h on {rep['topology']}); "
                 f"{fe['chip_hours_at_full_length']:,.0f} if every row ran at full length")
    lines.append(f"  exact retrieval, {rep['queries']:,} queries: {re_['chip_hours']:,.1f}"
                 f" chip-hours; streams {re_['table_bytes_streamed'] / TIB:.1f} TiB "
                 f"({rep['table_dtype']})")
  else:
    lines.append("  rows: unknown (pass --rows or set plan.rows)")
  rt = rep["r_train"]
  lines.append(f"  R_train: {rt['examples']:,} examples, {rt['chip_hours']:,.0f} chip-hours "
               f"featurising; R is {rt['r_bytes_float32'] / (1 << 30):.0f} GiB float32")
  if "compiled" in rep:
    c = rep["compiled"]
    lines.append(f"  compiled on {c['topology']} (libtpu {c['libtpu']}, mesh {c['mesh']}):")
    for name, s in c["steps"].items():
      lines.append(f"    {name:9s} " + (
          f"{s['total_bytes'] / (1 << 30):.2f} GiB/chip ({100 * s['hbm_fraction']:.0f}% HBM)"
          if s["fits"] else f"DOES NOT FIT: {s['error']}"))
    if "compiled_over_analytic" in c:
      lines.append(f"    kernel FLOPs/example compiled {t(c['flops_per_example_compiled'])}"
                   f" = {c['compiled_over_analytic']:.2f}x analytic")
    if "eigh_plan" in c:
      e, g = c["eigh_plan"], 1 << 30
      lines.append(f"    R: {e['r_bytes_per_chip'] / g:.3f} GiB/chip accumulated on the mesh; "
                   f"eigendecomposition on each host ({e['largest_block']:,}-wide, "
                   f"{e['dtype']}): {e['host_bytes_total'] / g:.0f} GiB host memory, "
                   f"{e['eigh_flops'] / 1e12:,.0f} TFLOP")
    if "largest_batch_per_chip" in c:
      lines.append(f"    largest gradient batch: {c['largest_batch']} a process "
                   f"({c['largest_batch_per_chip']:g}/chip)")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  # Shapes only (jax.eval_shape): the host CPU backend suffices, and keeps an installed
  # libtpu from probing for a TPU that a planning machine does not have.
  jax.config.update("jax_platforms", "cpu")
  with cli.stdout_to_stderr(f.json):
    cr = workdir_lib.read_json(f.compile_report) if f.compile_report else None
    rep = make_plan_report(config=f.config, rows=f.rows, topology_name=f.topology,
                           mfu=f.mfu, queries=f.queries, compile_report=cr)
  if f.json:
    cli.print_json(rep)
  else:
    print(format_plan(rep))


def _define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                  lock_config=True)
  flags.DEFINE_integer("rows", None, "Rows (examples) to featurise; default plan.rows / C4.")
  flags.DEFINE_string("topology", None, "Chip for the estimates (tda.topology names; "
                      "default plan.topology).")
  flags.DEFINE_float("mfu", None, "Utilisation of peak bf16 FLOP/s (default plan.mfu).")
  flags.DEFINE_integer("queries", None, "Queries to retrieve for (default plan.queries).")
  flags.DEFINE_string("compile_report", None, "JSON from tda.compile_check --output.")
  cli.define_json_flag()
  flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
  _define_flags()
  app.run(main)

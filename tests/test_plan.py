"""tda.plan: table sizes, analytic kernel FLOPs and chip-hours.

Checked against hand-computed numbers, scaling properties, XLA's own FLOP count
and the 8B figures the README states, never against the planner's formulas.
"""

import json
import os
import subprocess
import sys

import jax
import pytest

from configs import trackstar_8b
from tda import compile_check
from tda import gradients as grad_lib
from tda import hessian
from tda import model as model_lib
from tda import plan as plan_lib
from tda import projection as proj

TIB = 2 ** 40
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_table_bytes_c4_at_d_65536():
  tb = plan_lib.table_bytes(rows=365_000_000, d=65_536)
  assert tb["float32"]["bytes_per_row"] == 262_144
  assert tb["bfloat16"]["bytes_per_row"] == 131_072
  assert tb["int8"]["bytes_per_row"] == 65_536 + 4  # Per-row float32 scale.
  assert tb["float32"]["bytes"] == 95_682_560_000_000  # 365e6 x 262,144.
  assert tb["float32"]["tib"] == pytest.approx(87.02, abs=0.005)
  assert tb["bfloat16"]["tib"] == pytest.approx(43.51, abs=0.005)
  assert tb["int8"]["tib"] == pytest.approx(21.76, abs=0.005)


# A one-layer toy, small enough to count by hand: T = 5 tokens, vocab 10,
# d_model 4, one head of dim 2, one dense member of shape 4 x 6 projected to
# k_in x k_out = 2 x 3.
_TOY_MODEL = model_lib.ModelConfig(vocab_size=10, d_model=4, n_layers=1, n_heads=1,
                                   head_dim=2, n_kv_heads=1, d_ff=8, max_len=8)
_TOY_PLAN = proj.Plan(blocks=(proj.Block(name="b", k_in=2, k_out=3, members=(
    proj.Member(path=("w",), kind=proj.DENSE, shape=(4, 6)),)),))


def test_kernel_flops_of_a_hand_counted_toy():
  f = plan_lib.kernel_flops(model_cfg=_TOY_MODEL, plan=_TOY_PLAN, tokens=5, variants=2)
  # Dense matmul 2·5·24 = 240; logits 2·5·10·4 = 400; attention 4·25·1·2·1 = 200.
  assert f["forward"] == 240 + 400 + 200
  assert f["backward"] == 240 + 400 + 2 * 200
  # Per variant: 2·5·(4·2 + 6·3) + 2·5·2·3 = 260 + 60 = 320; two variants.
  assert f["projection"] == 640
  assert f["total"] == 840 + 1040 + 640
  assert f["ratio_to_forward"] == pytest.approx(3.0)


def test_kernel_flops_scale_with_tokens_and_variants():
  f = lambda t, v: plan_lib.kernel_flops(model_cfg=_TOY_MODEL, plan=_TOY_PLAN, tokens=t,
                                         variants=v)
  one, two = f(64, 1), f(64, 2)
  assert two["projection"] == 2 * one["projection"]  # Raw and corrected: twice the work.
  assert (two["forward"], two["backward"]) == (one["forward"], one["backward"])
  totals = [f(t, 2)["total"] for t in (8, 16, 32, 64)]
  assert totals == sorted(totals) and len(set(totals)) == 4
  # Attention grows with T², everything else with T: doubling T more than doubles.
  assert f(128, 2)["forward"] > 2 * f(64, 2)["forward"]


def _tiny():
  c = trackstar_8b.get_config("runlocal")
  model, params, plan = compile_check.model_and_plan(c)
  return c, model, model_lib.model_config(c), params, plan


def test_analytic_flops_match_xla_cost_analysis():
  """The analytic count against XLA's for the real factored kernel (tiny model, 1 variant)."""
  _, model, model_cfg, params, plan = _tiny()
  t = 64
  kernel = grad_lib.make_factored_kernel(model=model, plan=plan, has_corrections=False)
  mats = jax.eval_shape(lambda: proj.plan_matrices(seed=0, plan=plan))
  tok = jax.ShapeDtypeStruct((1, t + 1), "int32")
  mask = jax.ShapeDtypeStruct((1, t + 1), "float32")
  compiled = jax.jit(kernel).lower(params, mats, None, tok, mask).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  analytic = plan_lib.kernel_flops(model_cfg=model_cfg, plan=plan, tokens=t, variants=1)
  # XLA also counts element-wise work (softmax, RoPE, norms) we leave out: +3.4%.
  assert cost["flops"] == pytest.approx(analytic["total"], rel=0.08)


def test_chip_hours_scale_with_rows_utilisation_and_chip_speed():
  c, *_ = _tiny()
  base = plan_lib.make_plan_report(config=c, rows=1000, mfu=0.5, topology_name="v5e-4")
  hours = lambda rep: rep["featurisation"]["chip_hours"]
  more_rows = plan_lib.make_plan_report(config=c, rows=3000, mfu=0.5, topology_name="v5e-4")
  assert hours(more_rows) == pytest.approx(3 * hours(base))
  lower_mfu = plan_lib.make_plan_report(config=c, rows=1000, mfu=0.25, topology_name="v5e-4")
  assert hours(lower_mfu) == pytest.approx(2 * hours(base))
  v5p = plan_lib.make_plan_report(config=c, rows=1000, mfu=0.5, topology_name="v5p-8")
  assert hours(v5p) == pytest.approx(hours(base) * 197 / 459)  # Peak bf16 TFLOP/s.
  # Same chips, four of them: the wall time is a quarter of the chip time.
  assert base["featurisation"]["wall_hours_on_topology"] == pytest.approx(hours(base) / 4)
  # Exact retrieval: 2·Q·N·d FLOPs, linear in rows.
  assert more_rows["retrieval_exact"]["flops"] == pytest.approx(
      3 * base["retrieval_exact"]["flops"])
  assert base["retrieval_exact"]["flops"] == 2.0 * base["queries"] * 1000 * base["d"]


def test_rows_unknown_without_c4_and_bad_inputs_are_clear_errors():
  c, *_ = _tiny()  # :runlocal streams a local stand-in, not C4: rows unknown unless given.
  rep = plan_lib.make_plan_report(config=c, topology_name="v4-8")
  assert rep["rows"] is None and "tables" not in rep and "featurisation" not in rep
  assert rep["peak_bf16_tflops"] == 275.0 and rep["hbm_gib"] == 32.0
  assert "rows: unknown" in plan_lib.format_plan(rep)
  with pytest.raises(ValueError, match="plan.mfu"):
    plan_lib.make_plan_report(config=c, rows=10, mfu=1.5)
  with pytest.raises(ValueError, match="plan.rows"):
    plan_lib.make_plan_report(config=c, rows=0)
  with pytest.raises(ValueError, match="unknown topology"):
    plan_lib.make_plan_report(config=c, rows=10, topology_name="v9")


def test_8b_plan_matches_the_readme_figures():
  """README: 87.0 / 43.5 / 21.8 TiB; about 24.0k v5e chip-hours at 40% MFU."""
  rep = plan_lib.make_plan_report(config=trackstar_8b.get_config())
  assert rep["rows"] == 365_000_000 and rep["d"] == 65_536
  assert [round(rep["tables"][dt]["tib"], 1) for dt in ("float32", "bfloat16", "int8")] == [
      87.0, 43.5, 21.8]
  assert rep["topology"] == "v5e-256" and rep["mfu"] == 0.4
  assert rep["featurisation"]["chip_hours"] == pytest.approx(24.0e3, rel=0.01)
  assert rep["params"] == pytest.approx(7.83e9, rel=0.005)
  # Forward ~ 2 · params · tokens (+ attention); the kernel ~ 2x forward + projection.
  f = rep["flops_per_example_full_length"]
  assert f["forward"] == pytest.approx(2 * rep["params"] * 2047, rel=0.08)
  assert 2.0 < f["ratio_to_forward"] < 2.3


def test_compile_report_flops_are_cross_checked_per_example():
  c, *_ = _tiny()
  full = plan_lib.make_plan_report(config=c, rows=10, topology_name="v5e-4")[
      "flops_per_example_full_length"]["total"]
  # 4 chips each doing 2x one example's FLOPs for a global batch of 8: 1 example's worth.
  cr = {"topology": "v5e-4", "libtpu": "0.0.42.1", "mesh": {"data": 4, "model": 1},
        "chips": 4, "batch_search": {"largest_batch_per_chip": 3, "largest_batch": 12},
        "steps": {"gradients": {"fits": True, "total_bytes": 2 << 30, "flops": full * 2,
                                "batch": 8, "hbm_fraction": 0.125,
                                "memory_bytes": {}},
                  "r_step": {"fits": False, "error": "Ran out of memory on HBM"}},
        "eigh_plan": hessian.eigh_plan(d=4096, block_sizes=None,
                                       mesh_shape={"data": 4, "model": 1})}
  rep = plan_lib.make_plan_report(config=c, rows=10, compile_report=cr)
  comp = rep["compiled"]
  assert comp["flops_per_example_compiled"] == pytest.approx(full)
  assert comp["compiled_over_analytic"] == pytest.approx(1.0)
  assert comp["largest_batch"] == 12
  assert comp["steps"]["r_step"]["fits"] is False
  text = plan_lib.format_plan(rep)
  assert "DOES NOT FIT" in text and "1.00x analytic" in text
  assert comp["eigh_plan"]["r_bytes_per_chip"] == 4 * 4096 * 4096 // 4
  assert "eigendecomposition on each host (4,096-wide, float32)" in text


@pytest.mark.slow  # A subprocess that builds the 8B shapes.
def test_cli_json_prints_one_line_with_the_8b_plan():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(
      [sys.executable, "-m", "tda.plan", "--config=configs/trackstar_8b.py", "--json"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=True)
  assert out.stdout.count("\n") == 1  # One JSON object on one line; logs on stderr.
  rep = json.loads(out.stdout)
  assert rep["rows"] == 365_000_000 and rep["d"] == 65_536
  assert rep["tables"]["float32"]["tib"] == pytest.approx(87.02, abs=0.01)

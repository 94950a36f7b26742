"""tda.plan: table sizes, analytic kernel FLOPs and chip-hours."""

import json
import os
import subprocess
import sys

import jax
import pytest

from configs import trackstar_8b
from tda import compile_check
from tda import gradients as grad_lib
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
  assert tb["float32"]["bytes"] == 365_000_000 * 262_144
  assert round(tb["float32"]["tib"]) == 87   # 87.02
  assert round(tb["bfloat16"]["tib"]) == 44  # 43.51
  assert round(tb["int8"]["tib"]) == 22      # 21.76
  assert tb["int8"]["tib"] == pytest.approx(365e6 * 65_540 / TIB)


def test_cli_8b_json_reports_c4_tables():
  """`python -m tda.plan --config=configs/trackstar_8b.py --json` (the issue's command)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(
      [sys.executable, "-m", "tda.plan", "--config=configs/trackstar_8b.py", "--json"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=True)
  rep = json.loads(out.stdout)
  assert rep["rows"] == 365_000_000 and rep["d"] == 65_536
  assert rep["tables"]["float32"]["tib"] == pytest.approx(87.02, abs=0.01)
  assert rep["tables"]["bfloat16"]["tib"] == pytest.approx(43.51, abs=0.01)
  assert rep["tables"]["int8"]["tib"] == pytest.approx(21.76, abs=0.01)
  assert rep["params"] == pytest.approx(7.83e9, rel=0.005)
  f = rep["flops_per_example_full_length"]
  # Forward ~ 2 · params · tokens (+ attention); the kernel ~ 2x forward + projection.
  assert f["forward"] == pytest.approx(2 * rep["params"] * 2047, rel=0.08)
  assert 2.0 < f["ratio_to_forward"] < 2.3
  # Chip-hours = rows · FLOPs / (peak · MFU).
  fe = rep["featurisation"]
  expect = 365e6 * rep["flops_per_example_mean_length"]["total"] / (197e12 * 0.4) / 3600
  assert fe["chip_hours"] == pytest.approx(expect)
  assert fe["wall_hours_on_topology"] == pytest.approx(expect / 256)


def _tiny():
  c = trackstar_8b.get_config("runlocal")
  model, params, plan = compile_check.model_and_plan(c)
  return c, model, model_lib.model_config(c), params, plan


def test_analytic_flops_match_xla_cost_analysis():
  """The analytic count against XLA's for the real factored kernel (tiny model, 1 variant)."""
  c, model, model_cfg, params, plan = _tiny()
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


def test_rows_mfu_and_unknown_rows():
  c, *_ = _tiny()  # data.source='world': rows unknown unless given.
  rep = plan_lib.make_plan_report(config=c, topology_name="v4-8")
  assert rep["rows"] is None and "tables" not in rep
  assert rep["peak_bf16_tflops"] == 275.0 and rep["hbm_gib"] == 32.0
  rep2 = plan_lib.make_plan_report(config=c, rows=1000, mfu=0.5, topology_name="v5p-8")
  assert rep2["tables"]["float32"]["bytes"] == 1000 * 4 * rep2["d"]
  assert rep2["featurisation"]["chip_hours"] == pytest.approx(
      1000 * rep2["flops_per_example_mean_length"]["total"] / (459e12 * 0.5) / 3600)
  with pytest.raises(ValueError, match="plan.mfu"):
    plan_lib.make_plan_report(config=c, rows=10, mfu=1.5)
  with pytest.raises(ValueError, match="unknown topology"):
    plan_lib.make_plan_report(config=c, rows=10, topology_name="v9")


def test_compile_report_cross_check():
  c, *_ = _tiny()
  rep0 = plan_lib.make_plan_report(config=c, rows=10, topology_name="v5e-4")
  full = rep0["flops_per_example_full_length"]["total"]
  cr = {"topology": "v5e-4", "libtpu": "0.0.42.1", "mesh": {"data": 4, "model": 1},
        "chips": 4, "batch_search": {"largest_batch_per_chip": 3, "largest_global_batch": 12},
        "steps": {"gradients": {"fits": True, "total_bytes": 2 << 30, "flops": full * 2,
                                "global_batch": 8, "hbm_fraction": 0.125,
                                "memory_bytes": {}},
                  "r_step": {"fits": False, "error": "Ran out of memory on HBM"}}}
  rep = plan_lib.make_plan_report(config=c, rows=10, compile_report=cr)
  comp = rep["compiled"]
  assert comp["flops_per_example_compiled"] == pytest.approx(full)  # 2 · 4 / 8 per example.
  assert comp["compiled_over_analytic"] == pytest.approx(1.0)
  assert comp["largest_global_batch"] == 12
  assert comp["steps"]["r_step"]["fits"] is False
  text = plan_lib.format_plan(rep)
  assert "DOES NOT FIT" in text and "1.00x analytic" in text

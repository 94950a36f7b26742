"""The host allocator policy (`tda.host_memory`) measured: glibc's defaults against
'retain', alternating fresh processes (the policy is process-wide and set at start).

    python scripts/bench_host_memory.py [--rounds=3] [--json] [--config=...]

Each round runs `scripts/bench_gradients.py --json` once under each policy
(`TDA_HOST_MALLOC=system`, then `retain`), so both see the same machine state in
turn. Reports, per policy, the medians over rounds of the per-call times (forward,
factored kernel with both variants, a train step), `factored_over_train_step`, and
the minor page faults per call; then retain's speed-up over system for each (the
ratio of the medians) and the per-round ratios.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tda import cli  # noqa: E402
from tda import host_memory  # noqa: E402

_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternating rounds (one process per policy each).")
_CONFIG = flags.DEFINE_string("config", "configs/trackstar_tiny.py", "Passed to bench_gradients.py.")
_JSON = cli.define_json_flag()

PROGRAMS = ("forward", "factored", "train_step")


def _one(policy: str) -> dict:
  env = dict(os.environ, **{host_memory.ENV: policy})
  env.setdefault("JAX_PLATFORMS", "cpu")
  r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_gradients.py"),
                      f"--config={_CONFIG.value}", "--json"], capture_output=True, text=True,
                     env=env, cwd=ROOT)
  if r.returncode:
    raise RuntimeError(f"bench_gradients.py under {policy} failed:\n{r.stderr[-3000:]}")
  res = json.loads(r.stdout.strip().splitlines()[-1])
  b = res["batch"]
  out = {"host_malloc": res["host_malloc"],
         "factored_over_train_step": res["factored_over_train_step"]}
  for p in PROGRAMS:
    out[f"{p}_ms"] = 1e3 * b / res[f"{p}_examples_per_s"]
    out[f"{p}_faults_per_call"] = res[f"{p}_minor_faults_per_call"]
  return out


def measure() -> dict:
  rounds = []
  for _ in range(_ROUNDS.value):
    rounds.append({policy: _one(policy) for policy in ("system", "retain")})
  res = {"rounds": rounds, "policies": {}}
  for policy in ("system", "retain"):
    keys = [k for k in rounds[0][policy] if k != "host_malloc"]
    res["policies"][policy] = {k: statistics.median(r[policy][k] for r in rounds) for k in keys}
    res["policies"][policy]["host_malloc"] = rounds[0][policy]["host_malloc"]
  for p in PROGRAMS:
    res[f"{p}_speedup"] = (res["policies"]["system"][f"{p}_ms"]
                           / res["policies"]["retain"][f"{p}_ms"])
    res[f"{p}_speedup_per_round"] = [r["system"][f"{p}_ms"] / r["retain"][f"{p}_ms"]
                                     for r in rounds]
  return res


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  with cli.stdout_to_stderr(_JSON.value):
    res = measure()
  if _JSON.value:
    cli.print_json(res)
    return
  print(f"median of {_ROUNDS.value} alternating rounds (scripts/bench_gradients.py, one process "
        "per policy and round)")
  print(f"{'policy':<8}{'program':<12}{'ms/call':>10}{'faults/call':>13}")
  for policy, m in res["policies"].items():
    for p in PROGRAMS:
      print(f"{policy:<8}{p:<12}{m[p + '_ms']:>10.1f}{m[p + '_faults_per_call']:>13.0f}")
    print(f"{policy:<8}factored_over_train_step {m['factored_over_train_step']:.3f}"
          f"   ({m['host_malloc']})")
  for p in PROGRAMS:
    rounds = ", ".join(f"{x:.2f}" for x in res[f"{p}_speedup_per_round"])
    print(f"retain's speed-up, {p}: {res[p + '_speedup']:.2f}x (rounds: {rounds})")


if __name__ == "__main__":
  app.run(main)

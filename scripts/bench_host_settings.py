"""Process-wide host settings measured, in alternating fresh processes (they are set
when a process starts): the host allocator policy (`tda.host_memory`, glibc's
defaults against 'retain') and, optionally, XLA:CPU flag sets on top of 'retain'.

    python scripts/bench_host_settings.py [--rounds=3] [--json] [--config=...] \
        [--xla_flags="--xla_cpu_use_fusion_emitters=false" --xla_flags="..."]

Each round runs `scripts/bench_gradients.py --json` once per setting, in turn
(`TDA_HOST_MALLOC=system`, `retain`, then `retain` with each `--xla_flags` value
appended to XLA_FLAGS; the order rotates round by round), so all see the same
machine state in turn; a run whose policy is not the one asked for is an error.
Reports, per setting, the medians over rounds of the per-call times (forward,
factored kernel with both variants, a train step), `factored_over_train_step` and
the minor page faults per call; then each setting's speed-up over its baseline
(retain over system; a flag set over retain) for each program: the ratio of the
medians, and per round.
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
_CONFIG = flags.DEFINE_string("config", "configs/trackstar_tiny.py",
                              "Passed to bench_gradients.py.")
_XLA = flags.DEFINE_multi_string("xla_flags", [], "An XLA_FLAGS value to measure on top "
                                  "of 'retain' (repeat for several sets).")
_JSON = cli.define_json_flag()

PROGRAMS = ("forward", "factored", "train_step")


def _settings() -> dict[str, dict[str, str]]:
  """Setting name -> the environment it runs under (a flag set is appended to the
  caller's XLA_FLAGS, which every setting inherits)."""
  out = {"system": {host_memory.ENV: "system"}, "retain": {host_memory.ENV: "retain"}}
  for f in _XLA.value:
    out[f"retain {f}"] = {host_memory.ENV: "retain",
                          "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {f}".strip()}
  return out


def _baseline(name: str) -> str | None:
  return {"system": None, "retain": "system"}.get(name, "retain")


def _one(env_extra: dict[str, str]) -> dict:
  env = dict(os.environ, **env_extra)
  env.setdefault("JAX_PLATFORMS", "cpu")
  r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_gradients.py"),
                      f"--config={_CONFIG.value}", "--json"], capture_output=True, text=True,
                     env=env, cwd=ROOT, timeout=1800)
  if r.returncode:
    raise RuntimeError(f"bench_gradients.py under {env_extra} failed:\n{r.stderr[-3000:]}")
  res = json.loads(r.stdout.strip().splitlines()[-1])
  # A comparison only of what was asked for: the policy must have been applied, or not.
  want = env_extra[host_memory.ENV]
  if (res["host_malloc"] == "retain") != (want == "retain"):
    raise RuntimeError(f"asked for {host_memory.ENV}={want}, the run had: {res['host_malloc']}")
  b = res["batch"]
  out = {"host_malloc": res["host_malloc"],
         "factored_over_train_step": res["factored_over_train_step"]}
  for p in PROGRAMS:
    out[f"{p}_ms"] = 1e3 * b / res[f"{p}_examples_per_s"]
    out[f"{p}_faults_per_call"] = res[f"{p}_minor_faults_per_call"]
  return out


def measure() -> dict:
  settings = _settings()
  names = list(settings)
  rounds = []
  for i in range(_ROUNDS.value):  # The order rotates round by round.
    order = names[i % len(names):] + names[:i % len(names)]
    rounds.append({name: _one(settings[name]) for name in order})
  res = {"rounds": rounds, "settings": {}, "speedups": {}}
  for name in settings:
    keys = [k for k in rounds[0][name] if k != "host_malloc"]
    res["settings"][name] = {k: statistics.median(r[name][k] for r in rounds) for k in keys}
    res["settings"][name]["host_malloc"] = rounds[0][name]["host_malloc"]
    base = _baseline(name)
    if base is None:
      continue
    res["speedups"][name] = {"over": base}
    for p in PROGRAMS:
      res["speedups"][name][p] = (res["settings"][base][f"{p}_ms"]
                                  / res["settings"][name][f"{p}_ms"])
      res["speedups"][name][f"{p}_per_round"] = [r[base][f"{p}_ms"] / r[name][f"{p}_ms"]
                                                 for r in rounds]
  return res


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.emit(as_json=_JSON.value, measure=measure, report=_report)


def _report(res) -> None:
  """The medians as a table."""
  print(f"median of {_ROUNDS.value} alternating rounds (scripts/bench_gradients.py, one process "
        "per setting and round)")
  print(f"{'setting':<10}{'program':<12}{'ms/call':>10}{'faults/call':>13}")
  for name, m in res["settings"].items():
    print(f"{name} ({m['host_malloc']}):")
    for p in PROGRAMS:
      print(f"{'':<10}{p:<12}{m[p + '_ms']:>10.1f}{m[p + '_faults_per_call']:>13.0f}")
    print(f"{'':<10}factored_over_train_step {m['factored_over_train_step']:.3f}")
  for name, sp in res["speedups"].items():
    for p in PROGRAMS:
      rounds = ", ".join(f"{x:.2f}" for x in sp[f"{p}_per_round"])
      print(f"{name} over {sp['over']}, {p}: {sp[p]:.2f}x (rounds: {rounds})")


if __name__ == "__main__":
  app.run(main)

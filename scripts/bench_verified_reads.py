"""What verified table reads cost, measured side by side in one process.

    python scripts/bench_verified_reads.py --table=W/tables/trackstar [--rounds=5] [--json]

Reads every shard of a committed table two ways, in interleaved rounds (the
median is reported; these machines are shared and noisy):
  * `verified`: `Table.read_shard`, as every reader now does: each shard's files
    read once, sha256 over their bytes, decoded from memory (unit norms checked
    if `--unit`);
  * `unverified`: tensorstore decoding straight from the files, as readers did
    before, with no check.
Prints both times, their ratio, and the table's stored bytes and rows.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import numpy as np
import tensorstore as ts
from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tda import cli  # noqa: E402
from tda import tables  # noqa: E402

_TABLE = flags.DEFINE_string("table", None, "A committed table folder.", required=True)
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved rounds.")
_UNIT = flags.DEFINE_bool("unit", False, "Check unit norms in the verified read.")
_JSON = cli.define_json_flag()


def _unverified(t: tables.Table) -> int:
  rows = 0
  for info in t.shard_infos:
    d = os.path.join(t.path, "shards", f"{info['shard']:06d}", "vectors")
    arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": d}},
                  open=True, read=True).result()
    x = np.asarray(arr[:info["rows"]].read().result(), np.float32)
    rows += len(x)
  return rows


def _verified(t: tables.Table) -> int:
  return sum(len(x) for _, x in t.shards)


def measure() -> dict:
  """Median seconds to read the whole table, verified and not, in interleaved rounds."""
  t = tables.Table.open(_TABLE.value, unit_norm=_UNIT.value)
  times = {"verified": [], "unverified": []}
  for _ in range(_ROUNDS.value):
    for name, fn in (("unverified", _unverified), ("verified", _verified)):
      t0 = time.perf_counter()
      assert fn(t) == len(t)
      times[name].append(time.perf_counter() - t0)
  med = {k: statistics.median(v) for k, v in times.items()}
  return {"table": _TABLE.value, "rows": len(t), "d": t.d, "dtype": t.dtype,
          "stored_bytes": t.nbytes, "rounds": _ROUNDS.value,
          "verified_s": med["verified"], "unverified_s": med["unverified"],
          "verified_over_unverified": med["verified"] / med["unverified"]}


def _report(out) -> None:
  for k, v in out.items():
    print(f"{k}: {v}")


def main(argv):
  del argv
  cli.emit(as_json=_JSON.value, measure=measure, report=_report)


if __name__ == "__main__":
  app.run(main)

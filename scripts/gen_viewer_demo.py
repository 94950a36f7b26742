"""Writes synthetic proponent results and the viewer page for them (a demo).

    PYTHONPATH=. python scripts/gen_viewer_demo.py --workdir=/tmp/viewer_demo --n_queries=10000

(or `pip install -e .` first).

Then open <workdir>/results/viewer.html in a browser (works offline, file://).
"""

import os
import time

from absl import app
from absl import flags

from tda import viewer

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/viewer_demo", "Where to write results/.")
_N_QUERIES = flags.DEFINE_integer("n_queries", 1000, "Synthetic queries.")
_N_PROPONENTS = flags.DEFINE_integer("n_proponents", 10, "Proponents per query and method.")
_METHODS = flags.DEFINE_list("methods", ["trackstar", "bm25", "dense", "exp1"], "Methods.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")


def main(argv):
  del argv
  t = time.perf_counter()
  viewer.write_synthetic_results(workdir=_WORKDIR.value, n_queries=_N_QUERIES.value,
                                 n_proponents=_N_PROPONENTS.value,
                                 methods=_METHODS.value, seed=_SEED.value)
  t_gen = time.perf_counter() - t
  t = time.perf_counter()
  path = viewer.write_viewer(workdir=_WORKDIR.value)
  print(f"synthetic results {t_gen:.1f} s, page {time.perf_counter() - t:.1f} s: "
        f"{path} ({os.path.getsize(path) / 2**20:.1f} MiB)")


if __name__ == "__main__":
  app.run(main)

"""Writes synthetic proponent results and the viewer page for them (a demo).

    PYTHONPATH=. python scripts/gen_viewer_demo.py --workdir=/tmp/viewer_demo \
        --n_queries=10000 [--json]

(or `pip install -e .` first). Then open <workdir>/results/viewer.html in a
browser (works offline, file://). `write_synthetic_results` is also the tests'
source of large plausible result files.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging

from tda import cli
from tda import fs
from tda import viewer
from tda import workdir as workdir_lib

_FIRST = ("Ada", "Jacques", "Mei", "Omar", "Ines", "Kofi", "Lena", "Ravi", "Sofia",
          "Tomas", "Yuki", "Zara", "Bruno", "Chloe", "Dmitri", "Elif")
_LAST = ("Laurent", "Okafor", "Tanaka", "Silva", "Novak", "Haddad", "Berg",
         "Moreau", "Kowalski", "Mensah", "Rossi", "Ivanova", "Quispe", "Lindqvist")
_PLACES = ("Paris", "Lagos", "Osaka", "Lima", "Prague", "Beirut", "Oslo", "Accra",
           "Turin", "Kraków", "Quito", "Tartu", "Porto", "Izmir")
_RELATIONS = (("place_of_birth", "{s} was born in the city of", "{s} was born in {o}."),
              ("citizenship", "{s} is a citizen of", "{s} holds citizenship of {o}."),
              ("headquarters", "{s} is headquartered in", "The offices of {s} are in {o}."))
_FILLER = ("The museum reopened after a long renovation.",
           "Local markets sell fresh bread every morning.",
           "The river floods most springs.",
           "A new bridge was opened to traffic.",
           "The festival draws visitors from abroad.",
           "Rail service was extended to the coast.")
_BUCKETS = (("1", 1, 1), ("2-3", 2, 3), ("4-10", 4, 10), ("11-30", 11, 30))


def write_synthetic_results(*, workdir: str, n_queries: int = 20,
                            n_proponents: int = 10, n_opponents: int = 3,
                            methods: Sequence[str] = ("trackstar", "bm25"),
                            seed: int = 0) -> list[str]:
  """Writes plausible `results/proponents/<method>.jsonl` files (demos, tests).

  Each query has a pool of fact passages (entail the fact) and distractors
  mentioning the subject; each method ranks a random mix of them, so MRR and
  recall vary by method. Passage ids are shared across methods.

  Returns:
    The paths written.
  """
  rng = random.Random(seed)
  folder = os.path.join(workdir, "results", "proponents")
  fs.makedirs(folder)
  shared = [(f"c4:filler{i:06d}", " ".join(rng.sample(_FILLER, 3)))
            for i in range(max(50, n_queries // 10))]
  rows: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
  for qi in range(n_queries):
    subj = f"{rng.choice(_FIRST)} {rng.choice(_LAST)} {qi}"
    obj = rng.choice(_PLACES)
    rel, prompt_t, fact_t = _RELATIONS[qi % len(_RELATIONS)]
    bucket, lo, hi = _BUCKETS[qi % len(_BUCKETS)]
    freq = rng.randint(lo, hi)
    pool = []
    for j in range(max(2, n_proponents // 2)):
      correct = j < min(freq, 3)
      text = (fact_t.format(s=subj, o=obj) if correct
              else f"{subj} visited {rng.choice(_PLACES)} once.")
      pool.append((f"c4:{qi:07d}{j:02d}", text + " " + rng.choice(_FILLER), correct))
    samples = [obj if rng.random() < 0.6 else rng.choice(_PLACES) for _ in range(4)]
    pred = max(samples, key=samples.count)  # Greedy answer ~ the samples' mode.
    base = {
        "example_id": f"trex_synth:{qi:015d}",
        "fact_id": f"fact{qi:06d}",
        "relation": rel,
        "inputs_plaintext": prompt_t.format(s=subj),
        "targets_plaintext": " " + obj,
        "groundtruth": {"subject": subj, "relation": rel, "object": obj},
        "subject": subj, "object": obj,
        "c4_frequency": freq, "c4_frequency_bucket": bucket,
        "model_prediction": pred, "model_correct": pred == obj,
        "model_confidence": sum(s == obj for s in samples) / len(samples),
        "temperature_samples": samples,
    }
    for m in methods:
      cands = pool + [(i, t, False) for i, t in rng.sample(shared, n_proponents)]
      rng.shuffle(cands)
      cands = cands[:n_proponents]
      scores = sorted((rng.random() for _ in cands), reverse=True)
      opps = rng.sample(shared, n_opponents)
      rows[m].append({
          **base,
          "proponents": [t for _, t, _ in cands],
          "proponent_ids": [i for i, _, _ in cands],
          "proponent_scores": scores,
          "proponent_correct": [c for _, _, c in cands],
          "opponents": [t for _, t in opps],
          "opponent_ids": [i for i, _ in opps],
          "opponent_scores": sorted((-rng.random() for _ in opps)),
      })
  paths = []
  for m in methods:
    path = os.path.join(folder, f"{m}.jsonl")
    workdir_lib.write_jsonl(path, rows[m])
    paths.append(path)
  return paths


def _define_flags() -> None:
  # Defined only when run as a program: tests import this module.
  flags.DEFINE_string("workdir", "/tmp/viewer_demo", "Where to write results/.")
  flags.DEFINE_integer("n_queries", 1000, "Synthetic queries.")
  flags.DEFINE_integer("n_proponents", 10, "Proponents per query and method.")
  flags.DEFINE_list("methods", ["trackstar", "bm25", "dense", "exp1"], "Methods.")
  flags.DEFINE_integer("seed", 0, "Random seed.")
  cli.define_json_flag()


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  fv = flags.FLAGS
  t = time.perf_counter()
  write_synthetic_results(workdir=fv.workdir, n_queries=fv.n_queries,
                          n_proponents=fv.n_proponents, methods=fv.methods, seed=fv.seed)
  gen_s = time.perf_counter() - t
  t = time.perf_counter()
  path = viewer.write_viewer(workdir=fv.workdir)
  res = {"path": path, "bytes": fs.getsize(path), "queries": fv.n_queries,
         "methods": list(fv.methods), "generate_s": gen_s,
         "page_s": time.perf_counter() - t}
  logging.info("synthetic results %.1f s, page %.1f s", res["generate_s"], res["page_s"])
  if fv.json:
    cli.print_json(res)
  else:
    print(f"wrote {path} ({res['bytes'] / 2**20:.1f} MiB); open it in a browser.")


if __name__ == "__main__":
  _define_flags()
  app.run(main)

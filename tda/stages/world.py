"""Stage 'world': the facts and the corpus, generated (`tda.synthetic_world`) or read
from your files (`tda.world.load_byo`), with their ground truth.

Writes `passages.jsonl`, `facts.jsonl` and `stats.json` (the lexical statistics of
docs/DESIGN.md §7: verbatim share, length quantiles and histogram, outlier share);
its summary is the world's counts plus those statistics.
"""

from __future__ import annotations

import os
from typing import Any

from tda import config as config_lib
from tda import synthetic_world
from tda import workdir as wd
from tda import world as world_lib

STAGE = "world"


def fingerprint(ctx) -> dict[str, Any]:
  return ctx.config.world.to_dict()


def make_world(config) -> world_lib.World:
  """The world `config.world` describes (`source`: 'synthetic' or 'byo')."""
  w = config.world
  if w.source == "synthetic":
    return synthetic_world.generate_from_config(config)
  if w.source == "byo":
    return world_lib.load_byo(corpus_path=w.byo_corpus, facts_path=w.byo_facts,
                              sentences_path=w.byo_sentences,
                              bucket_ranges=config_lib.bucket_ranges(config))
  raise ValueError(f"world.source must be 'synthetic' or 'byo', got {w.source!r}")


STATS = "stats.json"


def run(ctx, out_dir: str) -> dict[str, Any]:
  world = make_world(ctx.config)
  world.write(out_dir)
  stats = world.corpus_stats()
  wd.write_json(os.path.join(out_dir, STATS), stats)
  return {**world.stats(), **stats}


def load(ctx) -> world_lib.World:
  return world_lib.World.read(ctx.stage_dir(STAGE))

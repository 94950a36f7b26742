"""Stage 'world': the facts and the corpus, generated (`tda.synthetic_world`) or read
from your files (`tda.world.load_byo`), with their ground truth.

Writes `passages.jsonl`, `facts.jsonl`; its summary is the world's statistics.
"""

from __future__ import annotations

from typing import Any

from tda import config as config_lib
from tda import synthetic_world
from tda import world as world_lib

STAGE = "world"


def fingerprint(ctx) -> dict[str, Any]:
  return ctx.config.world.to_dict()


def make_world(config) -> world_lib.World:
  """The world `config.world` describes (`source`: 'synthetic' or 'byo')."""
  w = config.world
  ranges = config_lib.bucket_ranges(config)
  if w.source == "synthetic":
    return synthetic_world.generate_world(
        seed=w.seed, relations=w.relations, bucket_ranges=ranges,
        facts_per_bucket=w.facts_per_bucket, facts_per_passage=w.facts_per_passage,
        sentences_per_passage=w.sentences_per_passage,
        distractor_passages=w.distractor_passages, filler_passages=w.filler_passages)
  if w.source == "byo":
    return world_lib.load_byo(corpus_path=w.byo_corpus, facts_path=w.byo_facts,
                              sentences_path=w.byo_sentences, bucket_ranges=ranges)
  raise ValueError(f"world.source must be 'synthetic' or 'byo', got {w.source!r}")


def run(ctx, out_dir: str) -> dict[str, Any]:
  world = make_world(ctx.config)
  world.write(out_dir)
  return world.stats()


def load(ctx) -> world_lib.World:
  return world_lib.World.read(ctx.stage_dir(STAGE))

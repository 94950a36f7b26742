"""Stage 'world': the facts and the corpus, generated (`tda.synthetic_world`) or read
from your files (`tda.world.load_byo`), with their ground truth.

Writes `passages.jsonl`, `facts.jsonl` and `stats.json` (the lexical statistics of
docs/DESIGN.md §7: verbatim share, length quantiles and histogram, outlier share);
its summary is the world's counts plus those statistics.

With a streamed corpus (`data.source` != 'world', `tda.corpus`) the world holds only
the queries and their ground truth, read from the released T-REx files
(`tda.trex`); the passages stay in the streamed corpus. `data.local_standin` first
writes a local stand-in for those files (`tda.standin`) into `standin/`.
"""

from __future__ import annotations

import os
from typing import Any

from tda import config as config_lib
from tda import corpus as corpus_lib
from tda import synthetic_world
from tda import workdir as wd
from tda import world as world_lib

STAGE = "world"
STANDIN = "standin"


def fingerprint(ctx) -> dict[str, Any]:
  fp = ctx.config.world.to_dict()
  if corpus_lib.streamed(ctx.config):
    d = ctx.config.data
    fp["streamed_queries"] = {k: d[k] for k in ("trex_facts", "trex_sentences",
                                                "local_standin", "local_standin_rows")}
  return fp


def trex_paths(ctx, stage_dir: str | None = None) -> dict[str, str]:
  """Globs of the T-REx files (and of the stand-in corpus with `data.local_standin`)."""
  d = ctx.config.data
  if d.local_standin:
    from tda import standin  # pylint: disable=g-import-not-at-top
    return standin.globs(os.path.join(stage_dir or ctx.stage_dir(STAGE), STANDIN))
  if not d.trex_facts or not d.trex_sentences:
    raise ValueError("a streamed corpus (data.source=%r) takes its queries from the released "
                     "T-REx files: set data.trex_facts and data.trex_sentences "
                     "(or data.local_standin=True)" % d.source)
  return {"jsonl": d.jsonl, "trex_facts": d.trex_facts, "trex_sentences": d.trex_sentences}


def _streamed_world(ctx, out_dir: str) -> tuple[world_lib.World, dict[str, Any]]:
  from tda import trex  # pylint: disable=g-import-not-at-top
  config = ctx.config
  extra = {}
  if config.data.local_standin:
    from tda import standin  # pylint: disable=g-import-not-at-top
    synthetic = make_world(config)
    standin.build(os.path.join(out_dir, STANDIN), world=synthetic,
                  rows=config.data.local_standin_rows)
    extra["standin_rows"] = config.data.local_standin_rows
  paths = trex_paths(ctx, out_dir)
  facts, stats = trex.load_facts(facts=paths["trex_facts"], sentences=paths["trex_sentences"],
                                 bucket_ranges=config_lib.bucket_ranges(config))
  return world_lib.World(passages=[], facts=facts), {**stats, **extra}


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
  if corpus_lib.streamed(ctx.config):
    world, extra = _streamed_world(ctx, out_dir)
    world.write(out_dir)
    return {**world.stats(), "trex": extra}
  world = make_world(ctx.config)
  world.write(out_dir)
  stats = world.corpus_stats()
  wd.write_json(os.path.join(out_dir, STATS), stats)
  return {**world.stats(), **stats}


def load(ctx) -> world_lib.World:
  return world_lib.World.read(ctx.stage_dir(STAGE))

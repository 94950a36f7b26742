"""A local stand-in for the C4 launch's inputs, built from what is installed.

`build(folder, world=..., rows=N)` writes

* `c4-train.jsonl-0000K-of-0000S`: N passages in C4's format (`text`, `url`,
  `timestamp`): paragraphs of the Python documentation that ships with every
  Python (`pydoc_data.topics`; real English with heavy-tailed lengths), taken in
  order and cycled when N exceeds them (a cycled copy gets its own url);
* `trex_facts.jsonl` and `trex_sentences.jsonl-0000K-of-00002` in the released
  T-REx formats (`tda.trex`): the synthetic world's facts as queries and its
  passages as the sentences, each fact-stating sentence naming its facts by
  (entity0, relation, entity1) triple.

Nothing is downloaded. `configs/trackstar_8b.py:runlocal` streams these files
(`data.local_standin`), the same path a TPU run takes over C4 and the released
T-REx files.
"""

from __future__ import annotations

import os
from typing import Any

from tda import fs
from tda import workdir as wd

C4_PREFIX = "c4-train.jsonl"
TREX_FACTS = "trex_facts.jsonl"
TREX_SENTENCES = "trex_sentences.jsonl"


def paragraphs() -> list[str]:
  """Paragraphs (>= 5 words) of the Python documentation shipped with Python."""
  import pydoc_data.topics  # pylint: disable=g-import-not-at-top
  return [p.strip() for _, v in sorted(pydoc_data.topics.topics.items())
          for p in v.split("\n\n") if len(p.split()) >= 5]


def _write_sharded(folder: str, prefix: str, rows, shards: int) -> list[str]:
  paths = [os.path.join(folder, f"{prefix}-{k:05d}-of-{shards:05d}") for k in range(shards)]
  per = -(-len(rows) // shards)
  for k, p in enumerate(paths):
    wd.write_jsonl(p, rows[k * per:(k + 1) * per])
  return paths


def c4_rows(n: int) -> list[dict[str, Any]]:
  """n C4-format records of real text."""
  paras = paragraphs()
  return [{"text": paras[i % len(paras)],
           "url": f"https://docs.python.org/3/reference/topic/{i % len(paras)}?copy={i // len(paras)}",
           "timestamp": "2019-04-25T12:00:00Z"} for i in range(n)]


def trex_rows(world) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """(facts, sentences) of a `tda.world.World` in the released T-REx formats."""
  facts = []
  for f in world.facts:
    facts.append({
        "fact_id": f["fact_id"], "kilt_id": f"kilt:{f['fact_id']}",
        "entity0": f["subject"], "relation": f["relation"], "entity1": f["object"],
        "entity0_uri": f"synthetic:{f['subject']}", "relation_uri": f"synthetic:{f['relation']}",
        "entity1_uri": f"synthetic:{f['object']}", "entity0_alias": [], "entity1_alias": [],
        "trex_sentences": [], "c4_frequency": f["frequency"], "is_repetition": False,
        "prompt0": f["inputs_plaintext"], "prompt1": f["inputs_plaintext"],
        "prompt2": f["inputs_plaintext"]})
  by_id = {f["fact_id"]: f for f in world.facts}
  sentences = [{"sentence_id": p["id"], "text": p["text"], "abstract_uri": f"synthetic:{p['id']}",
                "sent_idx_in_abst": 0,
                "fact_triples": [[by_id[i]["subject"], by_id[i]["relation"], by_id[i]["object"]]
                                 for i in p["fact_ids"]]}
               for p in world.passages]
  return facts, sentences


def build(folder: str, *, world, rows: int, c4_shards: int = 4) -> dict[str, str]:
  """Writes the stand-in files into `folder`; returns the globs to stream them."""
  fs.makedirs(folder)
  _write_sharded(folder, C4_PREFIX, c4_rows(rows), c4_shards)
  facts, sentences = trex_rows(world)
  wd.write_jsonl(os.path.join(folder, TREX_FACTS), facts)
  _write_sharded(folder, TREX_SENTENCES, sentences, 2)
  return globs(folder)


def globs(folder: str) -> dict[str, str]:
  """The globs of the stand-in files in `folder`."""
  return {"jsonl": os.path.join(folder, f"{C4_PREFIX}-*"),
          "trex_facts": os.path.join(folder, TREX_FACTS),
          "trex_sentences": os.path.join(folder, f"{TREX_SENTENCES}-*")}


def build_c4_tfds(folder: str, rows, *, name: str = "standin_c4") -> str:
  """A TFDS dataset `name`:3.1.0 in C4's format (`text`, `url`, `timestamp`) of
  `rows` (dicts with those keys), built locally under `folder`; returns its
  version folder (`<folder>/<name>/3.1.0`)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  # Not registered by name (a second build in one process would clash): readers
  # find the prepared files by `data_dir`, as for any dataset built elsewhere.
  with tfds.core.registered.skip_registration():
    builder_cls = _c4_format_builder(tfds, rows, name)
  b = builder_cls(data_dir=folder)
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return os.path.join(folder, b.info.name, str(b.info.version))


def _c4_format_builder(tfds, rows, name: str):
  class C4Format(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("3.1.0")
    code_path = None  # Built in memory: no checksums file beside the code.

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "text": tfds.features.Text(), "url": tfds.features.Text(),
          "timestamp": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, r in enumerate(rows):
        yield i, r

  C4Format.name = name
  return C4Format


"""T-REx as released with the TrackStar paper: queries and ground truth, streamed.

Files (github.com/PAIR-code/pretraining-tda):

* `trex_facts*.jsonl` (the 1.2M facts, or the 5.4K-fact `trex_facts_sample.jsonl`):
  `fact_id`, `kilt_id`, `entity0`, `relation`, `entity1`, `entity0_uri`,
  `relation_uri` (the README calls it `predicate_uri`; either is read), `entity1_uri`,
  `entity0_alias`, `entity1_alias`, `trex_sentences` (ids of the sentences stating
  the fact), `c4_frequency`, `is_repetition`, `prompt0`, `prompt1`, `prompt2`.
  The query is `prompt0` (input) and `entity1` (target), as in the paper.
* `trex_sentences.jsonl-000XX-of-00020`: `sentence_id`, `text`, `abstract_uri`,
  `sent_idx_in_abst`, `fact_triples` (the facts the sentence states: fact ids, or
  triples matched against the facts by (entity0, relation, entity1) or by URIs).

A fact's ground truth is the union of its `trex_sentences` and the sentences whose
`fact_triples` name it, restricted to sentences present in the sentence files.
Both files are read one record at a time; only the facts, and for each sentence
only its id if it entails a fact, are kept (the sentence texts stay on disk: the
corpus streams them, `tda.corpus`).
"""

from __future__ import annotations

import collections
import logging
from typing import Any, Sequence

from tda import config as config_lib
from tda import corpus as corpus_lib

FACT_FIELDS = ("fact_id", "kilt_id", "entity0", "relation", "entity1", "entity0_uri",
               "relation_uri", "entity1_uri", "entity0_alias", "entity1_alias",
               "trex_sentences", "c4_frequency", "is_repetition", "prompt0", "prompt1",
               "prompt2")
SENTENCE_FIELDS = ("sentence_id", "text", "abstract_uri", "sent_idx_in_abst", "fact_triples")
# Needed to build a query and its ground truth; the rest are kept when present.
_FACT_REQUIRED = ("fact_id", "entity0", "relation", "entity1", "trex_sentences", "prompt0")
_SENTENCE_REQUIRED = ("sentence_id", "fact_triples")


def _require(row: dict, keys, where: str) -> None:
  missing = [k for k in keys if k not in row]
  if missing:
    raise ValueError(f"{where}: lacks field(s) {missing}")


def _bucket_of(freq: int, ranges) -> str | None:
  for name, lo, hi in ranges:
    if lo <= freq <= hi:
      return name
  top = max(ranges, key=lambda b: b[2])
  return top[0] if freq > top[2] else None


def read_facts(patterns: str | Sequence[str], *, max_facts: int | None = None
               ) -> list[dict[str, Any]]:
  """The fact records of `trex_facts*.jsonl` files (in file order), checked."""
  facts, seen = [], {}
  for path in corpus_lib.expand_globs(patterns):
    for j, row in corpus_lib.iter_records(path):
      where = f"{path} record {j}"
      _require(row, _FACT_REQUIRED, where)
      if "relation_uri" not in row and "predicate_uri" in row:
        row["relation_uri"] = row["predicate_uri"]
      if row["fact_id"] in seen:
        raise ValueError(f"{where}: duplicate fact_id {row['fact_id']!r} (first: {seen[row['fact_id']]})")
      if not isinstance(row["trex_sentences"], list):
        raise ValueError(f"{where}: trex_sentences must be a list of sentence ids")
      if not str(row["entity1"]).strip() or not str(row["prompt0"]).strip():
        raise ValueError(f"{where}: empty prompt0 or entity1")
      seen[row["fact_id"]] = where
      facts.append(row)
      if max_facts is not None and len(facts) >= max_facts:
        return facts
  return facts


def ground_truth(facts: Sequence[dict[str, Any]], sentence_patterns: str | Sequence[str]
                 ) -> dict[str, list[str]]:
  """{fact_id: ids of the sentences (present in the files) that state it}, streamed."""
  by_id = {str(f["fact_id"]): f for f in facts}
  by_triple = collections.defaultdict(set)
  listed = collections.defaultdict(set)   # sentence id -> facts listing it
  for f in facts:
    fid = str(f["fact_id"])
    by_triple[(f["entity0"], f["relation"], f["entity1"])].add(fid)
    if f.get("entity0_uri") and f.get("relation_uri") and f.get("entity1_uri"):
      by_triple[(f["entity0_uri"], f["relation_uri"], f["entity1_uri"])].add(fid)
    for s in f["trex_sentences"]:
      listed[str(s)].add(fid)
  support = collections.defaultdict(list)
  seen = set()
  for path in corpus_lib.expand_globs(sentence_patterns):
    for j, row in corpus_lib.iter_records(path):
      where = f"{path} record {j}"
      _require(row, _SENTENCE_REQUIRED, where)
      sid = str(row["sentence_id"])
      if sid in seen:
        raise ValueError(f"{where}: duplicate sentence_id {sid!r}")
      seen.add(sid)
      if not isinstance(row["fact_triples"], list):
        raise ValueError(f"{where}: fact_triples must be a list")
      ids = set(listed.get(sid, ()))
      for t in row["fact_triples"]:
        if isinstance(t, (str, int)) and str(t) in by_id:
          ids.add(str(t))
        elif isinstance(t, (list, tuple)) and len(t) == 3:
          ids |= by_triple.get(tuple(t), set())
      for fid in sorted(ids):
        support[fid].append(sid)
  return support


def load_facts(*, facts: str | Sequence[str], sentences: str | Sequence[str],
               bucket_ranges=config_lib.DEFAULT_BUCKETS, max_facts: int | None = None
               ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """The queries and their ground truth as world fact records (`tda.world`), and stats.

  A fact's frequency is the number of sentences stating it; facts stated by no
  sentence in the files have no ground truth and are left out (counted in the stats).
  """
  rows = read_facts(facts, max_facts=max_facts)
  support = ground_truth(rows, sentences)
  ranges = [(str(n), int(lo), int(hi)) for n, lo, hi in bucket_ranges]
  out, dropped = [], []
  for f in rows:
    fid = str(f["fact_id"])
    freq = len(support.get(fid, ()))
    bucket = _bucket_of(freq, ranges) if freq else None
    if bucket is None:
      dropped.append(fid)
      continue
    out.append({
        "fact_id": fid, "example_id": f"trex:{fid}", "relation": f["relation"],
        "subject": f["entity0"], "object": f["entity1"],
        "inputs_plaintext": str(f["prompt0"]).strip(),
        "targets_plaintext": str(f["entity1"]).strip(),
        "aliases": list(f.get("entity1_alias") or []),
        "c4_frequency": f.get("c4_frequency"), "kilt_id": f.get("kilt_id"),
        "frequency": freq, "bucket": bucket, "passage_ids": support[fid]})
  if dropped:
    logging.warning("T-REx: %d of %d facts are stated by no sentence in the sentence files "
                    "(or fall in no frequency bucket) and are left out, e.g. %s",
                    len(dropped), len(rows), dropped[:5])
  if not out:
    raise ValueError("T-REx: no fact has a ground-truth sentence in the sentence files")
  return out, {"facts_read": len(rows), "facts_without_sentence": len(dropped)}

"""The world record: passages and facts with exact ground truth, as committed by the
`world` stage, and the reader of bring-your-own data in the released T-REx formats.

A world comes from `tda.synthetic_world.generate_world` (the embedded default) or
from `load_byo` (your files).

Records (plain dicts):
  passage: {"id", "text", "kind": "fact"|"distractor"|"filler"|"outlier", "fact_ids": [...]}
  fact:    {"fact_id", "example_id", "relation", "subject", "object",
            "inputs_plaintext", "targets_plaintext" (no leading space; joined to the
            prompt with one space), "frequency" (entailing passages), "bucket",
            "passage_ids" (every passage that entails the fact); optionally
            "subject_aliases", "object_aliases" (other names of the entities)}
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any, Sequence

import numpy as np

from tda import config as config_lib
from tda import errors
from tda import fs
from tda import workdir as workdir_lib

PASSAGES, FACTS = "passages.jsonl", "facts.jsonl"


@dataclasses.dataclass(frozen=True)
class World:
  """Passages and facts (plain dicts; see the module docstring for their keys)."""
  passages: list[dict[str, Any]]
  facts: list[dict[str, Any]]

  def stats(self) -> dict[str, Any]:
    """Counts per passage kind, per bucket and per relation; mean passage words."""
    words = [len(p["text"].split()) for p in self.passages]
    freq = collections.defaultdict(list)
    for f in self.facts:
      freq[f["bucket"]].append(f["frequency"])
    return {
        "passages": len(self.passages),
        "facts": len(self.facts),
        "kinds": dict(collections.Counter(p["kind"] for p in self.passages)),
        "buckets": {b: len(v) for b, v in freq.items()},
        "bucket_frequency": {b: [min(v), max(v)] for b, v in freq.items()},
        "relations": dict(collections.Counter(f["relation"] for f in self.facts)),
        "fact_passage_slots": sum(f["frequency"] for f in self.facts),
        "mean_words_per_passage": sum(words) / max(len(words), 1),
    }

  def corpus_stats(self) -> dict[str, Any]:
    """The lexical statistics docs/DESIGN.md §7 fixes from the real setting.

    verbatim_share: share of (fact, entailing passage) pairs whose passage holds
      the query's prompt + " " + target verbatim.
    co_mention_distractors: (fact, passage) pairs where the passage names the
      fact's subject and object (any alias) but does not entail the fact.
    length_*: passage lengths in whitespace words; the histogram's bins are
      [edges[i], edges[i+1]) with the last one open.
    outlier_share: share of passages of kind 'outlier'.
    """
    text = {p["id"]: p["text"] for p in self.passages}
    words = np.array([len(p["text"].split()) for p in self.passages])
    pairs = verbatim = co = 0
    for f in self.facts:
      prompt = f"{f['inputs_plaintext']} {f['targets_plaintext']}"
      for pid in f["passage_ids"]:
        pairs += 1
        verbatim += prompt in text[pid]
      subj = [f.get("subject")] + list(f.get("subject_aliases", ()))
      obj = [f.get("object")] + list(f.get("object_aliases", ()))
      if None in (subj[0], obj[0]):
        continue
      entailing = set(f["passage_ids"])
      co += sum(1 for p in self.passages if p["id"] not in entailing
                and any(s in p["text"] for s in subj) and any(o in p["text"] for o in obj))
    p50, p95 = (np.percentile(words, [50, 95]) if len(words) else (0.0, 0.0))
    edges = [0, 8, 16, 32, 64, 128, 256, 512]
    counts = np.histogram(words, bins=edges + [max(int(words.max(initial=0)), 512) + 1])[0]
    return {
        "verbatim_share": verbatim / max(pairs, 1),
        "co_mention_distractors": int(co),
        "outlier_share": sum(p["kind"] == "outlier" for p in self.passages)
                         / max(len(self.passages), 1),
        "length_p50_words": float(p50),
        "length_p95_words": float(p95),
        "length_p95_over_p50": float(p95 / p50) if p50 else None,
        "length_max_words": int(words.max(initial=0)),
        "length_histogram": {"edges_words": edges, "counts": [int(c) for c in counts]},
    }

  def write(self, folder: str) -> None:
    """Writes `passages.jsonl` and `facts.jsonl` into `folder`."""
    workdir_lib.write_jsonl(os.path.join(folder, PASSAGES), self.passages)
    workdir_lib.write_jsonl(os.path.join(folder, FACTS), self.facts)

  @classmethod
  def read(cls, folder: str) -> "World":
    """The world written into `folder` by `write`."""
    return cls(passages=workdir_lib.read_jsonl(os.path.join(folder, PASSAGES)),
               facts=workdir_lib.read_jsonl(os.path.join(folder, FACTS)))


# --- Bring your own data (released T-REx formats) -------------------------------


def _read_jsonl(path: str, what: str, required: Sequence[str]) -> list[dict[str, Any]]:
  """Rows of a JSONL file; errors name the file, the line and the field."""
  if not path:
    raise errors.UserError(f"load_byo: no path given for the {what} file")
  if not fs.exists(path):
    raise errors.MissingInput(f"load_byo: {what} file {path} does not exist")
  rows = []
  for lineno, row in workdir_lib.iter_jsonl(path):
    if not isinstance(row, dict):
      raise errors.UserError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
    missing = [k for k in required if k not in row]
    if missing:
      raise errors.UserError(f"{path}:{lineno}: {what} row lacks field(s) {missing}")
    rows.append({**row, "_line": lineno})
  return rows


def _unique(rows, key, path):
  seen = {}
  for r in rows:
    if r[key] in seen:
      raise ValueError(f"{path}:{r['_line']}: duplicate {key} {r[key]!r} "
                       f"(first on line {seen[r[key]]})")
    seen[r[key]] = r["_line"]


def _bucket_of(freq: int, bucket_ranges) -> str:
  for name, lo, hi in bucket_ranges:
    if lo <= freq <= hi:
      return name
  top = max(bucket_ranges, key=lambda b: b[2])
  if freq > top[2]:
    return top[0]  # Above the top range: counted with the most frequent facts.
  raise ValueError(f"world.bucket_ranges {bucket_ranges} has no bucket for frequency {freq}")


def load_byo(*, corpus_path: str, facts_path: str, sentences_path: str,
             bucket_ranges: Sequence[tuple[str, int, int]] = config_lib.DEFAULT_BUCKETS
             ) -> World:
  """Loads a world from T-REx-format files.

  Args:
    corpus_path: JSONL with `id`, `text` (passages that entail nothing known).
    facts_path: JSONL with `fact_id`, `relation`, `inputs_plaintext`,
      `targets_plaintext`; optional `subject`, `object`, `example_id`.
    sentences_path: JSONL with `sentence_id`, `text`, `fact_triples` (fact ids,
      or [subject, relation, object] triples matched against the facts).
    bucket_ranges: (name, lo, hi) frequency buckets.

  Returns:
    The World: corpus rows (kind 'filler', no fact_ids), then sentence rows
    (kind 'fact'); each fact's frequency counts the sentences entailing it.

  Raises:
    FileNotFoundError: a file is missing.
    ValueError: bad JSON (with line), a missing field, a duplicate id, a triple
      matching no fact, or a fact no sentence entails.
  """
  corpus = _read_jsonl(corpus_path, "corpus", ("id", "text"))
  fact_rows = _read_jsonl(facts_path, "facts", ("fact_id", "relation", "inputs_plaintext",
                                                "targets_plaintext"))
  sent_rows = _read_jsonl(sentences_path, "sentences", ("sentence_id", "text", "fact_triples"))
  _unique(fact_rows, "fact_id", facts_path)
  _unique(corpus, "id", corpus_path)
  _unique(sent_rows, "sentence_id", sentences_path)
  corpus_ids = {r["id"]: r["_line"] for r in corpus}
  for r in sent_rows:
    if r["sentence_id"] in corpus_ids:
      raise ValueError(f"{sentences_path}:{r['_line']}: sentence_id {r['sentence_id']!r} "
                       f"is also a corpus id ({corpus_path}:{corpus_ids[r['sentence_id']]})")

  by_id = {f["fact_id"]: f for f in fact_rows}
  by_triple = collections.defaultdict(list)
  for f in fact_rows:
    if f.get("subject") is not None and f.get("object") is not None:
      by_triple[(f["subject"], f["relation"], f["object"])].append(f["fact_id"])
  passages = [{"id": str(r["id"]), "text": r["text"], "kind": "filler", "fact_ids": []}
              for r in corpus]
  support = collections.defaultdict(list)
  for r in sent_rows:
    if not isinstance(r["fact_triples"], list):
      raise ValueError(f"{sentences_path}:{r['_line']}: fact_triples must be a list")
    ids = []
    for t in r["fact_triples"]:
      if isinstance(t, str) and t in by_id:
        ids.append(t)
      elif isinstance(t, (list, tuple)) and len(t) == 3 and tuple(t) in by_triple:
        ids.extend(by_triple[tuple(t)])
      else:
        raise ValueError(f"{sentences_path}:{r['_line']}: fact_triple {t!r} matches no fact "
                         f"in {facts_path}")
    ids = sorted(set(ids))
    passages.append({"id": str(r["sentence_id"]), "text": r["text"],
                     "kind": "fact" if ids else "filler", "fact_ids": ids})
    for i in ids:
      support[i].append(str(r["sentence_id"]))

  unsupported = [f["fact_id"] for f in fact_rows if not support[f["fact_id"]]]
  if unsupported:
    raise ValueError(f"{facts_path}: {len(unsupported)} fact(s) have no entailing sentence in "
                     f"{sentences_path}: {unsupported[:10]}")
  ranges = [(str(n), int(lo), int(hi)) for n, lo, hi in bucket_ranges]
  facts = []
  for f in fact_rows:
    freq = len(support[f["fact_id"]])
    facts.append({
        "fact_id": f["fact_id"], "example_id": f.get("example_id", f"trex_byo:{f['fact_id']}"),
        "relation": f["relation"], "subject": f.get("subject"), "object": f.get("object"),
        "inputs_plaintext": f["inputs_plaintext"], "targets_plaintext": f["targets_plaintext"],
        "frequency": freq, "bucket": _bucket_of(freq, ranges),
        "passage_ids": support[f["fact_id"]]})
  return World(passages=passages, facts=facts)

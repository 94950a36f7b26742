"""The training corpus as one interface, in memory or streamed.

Every stage that reads training passages (tables, the R_train and V samples, the
baselines, retrieval's and evaluation's passage text lookup) goes through a
`Corpus`: `len(corpus)` global rows, each with a stable id and a text, read by
row ranges. `data.source` chooses it:

* 'world' (default): the committed world's passages, tokenised in memory through
  their seqio task (`tda.data.world_arrays`), as before.
* 'tfds': any TFDS text dataset (`data.tfds_name`, e.g. 'c4/en:3.1.0', split
  `data.split`, from `data.tfds_data_dir`; a folder path of a prepared dataset also
  works), read by example-index slices (`train[lo:hi]`), so a process opens only
  the files holding its rows.
* 'seqio': the source of a registered seqio task (`data.seqio_task`), read by
  skip/take over its unshuffled source (streamed; constant memory).
* 'jsonl': sharded JSONL files (`data.jsonl`: comma-separated globs, sorted);
  row numbers come from one streamed newline count per file.

All streamed sources may be followed by the T-REx sentences
(`data.trex_sentences`, `tda.trex`) so that the passages entailing the queries'
facts are part of the corpus (`ConcatCorpus`).

Row ids are global and stable: the record's `data.id_key` field when set (C4's
'url'; T-REx's 'sentence_id'), else `<dataset>/<split>/<example index>` (tfds,
seqio) or `<file name>:<line index>` (jsonl). Texts are tokenised on the fly with
the model's vocabulary (tokens, then EOS), truncated at `data.seq_len`; the number
truncated is returned with every block of rows and reported by the tables stage.

Memory: a stage holds one block of rows at a time (`tables.rows_per_shard`), so
its peak memory does not grow with the corpus (tests/test_corpus.py measures it).
"""

from __future__ import annotations

import abc
import bisect
import dataclasses
import glob as glob_lib
import json
import os
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from tda import fs

STREAMED = ("tfds", "seqio", "jsonl")
SOURCES = ("world",) + STREAMED
EOS_ID = 1


@dataclasses.dataclass
class Rows:
  """A block of tokenised rows: tokens then EOS then 0s, cut at seq_len."""
  ids: list[str]
  tokens_nt: np.ndarray   # int32 [n, seq_len]
  n_truncated: int        # Rows whose tokens + EOS did not fit in seq_len.


def tokenize(texts: Sequence[str], *, vocab, seq_len: int) -> tuple[np.ndarray, int]:
  """[n, seq_len] int32 rows (tokens + EOS, truncated) and how many were truncated."""
  out = np.zeros((len(texts), seq_len), np.int32)
  truncated = 0
  for i, t in enumerate(texts):
    toks = list(vocab.encode(t)) + [EOS_ID]
    if len(toks) > seq_len:
      truncated += 1
      toks = toks[:seq_len]
    out[i, :len(toks)] = toks
  return out, truncated


class Corpus(abc.ABC):
  """Global rows [0, len) with stable ids and texts, read by row ranges."""

  @abc.abstractmethod
  def __len__(self) -> int:
    """Number of rows."""

  @abc.abstractmethod
  def texts(self, lo: int, hi: int) -> Iterator[tuple[str, str]]:
    """(row id, text) of rows [lo, hi), in row order."""

  @abc.abstractmethod
  def fingerprint(self) -> dict[str, Any]:
    """What the rows are read from (part of every reading stage's fingerprint)."""

  def row_of(self, row_id: str) -> int | None:
    """The row of an id when it can be told without reading (None: unknown)."""
    del row_id
    return None

  def _check(self, lo: int, hi: int) -> tuple[int, int]:
    n = len(self)
    if not 0 <= lo <= hi <= n:
      raise ValueError(f"rows [{lo}, {hi}) are outside the corpus [0, {n}).")
    return lo, hi

  def tokens(self, lo: int, hi: int, *, vocab, seq_len: int) -> Rows:
    """Rows [lo, hi) tokenised with `vocab`."""
    ids, texts = [], []
    for i, t in self.texts(*self._check(lo, hi)):
      ids.append(i)
      texts.append(t)
    if len(ids) != hi - lo:
      raise ValueError(f"{type(self).__name__}: asked rows [{lo}, {hi}), got {len(ids)}.")
    tok, trunc = tokenize(texts, vocab=vocab, seq_len=seq_len)
    return Rows(ids=ids, tokens_nt=tok, n_truncated=trunc)

  def take(self, rows: Iterable[int], *, vocab, seq_len: int, block: int = 4096) -> Rows:
    """The given rows (any order, no repeats), tokenised, in the order given.

    Reads only the `block`-row ranges that hold a requested row, so memory is
    that of the rows taken plus one block.
    """
    rows = [int(r) for r in rows]
    if len(set(rows)) != len(rows):
      raise ValueError("take: repeated rows")
    want = {r: k for k, r in enumerate(rows)}
    ids: list[str | None] = [None] * len(rows)
    texts: list[str | None] = [None] * len(rows)
    for b in sorted({r // block for r in rows}):
      lo, hi = b * block, min((b + 1) * block, len(self))
      keep = sorted(r for r in want if lo <= r < hi)
      first, last = keep[0], keep[-1] + 1
      for r, (i, t) in zip(range(first, last), self.texts(*self._check(first, last))):
        if r in want:
          ids[want[r]], texts[want[r]] = i, t
    tok, trunc = tokenize(texts, vocab=vocab, seq_len=seq_len)
    return Rows(ids=ids, tokens_nt=tok, n_truncated=trunc)

  def lookup(self, wanted: Iterable[str], *, missing_ok: bool = False) -> dict[str, str]:
    """{id: text} of the given ids: read directly where `row_of` knows the row,
    else by one streamed pass (memory: the texts returned). Unknown ids raise
    unless `missing_ok` (then they are left out)."""
    wanted = set(wanted)
    out: dict[str, str] = {}
    direct = {i: self.row_of(i) for i in wanted}
    for i, r in direct.items():
      if r is not None:
        for got, text in self.texts(r, r + 1):
          if got == i:
            out[i] = text
    rest = wanted - set(out)
    if rest:
      for i, text in self.texts(0, len(self)):
        if i in rest:
          out[i] = text
          if len(out) == len(wanted):
            break
    missing = wanted - set(out)
    if missing and not missing_ok:
      raise KeyError(f"{len(missing)} passage id(s) are not in the corpus, e.g. "
                     f"{sorted(missing)[:5]}")
    return out

  def shards(self, rows_per_shard: int, process_index: int = 0,
             num_processes: int = 1) -> list[tuple[int, int, int]]:
    """(shard, lo, hi) of the shards one process owns (s % processes == index)."""
    n = len(self)
    return [(s, s * rows_per_shard, min((s + 1) * rows_per_shard, n))
            for s in range(process_index, -(-n // rows_per_shard), num_processes)]


class WorldCorpus(Corpus):
  """The committed world's passages (data.source='world'), tokenised in memory by
  their seqio task exactly as the other stages see them (`ctx.arrays`)."""

  def __init__(self, *, arrays, texts: Sequence[str], world_digest: str):
    self.arrays, self._texts, self._digest = arrays, list(texts), world_digest
    self._row = {i: r for r, i in enumerate(arrays.ids)}

  def __len__(self) -> int:
    return len(self.arrays.ids)

  def fingerprint(self) -> dict[str, Any]:
    return {"source": "world", "world": self._digest}

  def texts(self, lo, hi):
    for r in range(lo, hi):
      yield self.arrays.ids[r], self._texts[r]

  def row_of(self, row_id):
    return self._row.get(row_id)

  def tokens(self, lo, hi, *, vocab=None, seq_len=None) -> Rows:
    del vocab, seq_len  # Already tokenised through the world's seqio task.
    lo, hi = self._check(lo, hi)
    tok = self.arrays.tokens_nt[lo:hi]
    # A truncated row fills every column and lost its EOS.
    return Rows(ids=list(self.arrays.ids[lo:hi]), tokens_nt=tok,
                n_truncated=int(((tok[:, -1] != 0) & (tok[:, -1] != EOS_ID)).sum()))

  def take(self, rows, *, vocab=None, seq_len=None, block=0) -> Rows:
    rows = np.asarray(list(rows), np.int64)
    return Rows(ids=[self.arrays.ids[r] for r in rows], tokens_nt=self.arrays.tokens_nt[rows],
                n_truncated=0)


def _index_id(prefix: str, row: int) -> str:
  return f"{prefix}/{row}"


def _parse_index_id(prefix: str, row_id: str) -> int | None:
  head, _, tail = row_id.rpartition("/")
  return int(tail) if head == prefix and tail.isdigit() else None


def _text_of(ex: dict, key: str, where: str) -> str:
  if key not in ex:
    raise KeyError(f"{where}: record has no text field {key!r} (fields: {sorted(ex)}); "
                   "set data.text_key.")
  v = ex[key]
  return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def _id_of(ex: dict, key: str | None, default: str, where: str) -> str:
  if not key:
    return default
  if key not in ex:
    raise KeyError(f"{where}: record has no id field {key!r}; set data.id_key.")
  v = ex[key]
  return v.decode("utf-8") if isinstance(v, bytes) else str(v)


class TfdsCorpus(Corpus):
  """A TFDS dataset split, read by example-index slices."""

  def __init__(self, *, name: str, data_dir: str | None = None, split: str = "train",
               text_key: str = "text", id_key: str | None = None,
               max_rows: int | None = None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    from tda import data  # noqa: F401  (keeps TF off accelerators)
    self.name, self.split, self.text_key, self.id_key = name, split, text_key, id_key
    if fs.is_remote(name) or os.path.isdir(name):  # A prepared builder's folder.
      self.builder = tfds.builder_from_directory(name)
      self._prefix = f"{self.builder.info.full_name}/{split}"
    else:
      self.builder = tfds.builder(name, data_dir=data_dir)
      self._prefix = f"{name}/{split}"
    splits = self.builder.info.splits
    if split not in splits:
      raise ValueError(f"tfds dataset {name!r} has no split {split!r}; it has {list(splits)}.")
    n = int(splits[split].num_examples)
    self._n = n if max_rows is None else min(n, int(max_rows))
    self._tfds = tfds

  def __len__(self):
    return self._n

  def fingerprint(self):
    return {"source": "tfds", "name": self.builder.info.full_name, "split": self.split,
            "rows": self._n, "text_key": self.text_key, "id_key": self.id_key}

  def texts(self, lo, hi):
    if hi <= lo:
      return
    ds = self.builder.as_dataset(split=f"{self.split}[{lo}:{hi}]", shuffle_files=False,
                                 read_config=self._tfds.ReadConfig(try_autocache=False))
    where = f"tfds {self.name}"
    for r, ex in zip(range(lo, hi), self._tfds.as_numpy(ds)):
      yield _id_of(ex, self.id_key, _index_id(self._prefix, r), where), \
          _text_of(ex, self.text_key, where)

  def row_of(self, row_id):
    return None if self.id_key else _parse_index_id(self._prefix, row_id)


class SeqioCorpus(Corpus):
  """The (unshuffled) source of a registered seqio task, read by skip/take."""

  def __init__(self, *, task: str, split: str = "train", text_key: str = "text",
               id_key: str | None = None, max_rows: int | None = None):
    import seqio  # pylint: disable=g-import-not-at-top
    from tda import data  # noqa: F401
    self.task, self.split, self.text_key, self.id_key = task, split, text_key, id_key
    try:
      self.source = seqio.get_mixture_or_task(task).source
    except ValueError as e:
      raise ValueError(f"data.seqio_task {task!r} is not a registered seqio task "
                       "(import the module that registers it first).") from e
    n = self.source.num_input_examples(split)
    if n is None:
      raise ValueError(f"seqio task {task!r} does not know its number of {split!r} "
                       "examples; its source must report num_input_examples.")
    self._n = int(n) if max_rows is None else min(int(n), int(max_rows))
    self._prefix = f"{task}/{split}"

  def __len__(self):
    return self._n

  def fingerprint(self):
    return {"source": "seqio", "task": self.task, "split": self.split, "rows": self._n,
            "text_key": self.text_key, "id_key": self.id_key}

  def texts(self, lo, hi):
    if hi <= lo:
      return
    ds = self.source.get_dataset(split=self.split, shuffle=False).skip(lo).take(hi - lo)
    where = f"seqio task {self.task}"
    for r, ex in zip(range(lo, hi), ds.as_numpy_iterator()):
      yield _id_of(ex, self.id_key, _index_id(self._prefix, r), where), \
          _text_of(ex, self.text_key, where)

  def row_of(self, row_id):
    return None if self.id_key else _parse_index_id(self._prefix, row_id)


def expand_globs(patterns: str | Sequence[str]) -> list[str]:
  """Sorted files matching comma-separated globs (local or gs://); none matching is an error."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  if isinstance(patterns, str):
    patterns = [p for p in patterns.split(",") if p.strip()]
  files = []
  for p in patterns:
    p = p.strip()
    if "://" in p:
      head, _, tail = p.rpartition("/")
      hits = sorted(str(x) for x in epath.Path(head).glob(tail))
    else:
      hits = sorted(glob_lib.glob(os.path.expanduser(p)))
    if not hits:
      raise FileNotFoundError(f"no file matches {p!r}")
    files += hits
  return sorted(dict.fromkeys(files))


def _open(path: str, mode: str = "r"):
  from etils import epath  # pylint: disable=g-import-not-at-top
  return epath.Path(path).open(mode)


def count_lines(path: str) -> int:
  """Records (non-empty lines) in a JSONL file, streamed."""
  n = 0
  with _open(path) as f:
    for line in f:
      n += bool(line.strip())
  return n


def iter_records(path: str, start: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
  """(record index, object) of a JSONL file from record `start`; errors name the line."""
  k = 0
  with _open(path) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      if k >= start:
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{lineno}: bad JSON ({e.msg})") from e
        if not isinstance(row, dict):
          raise ValueError(f"{path}:{lineno}: expected a JSON object")
        yield k, row
      k += 1


class JsonlCorpus(Corpus):
  """Sharded JSONL files, one record a line, in sorted file order."""

  def __init__(self, *, files: str | Sequence[str], text_key: str = "text",
               id_key: str | None = None, max_rows: int | None = None):
    self.files = expand_globs(files)
    self.text_key, self.id_key = text_key, id_key
    counts = [count_lines(f) for f in self.files]
    self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64).tolist()
    n = self._starts[-1]
    self._n = n if max_rows is None else min(n, int(max_rows))
    self._by_name = {os.path.basename(f): k for k, f in enumerate(self.files)}
    if len(self._by_name) != len(self.files):
      raise ValueError(f"data.jsonl: two files share a name in {self.files}; row ids "
                       "are <file name>:<line>, so names must be unique.")

  def __len__(self):
    return self._n

  def fingerprint(self):
    return {"source": "jsonl", "files": [os.path.basename(f) for f in self.files],
            "rows_per_file": np.diff(self._starts).tolist(), "rows": self._n,
            "text_key": self.text_key, "id_key": self.id_key}

  def texts(self, lo, hi):
    r = lo
    while r < hi:
      k = bisect.bisect_right(self._starts, r) - 1
      path, base = self.files[k], os.path.basename(self.files[k])
      for j, row in iter_records(path, r - self._starts[k]):
        if r >= hi:
          break
        where = f"{path} record {j}"
        yield _id_of(row, self.id_key, f"{base}:{j}", where), _text_of(row, self.text_key, where)
        r += 1

  def row_of(self, row_id):
    if self.id_key:
      return None
    name, _, j = row_id.rpartition(":")
    if name in self._by_name and j.isdigit():
      r = self._starts[self._by_name[name]] + int(j)
      return r if r < self._n else None
    return None


class ConcatCorpus(Corpus):
  """Corpora one after another: rows of the first, then of the second, ..."""

  def __init__(self, parts: Sequence[Corpus]):
    self.parts = list(parts)
    self._starts = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).tolist()

  def __len__(self):
    return self._starts[-1]

  def fingerprint(self):
    return {"source": "concat", "parts": [p.fingerprint() for p in self.parts]}

  def texts(self, lo, hi):
    for k, p in enumerate(self.parts):
      a, b = max(lo, self._starts[k]), min(hi, self._starts[k + 1])
      if a < b:
        yield from p.texts(a - self._starts[k], b - self._starts[k])

  def row_of(self, row_id):
    for k, p in enumerate(self.parts):
      r = p.row_of(row_id)
      if r is not None:
        return r + self._starts[k]
    return None


def in_memory(corpus: Corpus, config, what: str) -> list[tuple[str, str]]:
  """All (id, text) rows, for the consumers that need the whole corpus at once;
  refused (naming `what` and the way out) above `data.max_rows_in_memory`."""
  limit = config.data.max_rows_in_memory
  if len(corpus) > limit:
    raise ValueError(
        f"{what} holds the whole corpus in memory, and this one has {len(corpus):,} rows "
        f"(> data.max_rows_in_memory={limit:,}). At this scale bring a trained model "
        "(model.checkpoint) and leave 'bm25'/'dense' out of eval.methods (README, "
        "'Scale'), or raise data.max_rows_in_memory.")
  return list(corpus.texts(0, len(corpus)))


def streamed(config) -> bool:
  """Whether `data.source` streams the corpus (anything but the in-memory world)."""
  src = config.data.source
  if src not in SOURCES:
    raise ValueError(f"data.source must be one of {SOURCES}, got {src!r}")
  return src in STREAMED


def from_config(config, *, paths: dict[str, str] | None = None) -> Corpus:
  """The streamed corpus `config.data` describes (main source, then T-REx sentences).

  `paths` ({"jsonl", "trex_sentences"} globs) replaces the config's (the local stand-in).
  """
  d = config.data
  src = d.source
  jsonl = (paths or {}).get("jsonl", d.jsonl)
  sentences = (paths or {}).get("trex_sentences", d.trex_sentences)
  if src == "tfds":
    if not d.tfds_name:
      raise ValueError("data.source='tfds' needs data.tfds_name")
    main = TfdsCorpus(name=d.tfds_name, data_dir=d.tfds_data_dir, split=d.split,
                      text_key=d.text_key, id_key=d.id_key, max_rows=d.max_rows)
  elif src == "seqio":
    if not d.seqio_task:
      raise ValueError("data.source='seqio' needs data.seqio_task")
    main = SeqioCorpus(task=d.seqio_task, split=d.split, text_key=d.text_key,
                       id_key=d.id_key, max_rows=d.max_rows)
  elif src == "jsonl":
    if not jsonl:
      raise ValueError("data.source='jsonl' needs data.jsonl (comma-separated globs)")
    main = JsonlCorpus(files=jsonl, text_key=d.text_key, id_key=d.id_key,
                       max_rows=d.max_rows)
  else:
    raise ValueError(f"data.source={src!r} is not a streamed source {STREAMED}")
  if sentences and d.trex_sentences_in_corpus:
    return ConcatCorpus([main, JsonlCorpus(files=sentences, id_key="sentence_id")])
  return main

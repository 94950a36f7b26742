"""Tokenisation and the data path: SentencePiece vocab, seqio tasks, arrays, batches.

The world's passages and queries go through registered seqio Tasks (the same
path a C4 run takes), then are materialised as fixed-shape numpy arrays for the
JAX code. Conventions (seqio/T5): token 0 = PAD, 1 = EOS, 2 = UNK, no BOS.

Queries: the model sees `prompt + " " + target` as one string. SentencePiece
marks a word's leading space with "▁" on the word's first piece and pieces
never cross whitespace (`split_by_whitespace`), so `encode(target)` (the
dummy prefix adds the "▁") equals the target's tokens inside the full string.
`tokenized_queries` checks this per query against `encode(prompt + " " + target)`
and raises if it ever fails, so the loss is on exactly what the model sees.

This is the only module that imports TensorFlow (JAX-only modules must not pay
its import time); TF is kept off any GPU. Training batches of in-memory arrays
are TF-free: `tda.batches`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
from typing import Any, Iterable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import logging  # pylint: disable=g-import-not-at-top
import numpy as np
import sentencepiece as spm
import seqio
import tensorflow as tf

from tda import fs
from tda import workdir as wd

try:
  tf.config.set_visible_devices([], "GPU")  # TF only feeds data; JAX owns accelerators.
except RuntimeError:  # TF already initialised its devices elsewhere.
  pass

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
# Bump when the trainer options below change, so old vocab stages conflict.
TRAINER_VERSION = 1
_SPLIT = "train"
# Smallest useful vocab: 256 byte-fallback pieces + PAD/EOS/UNK + a few pieces.
_MIN_VOCAB = 300


# ---------------------------------------------------------------------------
# Vocabulary.


def train_vocab(*, texts: Iterable[str], vocab_size: int, model_prefix: str) -> str:
  """Trains a unigram SentencePiece model, deterministically.

  Options chosen for exact round-trips and reproducibility: identity
  normalisation and no whitespace collapsing (decode(encode(t)) == t for any
  t), byte fallback (no UNK for unseen characters), one thread and no input
  sampling (same texts -> identical model bytes). `vocab_size` is a soft limit
  (`hard_vocab_limit=False`): a small corpus yields fewer pieces rather than an
  error, so the actual size is <= `vocab_size` (the model's embedding table,
  sized from `vocab_size`, always covers it).

  Args:
    texts: training texts (e.g. passages).
    vocab_size: requested number of pieces, >= 300.
    model_prefix: output path prefix; writes `<prefix>.model` and `.vocab`.

  Returns:
    The `.model` path.
  """
  if vocab_size < _MIN_VOCAB:
    raise ValueError(f"vocab_size={vocab_size} is too small: byte fallback alone "
                     f"needs 259 pieces; use >= {_MIN_VOCAB}.")
  texts = [t for t in texts if t]
  if not texts:
    raise ValueError("train_vocab got no non-empty texts.")
  os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
  model = io.BytesIO()
  spm.SentencePieceTrainer.Train(
      sentence_iterator=iter(texts), model_writer=model,
      vocab_size=vocab_size, hard_vocab_limit=False, model_type="unigram",
      character_coverage=1.0, byte_fallback=True,
      normalization_rule_name="identity", remove_extra_whitespaces=False,
      pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
      num_threads=1, input_sentence_size=0, shuffle_input_sentence=False,
      max_sentence_length=1 << 16, minloglevel=2)
  path = model_prefix + ".model"
  with open(path, "wb") as f:
    f.write(model.getvalue())
  sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
  with open(model_prefix + ".vocab", "w") as f:
    for i in range(sp.get_piece_size()):
      f.write(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n")
  logging.info("Trained SentencePiece vocab %s: %d pieces (asked %d) on %d texts.",
               path, sp.get_piece_size(), vocab_size, len(texts))
  return path


def check_vocab_file(path: str) -> int:
  """Validates a SentencePiece model follows the seqio ids; returns its size."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"SentencePiece model {path!r} does not exist.")
  sp = spm.SentencePieceProcessor(model_file=path)
  if sp.pad_id() != PAD_ID or sp.eos_id() != EOS_ID:
    raise ValueError(f"SentencePiece model {path} has pad_id={sp.pad_id()}, "
                     f"eos_id={sp.eos_id()}; seqio needs pad_id=0, eos_id=1.")
  return sp.get_piece_size()


def get_vocabulary(path: str, *, add_special_tokens: bool = True) -> seqio.Vocabulary:
  """The run's seqio vocabulary: a SentencePiece model file (validated), or a
  Hugging Face checkpoint folder's tokenizer (`tda.hf_checkpoint.HfVocabulary`,
  with BOS as the tokenizer adds it unless `add_special_tokens=False`; an
  encoding containing the padding id 0 is an error)."""
  if os.path.isdir(path):
    from tda import hf_checkpoint  # pylint: disable=g-import-not-at-top
    return hf_checkpoint.load_vocabulary(path, add_special_tokens=add_special_tokens,
                                         strict_pad=True)
  check_vocab_file(path)
  return seqio.SentencePieceVocabulary(path)


def vocab_digest(path: str) -> str:
  """sha256 of the vocabulary: the SentencePiece file, or a HF folder's tokenizer files."""
  if os.path.isdir(path):
    from tda import hf_checkpoint  # pylint: disable=g-import-not-at-top
    blob = json.dumps(hf_checkpoint.tokenizer_fingerprint(path), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()
  return wd.file_sha256(path)


# ---------------------------------------------------------------------------
# seqio tasks.


def _read_rows(path: str, keys: tuple[str, ...]) -> list[dict[str, Any]]:
  if not fs.isfile(path):
    raise FileNotFoundError(f"{path} not found: run the 'world' stage first.")
  rows = wd.read_jsonl(path)
  if not rows:
    raise ValueError(f"{path} has no records.")
  for i, r in enumerate(rows):
    missing = [k for k in keys if k not in r]
    if missing:
      raise ValueError(f"{path} record {i} lacks keys {missing}.")
  return rows


def _passages_fn(split: str, shuffle_files: bool, *, path: str) -> tf.data.Dataset:
  del split, shuffle_files  # One split; order is the file's (shuffling is batch_at's job).
  rows = _read_rows(path, ("id", "text"))
  return tf.data.Dataset.from_tensor_slices(
      {"id": [r["id"] for r in rows], "text": [r["text"] for r in rows]})


def _queries_fn(split: str, shuffle_files: bool, *, path: str) -> tf.data.Dataset:
  del split, shuffle_files
  rows = _read_rows(path, ("example_id", "fact_id", "inputs_plaintext",
                           "targets_plaintext"))
  return tf.data.Dataset.from_tensor_slices({
      "example_id": [r["example_id"] for r in rows],
      "fact_id": [r["fact_id"] for r in rows],
      "inputs": [r["inputs_plaintext"] for r in rows],
      "targets": [r["targets_plaintext"] for r in rows]})


def _record_full_length(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """Keeps the untrimmed token count (EOS included) so truncation can be counted."""
  return dataset.map(lambda ex: {**ex, "targets_full_len": tf.size(ex["targets"])},
                     num_parallel_calls=tf.data.AUTOTUNE)


def _short_hash(*parts: str) -> str:
  return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:10]


def _register(name: str, **kwargs) -> str:
  # Idempotent: names embed a hash of everything the task depends on.
  if name not in seqio.TaskRegistry.names():
    seqio.TaskRegistry.add(name, **kwargs)
  return name


def register_world_tasks(*, world_dir: str, vocab_path: str) -> dict[str, str]:
  """Registers the world's corpus and queries tasks; returns their names.

  Names carry a hash of the world folder and the vocab file's contents, so
  re-registering is a no-op and two worlds or vocabs never collide.

  Args:
    world_dir: folder with `passages.jsonl` and `facts.jsonl`.
    vocab_path: SentencePiece model, or a HF checkpoint folder (`get_vocabulary`).

  Returns:
    {"corpus": task name, "queries": task name}. Corpus examples: "id",
    "targets" (passage tokens + EOS), "targets_full_len". Query examples:
    "example_id", "fact_id", "inputs" (prompt tokens), "targets" (target
    tokens, no EOS), plus the "*_pretokenized" strings.
  """
  world_dir = fs.abspath(world_dir)
  vocab = get_vocabulary(vocab_path)
  # Targets continue the prompt: no BOS (a HF tokenizer's) in front of them.
  target_vocab = get_vocabulary(vocab_path, add_special_tokens=False)
  h = _short_hash(world_dir, vocab_digest(vocab_path))
  corpus = _register(
      f"tda_world_corpus_{h}",
      source=seqio.FunctionDataSource(
          functools.partial(_passages_fn, path=os.path.join(world_dir, "passages.jsonl")),
          splits=[_SPLIT]),
      preprocessors=[
          functools.partial(seqio.preprocessors.rekey,
                            key_map={"id": "id", "targets": "text"}),
          seqio.preprocessors.tokenize,
          seqio.preprocessors.append_eos,
          _record_full_length,
      ],
      output_features={"targets": seqio.Feature(vocab, add_eos=True)},
      shuffle_buffer_size=None)
  queries = _register(
      f"tda_world_queries_{h}",
      source=seqio.FunctionDataSource(
          functools.partial(_queries_fn, path=os.path.join(world_dir, "facts.jsonl")),
          splits=[_SPLIT]),
      preprocessors=[seqio.preprocessors.tokenize],
      # No EOS after the target: the loss is on the target tokens only.
      output_features={"inputs": seqio.Feature(vocab, add_eos=False),
                       "targets": seqio.Feature(target_vocab, add_eos=False)},
      shuffle_buffer_size=None)
  return {"corpus": corpus, "queries": queries}


# ---------------------------------------------------------------------------
# Materialised arrays for the small world.


@dataclasses.dataclass(frozen=True)
class CorpusArrays:
  """The tokenised corpus. Row n: passage `ids[n]`, tokens then EOS then 0s."""
  ids: list[str]
  tokens_nt: np.ndarray   # int32 [N, T]
  lengths_n: np.ndarray   # int32 [N], tokens incl. EOS (<= T)
  n_truncated: int        # Passages whose tokens + EOS did not fit in T.


@dataclasses.dataclass(frozen=True)
class QueryArrays:
  """Tokenised queries: prompt tokens, then target tokens, then 0s (no EOS)."""
  ids: list[str]           # example ids
  fact_ids: list[str]
  tokens_nl: np.ndarray    # int32 [Q, L]
  loss_mask_nl: np.ndarray  # float32 [Q, L], 1.0 exactly on target tokens
  prompt_lens: np.ndarray  # int32 [Q]
  target_lens: np.ndarray  # int32 [Q]


def _as_str(x) -> str:
  return x.decode() if isinstance(x, bytes) else str(x)


def tokenized_corpus(*, task_name: str, seq_len: int) -> CorpusArrays:
  """Runs the corpus task through seqio and packs it into [N, seq_len] arrays.

  Passages longer than `seq_len` (EOS included) are truncated to their first
  `seq_len` tokens (losing the EOS); they are counted and logged.
  """
  task = seqio.get_mixture_or_task(task_name)
  ds = task.get_dataset(sequence_length={"targets": seq_len}, split=_SPLIT,
                        shuffle=False, use_cached=False, num_epochs=1)
  ids, rows, full = [], [], []
  for ex in ds.as_numpy_iterator():
    ids.append(_as_str(ex["id"]))
    rows.append(ex["targets"])
    full.append(int(ex["targets_full_len"]))
  tokens_nt = np.zeros((len(rows), seq_len), np.int32)
  for n, r in enumerate(rows):
    tokens_nt[n, :len(r)] = r
  lengths_n = np.array([len(r) for r in rows], np.int32)
  truncated = [i for i, f in zip(ids, full) if f > seq_len]
  if truncated:
    logging.warning("%d of %d passages exceed seq_len=%d tokens (EOS included) and "
                    "were truncated, e.g. %s", len(truncated), len(ids), seq_len,
                    truncated[:5])
  return CorpusArrays(ids=ids, tokens_nt=tokens_nt, lengths_n=lengths_n,
                      n_truncated=len(truncated))


def tokenized_queries(*, task_name: str, seq_len: int,
                      query_len: int | None = None) -> QueryArrays:
  """Runs the queries task through seqio and packs it into [Q, L] arrays.

  L is `query_len` when given, else the longest prompt + target rounded up to a
  multiple of 8 (capped at `seq_len`): queries are short, and a causal model
  gives the same target logits with less right padding, so the query kernels
  run on [Q, L] rather than [Q, seq_len].

  Raises:
    ValueError: a target that is empty or tokenises to nothing, a prompt +
      target longer than `seq_len` or `query_len`, or a query whose separate
      tokenisation differs from that of "prompt target" (each names the id).
  """
  task = seqio.get_mixture_or_task(task_name)
  vocab = task.output_features["inputs"].vocabulary  # Prompt + target, as one text.
  ds = task.get_dataset(sequence_length=None, split=_SPLIT, shuffle=False,
                        use_cached=False, num_epochs=1)
  if query_len is not None and not 0 < query_len <= seq_len:
    raise ValueError(f"query_len={query_len} must be in [1, seq_len={seq_len}].")
  limit = query_len or seq_len
  ids, fact_ids, prompts, targets = [], [], [], []
  for ex in ds.as_numpy_iterator():
    eid = _as_str(ex["example_id"])
    prompt_text = _as_str(ex["inputs_pretokenized"])
    target_text = _as_str(ex["targets_pretokenized"])
    p, t = ex["inputs"].tolist(), ex["targets"].tolist()
    if not target_text.strip() or not t:
      raise ValueError(f"query {eid}: target {target_text!r} is empty or "
                       "tokenises to zero tokens.")
    if len(p) + len(t) > limit:
      raise ValueError(f"query {eid}: prompt + target is {len(p) + len(t)} tokens, "
                       f"longer than the limit {limit}.")
    if p + t != vocab.encode(f"{prompt_text} {target_text}"):
      raise ValueError(f"query {eid}: tokens of prompt and target taken apart differ "
                       f"from those of {prompt_text + ' ' + target_text!r}; check "
                       "leading/trailing whitespace.")
    ids.append(eid)
    fact_ids.append(_as_str(ex["fact_id"]))
    prompts.append(p)
    targets.append(t)
  longest = max(len(p) + len(t) for p, t in zip(prompts, targets))
  length = query_len or min(seq_len, -(-longest // 8) * 8)
  tokens_nl = np.zeros((len(ids), length), np.int32)
  loss_mask_nl = np.zeros((len(ids), length), np.float32)
  for q, (p, t) in enumerate(zip(prompts, targets)):
    tokens_nl[q, :len(p) + len(t)] = p + t
    loss_mask_nl[q, len(p):len(p) + len(t)] = 1.0
  return QueryArrays(ids=ids, fact_ids=fact_ids, tokens_nl=tokens_nl,
                     loss_mask_nl=loss_mask_nl,
                     prompt_lens=np.array([len(p) for p in prompts], np.int32),
                     target_lens=np.array([len(t) for t in targets], np.int32))


def world_arrays(*, world_dir: str, vocab_path: str,
                 seq_len: int) -> tuple[CorpusArrays, QueryArrays]:
  """A committed world's corpus and query arrays, tokenised through its seqio tasks."""
  names = register_world_tasks(world_dir=world_dir, vocab_path=vocab_path)
  return (tokenized_corpus(task_name=names["corpus"], seq_len=seq_len),
          tokenized_queries(task_name=names["queries"], seq_len=seq_len))


def world_queries(*, world_dir: str, vocab_path: str, seq_len: int) -> QueryArrays:
  """A committed world's query arrays alone (a streamed corpus: `tda.corpus`)."""
  names = register_world_tasks(world_dir=world_dir, vocab_path=vocab_path)
  return tokenized_queries(task_name=names["queries"], seq_len=seq_len)

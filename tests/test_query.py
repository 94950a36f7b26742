"""tda.query: tracing a prompt of one's own against a finished run.

Reads the session's shared `:runlocal` run (conftest.py `default_run`) and never
writes to it. The run's own evaluation queries are the reference: traced as
prompts, they must give the proponents and scores the retrieval stage committed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tda import index as index_lib
from tda import query as query_lib
from tda import workdir as wd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def engine(runlocal_engine):
  return runlocal_engine


@pytest.fixture(scope="module")
def facts(engine):
  return engine.ctx.world.facts


def _stored(engine, method):
  qids = wd.read_json(os.path.join(engine.ctx.stage_dir("retrieval"), "query_ids.json"))
  return {q: i for i, q in enumerate(qids)}, engine.ctx.rankings[method]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["trackstar", "exp1"])
def test_eval_queries_traced_as_prompts_give_the_committed_proponents(engine, facts, method):
  row, ranking = _stored(engine, method)
  # The query's gradient is computed in another batch than the stage's, so it agrees
  # with the committed one to float32 rounding (atol 1e-6 on unit-norm scores, as
  # exp1 shows without R). A whitener W = R^{-1/2} amplifies a relative input error
  # by at most cond(W) in W·g and at most twice that after normalising, so the
  # tolerance is 2·cond(W)·1e-6, computed from the committed W (no W: 1e-6).
  w = engine.ctx.gradients.whitener(engine.tables[method])
  cond = 1.0 if w is None else float(np.linalg.cond(np.asarray(w, np.float64)))
  atol = 1e-6 * (1.0 if w is None else 2.0 * cond)
  picked = facts[::7][:4]
  reqs = [query_lib.Request(prompt=f["inputs_plaintext"], target=f["targets_plaintext"],
                            method=method, k=10) for f in picked]
  for f, res in zip(picked, engine.trace(reqs)):
    i = row[f["example_id"]]
    assert res["target_source"] == query_lib.TARGET_GIVEN
    assert [h["id"] for h in res["proponents"]] == ranking["top_ids"][i]
    assert [h["id"] for h in res["opponents"]] == ranking["bottom_ids"][i]
    np.testing.assert_allclose([h["score"] for h in res["proponents"]],
                               ranking["top_scores"][i], rtol=1e-5, atol=atol)
    np.testing.assert_allclose([h["score"] for h in res["opponents"]],
                               ranking["bottom_scores"][i], rtol=1e-5, atol=atol)
    assert [h["rank"] for h in res["proponents"]] == list(range(1, 11))
    assert all(h["text"] == engine.passages[h["id"]] for h in res["proponents"])
    assert set(res["timings"]) >= {f"{k}_s" for k in query_lib.TIMING_KEYS}


@pytest.mark.slow
def test_per_token_gradients_sum_to_the_sequence_gradient(engine, facts):
  # The identity per_token rests on: φ(Σ_t NLL_t) = Σ_t φ(NLL_t) for the
  # projected raw and the projected corrected gradient, before any R or norm.
  f = facts[3]
  p, t = engine._tokens(f["inputs_plaintext"], f["targets_plaintext"])  # pylint: disable=protected-access
  assert len(t) >= 2
  n = len(p) + len(t)
  tokens = np.zeros((1 + len(t), engine.seq_len), np.int32)
  mask = np.zeros_like(tokens, np.float32)
  tokens[:, :n] = p + t
  mask[0, len(p):n] = 1.0
  for j in range(len(t)):
    mask[1 + j, len(p) + j] = 1.0
  out = engine._featurize(tokens, mask)  # pylint: disable=protected-access
  assert not len(out["bad_rows"])
  for variant in ("raw", "corrected"):
    seq, parts = out[variant][0].astype(np.float64), out[variant][1:].astype(np.float64)
    assert np.abs(seq).max() > 0
    err = np.abs(parts.sum(0) - seq).max() / np.abs(seq).max()
    assert err <= 1e-5, (variant, err)
    # Not trivially so: no single token carries the whole gradient.
    assert np.abs(parts - seq).max() / np.abs(seq).max() > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("method", ["trackstar", "exp1"])  # Unit + mixed R; raw dot.
def test_per_token_scores_sum_to_each_proponents_score(engine, facts, method):
  f = facts[5]
  req = query_lib.Request(prompt=f["inputs_plaintext"], target=f["targets_plaintext"],
                          method=method, k=5, per_token=True)
  res = engine.trace([req])[0]
  plain = engine.trace([query_lib.Request(prompt=req.prompt, target=req.target,
                                          method=method, k=5)])[0]
  assert [h["id"] for h in res["proponents"]] == [h["id"] for h in plain["proponents"]]
  n_tok = len(res["target_tokens"])
  assert n_tok >= 2
  for side in ("proponents", "opponents"):
    for h in res[side]:
      assert len(h["per_token"]) == n_tok
      assert abs(sum(h["per_token"]) - h["score"]) <= 1e-5 * max(1.0, abs(h["score"])), h
      assert len({round(v, 9) for v in h["per_token"]}) > 1


@pytest.mark.slow
def test_without_a_target_the_greedy_continuation_is_traced(engine, facts):
  cut = query_lib._cut_continuation  # pylint: disable=protected-access
  preds = engine.ctx.predictions
  # model_eval decoded the same greedy continuations (same max_new_tokens).
  f = next(f for f in facts if cut(preds[f["example_id"]]["prediction"]))
  res = engine.trace([query_lib.Request(prompt=f["inputs_plaintext"], k=3)])[0]
  assert res["target_source"] == query_lib.TARGET_GREEDY
  assert res["target"] == cut(preds[f["example_id"]]["prediction"])
  given = engine.trace([query_lib.Request(prompt=f["inputs_plaintext"], target=res["target"],
                                          k=3)])[0]
  assert [h["id"] for h in given["proponents"]] == [h["id"] for h in res["proponents"]]
  assert "greedy continuation" in query_lib.format_text(res)


def test_cut_continuation_stops_at_newline_or_sentence_end():
  cut = query_lib._cut_continuation  # pylint: disable=protected-access
  assert cut("Paris. He was") == "Paris"
  assert cut("St. Louis\nand") == "St"
  assert cut("U.S.A. and") == "U.S.A"
  assert cut(" New York City") == "New York City"


@pytest.mark.slow
def test_a_batch_answers_as_its_requests_one_by_one(engine, facts):
  reqs = [query_lib.Request(prompt=f["inputs_plaintext"], target=f["targets_plaintext"],
                            method=m, k=4) for f, m in zip(facts[:3], ("trackstar", "exp1", "exp5"))]
  batch = engine.trace(reqs)
  for r, b in zip(reqs, batch):
    one = engine.trace([r])[0]
    assert [h["id"] for h in one["proponents"]] == [h["id"] for h in b["proponents"]]
    np.testing.assert_allclose([h["score"] for h in one["proponents"]],
                               [h["score"] for h in b["proponents"]], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("kwargs,message", [
    ({"prompt": "  "}, "the prompt is empty"),
    ({"prompt": "x" * 5000}, "5000 characters long; the limit is 2000"),
    ({"prompt": "a", "target": " "}, "the target is empty"),
    ({"prompt": "a", "method": "nope"}, "method 'nope' is not a gradient method of this run"),
    ({"prompt": "a", "method": "bm25"}, "lexical baseline"),
    ({"prompt": "a", "k": 0}, r"k must be an integer in \[1, 100\], got 0"),
    ({"prompt": "a", "k": 101}, "got 101"),
    ({"prompt": "word " * 300, "target": "x"}, "longer than the run's sequence length"),
])
def test_bad_requests_are_refused_naming_the_problem(engine, kwargs, message):
  with pytest.raises(query_lib.QueryError, match=message):
    engine.trace([query_lib.Request(**kwargs)])


def test_request_from_json_names_bad_fields():
  ok = query_lib.request_from_json({"prompt": "p", "k": 3, "per_token": True, "id": 7})
  assert (ok.prompt, ok.target, ok.method, ok.k, ok.per_token, ok.id) == (
      "p", None, "trackstar", 3, True, "7")
  for obj, message in [([1], "must be a JSON object"), ({"k": 1}, "no 'prompt'"),
                       ({"prompt": "p", "kk": 1}, r"unknown field\(s\) \['kk'\]"),
                       ({"prompt": 3}, "'prompt' must be a string"),
                       ({"prompt": "p", "k": "3"}, "'k' must be an integer"),
                       ({"prompt": "p", "per_token": 1}, "'per_token' must be true or false")]:
    with pytest.raises(query_lib.QueryError, match=message):
      query_lib.request_from_json(obj)


@pytest.mark.slow
def test_rebuilt_config_is_checked_against_the_committed_fingerprints(default_run, tmp_path):
  config = query_lib.config_from_workdir(default_run)
  assert config.model.d_model == 64 and config.gradients.k_in == 8  # runlocal's values.
  bad = query_lib.config_from_workdir(default_run)
  with bad.unlocked():
    bad.gradients.seed = 7
  with pytest.raises(wd.WorkdirConflict, match="gradients.seed"):
    query_lib.Engine(workdir=default_run, config=bad)
  partial = tmp_path / "w"
  for stage in ("world", "vocab"):
    shutil.copytree(os.path.join(default_run, stage), partial / stage)
  with pytest.raises(query_lib.WorkdirNotReady, match="train, gradients, tables, retrieval"):
    query_lib.engine_from_flags(str(partial))


def _cli(*args):
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "tda.query", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cli_json_batch_and_clear_errors(default_run, engine, facts, tmp_path):
  preds = engine.ctx.predictions
  cut = query_lib._cut_continuation  # pylint: disable=protected-access
  f = next(f for f in facts[2:] if cut(preds[f["example_id"]]["prediction"]))
  queries = tmp_path / "q.jsonl"
  wd.write_jsonl(str(queries), [
      {"prompt": f["inputs_plaintext"], "target": f["targets_plaintext"], "id": "q1"},
      {"prompt": f["inputs_plaintext"], "method": "exp1", "k": 2, "per_token": True}])
  p = _cli(f"--workdir={default_run}", f"--queries={queries}", "--k=3", "--json")
  assert p.returncode == 0, p.stderr[-3000:]
  assert p.stdout.count("\n") == 1
  out = json.loads(p.stdout)
  first, second = out["results"]
  assert set(first) >= {"prompt", "target", "method", "proponents", "opponents", "timings"}
  assert (first["method"], first["k"], first["target_source"]) == ("trackstar", 3, "given")
  assert first["id"] == "q1" and "id" not in second
  want = engine.trace([query_lib.Request(prompt=f["inputs_plaintext"],
                                         target=f["targets_plaintext"], k=3)])[0]
  assert [h["id"] for h in first["proponents"]] == [h["id"] for h in want["proponents"]]
  assert set(first["proponents"][0]) == {"rank", "id", "score", "text"}
  assert second["target_source"] == "greedy_continuation" and len(second["opponents"]) == 2
  assert "per_token" in second["proponents"][0]
  # Clear errors, before the model is loaded.
  p = _cli(f"--workdir={default_run}", "--prompt=x", "--method=bm25")
  assert p.returncode == 2 and "lexical baseline" in p.stderr, p.stderr[-2000:]
  p = _cli(f"--workdir={tmp_path}", "--prompt=x")
  assert p.returncode == 2 and "is not a finished run" in p.stderr


@pytest.mark.slow
def test_scann_and_exact_searchers_agree_and_skip_excluded_passages(engine, facts):
  try:
    index_lib._scann_ops()  # pylint: disable=protected-access
  except ImportError as e:
    pytest.skip(f"scann unavailable: {e}")
  table = engine._table("trackstar")  # pylint: disable=protected-access
  ids = table.ids
  excluded = {ids[0], ids[5]}  # As if their gradients had been non-finite.
  exact = index_lib.TableSearcher(table=table, excluded=excluded, method="exact", index_params={})
  scann = index_lib.TableSearcher(table=table, excluded=excluded, method="scann", index_params={})
  q = exact.x_nd[[0, 3, 7]] + 0.01 * exact.x_nd[[1, 2, 4]]  # Queries near excluded rows too.
  a, b = exact.search(q, 6), scann.search(q, 6)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[2], b[2])
  np.testing.assert_allclose(a[1], b[1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(a[3], b[3], rtol=1e-5, atol=1e-6)
  for rows in (a[0], a[2]):
    assert not {ids[r] for r in rows.ravel()} & excluded
  assert np.all(np.diff(a[1], axis=1) <= 0) and np.all(np.diff(a[3], axis=1) >= 0)

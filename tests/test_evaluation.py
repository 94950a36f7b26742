"""Tail-patch (vmapped == a plain loop; a real optimizer step), method names, ground truth."""

import logging

import jax
import numpy as np
import pytest

from tda import methods as methods_lib
from tda import model as model_lib
from tda import tailpatch
from tda import train as train_lib
from tda.stages import evaluation
from tests import helpers


def test_tailpatch_vmapped_equals_loop_of_single_steps():
  c = helpers.tiny_config()
  model, params, opt_state = helpers.trained_state(c, steps=3)
  tx = tailpatch.tailpatch_optimizer(c, 1e-2)
  passages = helpers.random_tokens(3, 64, 512, seed=11, min_len=12)
  passages[2, 40:] = 0  # Two length buckets (32 and 64).
  queries = helpers.random_tokens(3, 16, 512, seed=12)
  qmask = np.zeros((3, 16), np.float32)
  qmask[:, 10:13] = 1.0
  # Pairs share passages and queries: one step per passage, one "before" per query.
  passage_of, query_of = np.array([0, 2, 0, 1, 2]), np.array([0, 1, 1, 2, 0])
  before, after = tailpatch.tailpatch_pairs(fn=tailpatch.make_batched(model, tx), params=params,
                                            opt_state=opt_state, passages_pt=passages,
                                            queries_pl=queries, qmasks_pl=qmask,
                                            passage_of=passage_of, query_of=query_of, chunk=2)
  step = jax.jit(train_lib.make_train_step(model, tx))
  # One compiled loss (op-by-op dispatch of the model costs more than compiling it).
  nll_fn = jax.jit(lambda p, q, m: model_lib.example_losses(model, {"params": p}, q, m)[0])
  for i, (p, q) in enumerate(zip(passage_of, query_of)):
    new_params, _, _ = step(params, opt_state, passages[p:p + 1])
    nll = lambda w: float(nll_fn(w, queries[q:q + 1], qmask[q:q + 1]))
    np.testing.assert_allclose(before[i], np.exp(-nll(params)), rtol=1e-5)
    np.testing.assert_allclose(after[i], np.exp(-nll(new_params)), rtol=1e-4)
  assert np.all(after != before)  # The step really changed the model.


@pytest.mark.slow  # Compiles a vmapped train step (~15 CPU s).
def test_tailpatch_on_the_target_raises_its_probability():
  c = helpers.tiny_config()
  model, params, opt_state = helpers.trained_state(c, steps=3)
  fn = tailpatch.make_batched(model, tailpatch.tailpatch_optimizer(c, 1e-2))
  query = helpers.random_tokens(1, 16, 512, seed=3)
  qmask = np.zeros((1, 16), np.float32)
  qmask[:, 8:12] = 1.0
  unrelated = helpers.random_tokens(1, 16, 512, seed=4)
  b, a = tailpatch.tailpatch_pairs(fn=fn, params=params, opt_state=opt_state,
                                   passages_pt=np.concatenate([query, unrelated]),
                                   queries_pl=np.repeat(query, 2, 0), qmasks_pl=np.repeat(qmask, 2, 0),
                                   chunk=2)
  assert a[0] > b[0]                        # Training on the statement itself helps...
  assert (a[0] - b[0]) > abs(a[1] - b[1])   # ...more than training on random text.


@pytest.mark.slow  # Compiles a vmapped train step (~17 CPU s).
def test_tailpatch_methods_share_pairs_and_mark_unevaluated_rows():
  c = helpers.tiny_config()
  model, params, opt_state = helpers.trained_state(c, steps=1)
  fn = tailpatch.make_batched(model, tailpatch.tailpatch_optimizer(c, 1e-3))
  corpus = helpers.random_tokens(4, 32, 512, seed=5)
  queries = helpers.random_tokens(3, 16, 512, seed=6)
  qmask = np.zeros((3, 16), np.float32)
  qmask[:, 5:8] = 1
  rankings = {"a": [["p0", "p1"], ["p2", "p3"], ["p1", "p0"]],
              "b": [["p1", "p0"], ["p3", "p2"], ["p0", "p1"]]}
  out = tailpatch.tailpatch_methods(fn=fn, params=params, opt_state=opt_state,
                                    corpus_tokens_nt=corpus, row_of={f"p{i}": i for i in range(4)},
                                    query_tokens_nl=queries, query_mask_nl=qmask,
                                    rankings=rankings, query_rows=[0, 2], k=2)
  abs_a, _ = out["a"]
  abs_b, _ = out["b"]
  assert np.isnan(abs_a[1]).all() and not np.isnan(abs_a[0]).any()
  np.testing.assert_allclose(abs_a[0], abs_b[0][::-1])  # Same pairs, same numbers.


def test_unknown_method_and_missing_ground_truth_are_clear_errors():
  with pytest.raises(ValueError, match=r"unknown method\(s\) \['bm26'\] in eval.methods"):
    methods_lib.check(["trackstar", "bm26"])
  with pytest.raises(ValueError, match="missing from the corpus"):
    evaluation.check_ground_truth(facts=[{"fact_id": "F1", "passage_ids": ["p9"]}],
                                  passage_ids={"p1"})


def test_default_tailpatch_lr_is_the_final_training_lr():
  c = helpers.tiny_config()
  assert tailpatch.default_lr(c) == pytest.approx(0.1 * c.train.learning_rate)
  c.eval.tailpatch_lr = 0.5
  assert tailpatch.default_lr(c) == 0.5


def test_a_failing_diagnostic_is_recorded_not_raised(caplog):
  with caplog.at_level(logging.WARNING):
    out = evaluation._diagnostic("r_sample", lambda: {}["missing"])
  assert out == {"skipped": "error: KeyError: 'missing'"}
  assert "diagnostic r_sample failed: KeyError" in caplog.text
  assert evaluation._diagnostic("r_sample", lambda: {"a": 1}) == {"a": 1}

"""T-REx as released (tda.trex): fixtures in the released field names."""

import json
import os
import shutil

import pytest

from tda import trex

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "trex")
FACTS = os.path.join(FIX, "trex_facts_sample.jsonl")
SENTENCES = os.path.join(FIX, "trex_sentences.jsonl-*-of-00002")


def test_fixtures_have_exactly_the_released_fields():
  with open(FACTS) as f:
    for line in f:
      assert tuple(json.loads(line)) == trex.FACT_FIELDS
  for k in range(2):
    with open(os.path.join(FIX, f"trex_sentences.jsonl-{k:05d}-of-00002")) as f:
      for line in f:
        assert tuple(json.loads(line)) == trex.SENTENCE_FIELDS


def test_queries_and_ground_truth():
  facts, stats = trex.load_facts(facts=FACTS, sentences=SENTENCES)
  by_id = {f["fact_id"]: f for f in facts}
  # f3 is stated by no sentence in the files: no ground truth, left out and counted.
  assert sorted(by_id) == ["f0", "f1", "f2"] and stats == {"facts_read": 4,
                                                           "facts_without_sentence": 1}
  f0 = by_id["f0"]
  assert f0["inputs_plaintext"] == "Jacques-Louis David was born in the city of"  # prompt0
  assert f0["targets_plaintext"] == "Paris"                                       # entity1
  # Ground truth: the fact's trex_sentences (s0) and sentences naming it by URI triple (s1),
  # by (entity0, relation, entity1) (s2 for f1), across sentence shards (s4 for f2).
  assert f0["passage_ids"] == ["s0", "s1"] and f0["frequency"] == 2 and f0["bucket"] == "2-3"
  assert by_id["f1"]["passage_ids"] == ["s2"] and by_id["f1"]["bucket"] == "1"
  assert by_id["f2"]["passage_ids"] == ["s3", "s4"]
  assert by_id["f2"]["aliases"] == ["United Mexican States"]
  assert trex.load_facts(facts=FACTS, sentences=SENTENCES, max_facts=1)[0][0]["fact_id"] == "f0"


def test_bad_files_are_clear_errors(tmp_path):
  rows = [json.loads(l) for l in open(FACTS)]
  bad = tmp_path / "trex_facts.jsonl"
  bad.write_text(json.dumps({k: v for k, v in rows[0].items() if k != "prompt0"}) + "\n")
  with pytest.raises(ValueError, match=r"record 0: lacks field\(s\) \['prompt0'\]"):
    trex.read_facts(str(bad))
  bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[0]) + "\n")
  with pytest.raises(ValueError, match="duplicate fact_id 'f0'"):
    trex.read_facts(str(bad))
  # The README's spelling `predicate_uri` is read as relation_uri.
  alt = {("predicate_uri" if k == "relation_uri" else k): v for k, v in rows[0].items()}
  bad.write_text(json.dumps(alt) + "\n")
  assert trex.read_facts(str(bad))[0]["relation_uri"] == "P19"
  with pytest.raises(FileNotFoundError, match="no file matches"):
    trex.load_facts(facts=str(tmp_path / "none*.jsonl"), sentences=SENTENCES)
  shutil.copy(FACTS, tmp_path / "f.jsonl")
  (tmp_path / "s.jsonl").write_text('{"sentence_id": "s0", "text": "x"}\n')
  with pytest.raises(ValueError, match=r"lacks field\(s\) \['fact_triples'\]"):
    trex.load_facts(facts=str(tmp_path / "f.jsonl"), sentences=str(tmp_path / "s.jsonl"))


def test_world_stage_of_a_streamed_run_reads_the_released_files(tmp_path):
  """data.source='jsonl' + T-REx files: the world holds the queries and ground truth,
  and ctx.corpus is the JSONL rows followed by the sentences (ground truth included)."""
  from tda import pipeline
  from tda.stages import world as world_stage
  from tests.helpers import context, tiny_config
  corpus = tmp_path / "c4-train.jsonl-00000-of-00001"
  corpus.write_text("".join(json.dumps({"text": f"passage {i}", "url": f"u{i}"}) + "\n"
                            for i in range(5)))
  c = tiny_config(**{"data.source": "jsonl", "data.jsonl": str(corpus),
                     "data.trex_facts": FACTS, "data.trex_sentences": SENTENCES})
  ctx = context(c, tmp_path / "w")
  assert pipeline.run_stage(ctx, world_stage)
  w = ctx.world
  assert w.passages == [] and [f["fact_id"] for f in w.facts] == ["f0", "f1", "f2"]
  assert ctx.summary("world")["trex"] == {"facts_read": 4, "facts_without_sentence": 1}
  assert len(ctx.corpus) == 5 + 6
  texts = ctx.corpus.lookup({p for f in w.facts for p in f["passage_ids"]} | {
      "c4-train.jsonl-00000-of-00001:3"})
  assert texts["s2"].startswith("Wolfgang Amadeus Mozart was born in Salzburg")
  assert texts["c4-train.jsonl-00000-of-00001:3"] == "passage 3"
  bad = context(tiny_config(**{"data.source": "jsonl", "data.jsonl": str(corpus)}),
                tmp_path / "w2")
  with pytest.raises(ValueError, match="set data.trex_facts and data.trex_sentences"):
    pipeline.run_stage(bad, world_stage)


def test_standin_round_trips_the_synthetic_ground_truth(tmp_path):
  """The local stand-in writes the synthetic world as T-REx files; reading them back
  gives every fact's exact ground truth."""
  from tda import standin
  from tda.stages import world as world_stage
  from tests.helpers import tiny_config
  w = world_stage.make_world(tiny_config(**{
      "world.facts_per_bucket": (2, 2, 2, 1), "world.distractor_passages": 4,
      "world.filler_passages": 2}))
  g = standin.build(str(tmp_path), world=w, rows=50)
  facts, stats = trex.load_facts(facts=g["trex_facts"], sentences=g["trex_sentences"])
  assert stats == {"facts_read": len(w.facts), "facts_without_sentence": 0}
  for got, want in zip(facts, w.facts):
    assert sorted(got["passage_ids"]) == sorted(want["passage_ids"])
    assert (got["inputs_plaintext"], got["targets_plaintext"]) == (
        want["inputs_plaintext"], want["targets_plaintext"])
  c4 = [json.loads(l) for p in sorted((tmp_path).glob("c4-train.jsonl-*")) for l in open(p)]
  assert len(c4) == 50 and set(c4[0]) == {"text", "url", "timestamp"}

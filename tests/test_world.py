"""The synthetic fact world (tda.synthetic_world) and the BYO loader (tda.world)."""

import collections
import hashlib
import json
import os
import re
import subprocess
import sys

import pytest

from tda import config as config_lib
from tda import synthetic_world
from tda import world as world_lib
from tests import entailment

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "byo")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _kwargs(**overrides):
  c = config_lib.base_config()
  w = c.world
  kw = dict(seed=w.seed, relations=w.relations, bucket_ranges=config_lib.bucket_ranges(c),
            facts_per_bucket=w.facts_per_bucket, facts_per_passage=w.facts_per_passage,
            sentences_per_passage=w.sentences_per_passage,
            sentences_median=w.sentences_median, sentences_sigma=w.sentences_sigma,
            distractor_passages=w.distractor_passages, filler_passages=w.filler_passages,
            outlier_share=w.outlier_share)
  kw.update(overrides)
  return kw


@pytest.fixture(scope="module")
def world():
  return synthetic_world.generate_world(**_kwargs())


def _digest(w):
  blob = json.dumps({"p": w.passages, "f": w.facts}, sort_keys=True).encode()
  return hashlib.sha256(blob).hexdigest()


def test_same_seed_same_world_other_seed_differs(world):
  again = synthetic_world.generate_world(**_kwargs())
  assert again.passages == world.passages and again.facts == world.facts
  other = synthetic_world.generate_world(**_kwargs(seed=1))
  assert _digest(other) != _digest(world)
  assert ({f["subject"] for f in other.facts} != {f["subject"] for f in world.facts})


def test_world_is_byte_identical_across_processes_and_hash_seeds(world):
  code = ("import hashlib, json\n"
          "from tda import config as c, synthetic_world as world\n"
          "x = world.generate_from_config(c.base_config())\n"
          "blob = json.dumps({'p': x.passages, 'f': x.facts}, sort_keys=True).encode()\n"
          "print(hashlib.sha256(blob).hexdigest())\n")
  outs = []
  for hashseed in ("1", "2"):
    env = {**os.environ, "PYTHONHASHSEED": hashseed, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                       capture_output=True, text=True, check=True)
    outs.append(r.stdout.strip())
  assert outs[0] == outs[1] == _digest(world)


def test_default_world_has_configured_counts_and_ids(world):
  s = world.stats()
  assert 1300 <= s["passages"] <= 1700
  assert s["kinds"]["distractor"] == 300 and s["kinds"]["filler"] == 150
  assert s["facts"] == 220
  assert set(s["relations"]) == set(config_lib.base_config().world.relations)
  assert min(s["relations"].values()) >= 20  # Spread over all nine relations.
  ids = [p["id"] for p in world.passages]
  assert len(set(ids)) == len(ids)
  assert all(re.fullmatch(r"c4_synth:\d{8}", i) for i in ids)


def test_default_training_is_two_epochs_of_the_default_world(world):
  # The paper trains its models for two epochs of C4 (docs/DESIGN.md §7); the
  # default steps are that many batches of this world, the last one partial.
  t = config_lib.base_config().train
  n = len(world.passages)
  assert (t.steps - 1) * t.batch_size < 2 * n <= t.steps * t.batch_size
  assert t.warmup_steps == round(0.1 * t.steps)


def test_corpus_statistics_stay_within_their_documented_bounds(world):
  """docs/DESIGN.md §7: the bounds each statistic of the default world keeps."""
  st = world.corpus_stats()
  # Heavy-tailed lengths: log-normal, sigma = 1 (p95/p50 = e^1.645 = 5.2 unclamped).
  assert 3.5 <= st["length_p95_over_p50"] <= 8.0
  assert 15 <= st["length_p50_words"] <= 35  # The previous world's token budget.
  # A share is longer than seq_len = 128 tokens (~66 words at ~1.9 tokens a word).
  long = sum(len(p["text"].split()) > 80 for p in world.passages) / len(world.passages)
  assert 0.05 <= long <= 0.25
  assert st["length_max_words"] > 300
  h = st["length_histogram"]
  assert sum(h["counts"]) == len(world.passages) and len(h["counts"]) == len(h["edges_words"])
  # Paraphrase and aliases: the query's prompt + target verbatim in at most 30%.
  assert 0.05 <= st["verbatim_share"] <= 0.30
  # A few percent outliers, of every kind.
  assert 0.02 <= st["outlier_share"] <= 0.05
  outliers = [p["text"] for p in world.passages if p["kind"] == "outlier"]
  assert any(re.search(r"\d{4} \| \d+\.\d", t) for t in outliers)  # Digit tables.
  assert any(len(set(t.split("\n"))) == 1 and t.count("\n") >= 2 for t in outliers)
  assert any("import os" in t or "SELECT" in t or "def load" in t for t in outliers)
  assert any("All rights reserved" in t or "Powered by" in t or "Skip to" in t
             for t in outliers)
  assert st["co_mention_distractors"] >= 100


def test_fact_statements_sit_within_the_first_words_that_survive_truncation(world):
  text = {p["id"]: p["text"] for p in world.passages}
  worst = 0
  for f in world.facts:
    for pid in f["passage_ids"]:
      sents = entailment._SENTENCE_SPLIT.split(text[pid])
      ends = [i for i, sent in enumerate(sents)
              if entailment.entails(text=sent, fact=f)]
      assert ends, (f["fact_id"], pid)
      worst = max(worst, len(" ".join(sents[:ends[0] + 1]).split()))
  assert worst <= 60  # ~120 tokens at ~1.9 tokens a word: inside seq_len = 128.


def test_fact_frequencies_fall_in_their_bucket_and_match_passage_links(world):
  ranges = {n: (lo, hi) for n, lo, hi in config_lib.DEFAULT_BUCKETS}
  counts = collections.Counter(f["bucket"] for f in world.facts)
  assert counts == {"1": 60, "2-3": 60, "4-10": 60, "11-30": 40}
  for f in world.facts:
    lo, hi = ranges[f["bucket"]]
    assert lo <= f["frequency"] <= hi
    assert len(f["passage_ids"]) == len(set(f["passage_ids"])) == f["frequency"]
  # Frequencies are spread over each range, not stuck at one end.
  top = [f["frequency"] for f in world.facts if f["bucket"] == "11-30"]
  assert min(top) <= 15 and max(top) >= 25
  # passage.fact_ids and fact.passage_ids are the same relation.
  by_passage = collections.defaultdict(set)
  for f in world.facts:
    for pid in f["passage_ids"]:
      by_passage[pid].add(f["fact_id"])
  for p in world.passages:
    assert set(p["fact_ids"]) == by_passage.get(p["id"], set())
    assert (p["kind"] == "fact") == bool(p["fact_ids"])
    assert len(p["fact_ids"]) <= 2


def test_ground_truth_lists_exactly_the_entailing_passages(world):
  wrong = []
  for p in world.passages:
    for f in world.facts:
      listed = p["id"] in f["passage_ids"]
      if entailment.entails(text=p["text"], fact=f) != listed:
        wrong.append((p["id"], f["fact_id"], listed))
  assert not wrong


def test_distractors_mention_entities_and_filler_and_outliers_none(world):
  names = sorted({n for f in world.facts
                  for n in [f["subject"], f["object"], *f["subject_aliases"],
                            *f["object_aliases"]]})
  pat = re.compile("|".join(r"\b" + re.escape(n) + r"\b" for n in names), re.IGNORECASE)
  for p in world.passages:
    if p["kind"] in ("filler", "outlier"):
      assert not pat.search(p["text"]), p
    if p["kind"] == "distractor":
      assert pat.search(p["text"]), p
  # Distractors name a subject together with its true object (full name or alias).
  co = 0
  for p in world.passages:
    if p["kind"] != "distractor":
      continue
    co += any(any(s in p["text"] for s in [f["subject"], *f["subject_aliases"]])
              and any(o in p["text"] for o in [f["object"], *f["object_aliases"]])
              for f in world.facts)
  assert co >= 100


def test_aliases_resolve_to_exactly_one_entity(world):
  entities = {}
  for f in world.facts:
    for name, al in ((f["subject"], f["subject_aliases"]), (f["object"], f["object_aliases"])):
      assert entities.setdefault(name, tuple(al)) == tuple(al), name  # One alias list.
  with_alias = {n: al for n, al in entities.items() if al}
  assert len(with_alias) >= 80
  for name, al in with_alias.items():
    for a in al:
      owners = [n for n, other in entities.items()
                if a.lower() in n.lower() or any(a.lower() in o.lower() for o in other)
                or any(o.lower() in a.lower() for o in [n, *other])]
      assert owners == [name], (a, owners)
  # Aliases are used: an entity is named in full at its first mention in a passage
  # and by its alias afterwards, so many statements name the subject by alias only,
  # and the entailment checker (which knows the aliases) accepts them.
  text = {p["id"]: p["text"] for p in world.passages}
  by_alias = []
  for f in world.facts:
    for pid in f["passage_ids"]:
      sents = entailment._SENTENCE_SPLIT.split(text[pid])
      stating = [x for x in sents if entailment.entails(text=x, fact=f)]
      assert len(stating) == 1, (f["fact_id"], pid)
      if f["subject"] not in stating[0]:
        by_alias.append((f, pid))
  assert len(by_alias) >= 100
  assert not any(entailment.entails(text=text[pid], fact={**f, "subject_aliases": []})
                 for f, pid in by_alias)


def test_entails_accepts_paraphrases_and_rejects_near_misses():
  fact = {"fact_id": "F1", "relation": "place_of_birth", "subject": "Ann Lee", "object": "Paris"}
  yes = ["Ann Lee was born in the city of Paris.", "Ann Lee was born in Paris and grew up there.",
         "Intro sentence here. Born in Paris, Ann Lee moved abroad.",
         "Ann Lee, a native of Paris, wrote novels.", "Paris is the birthplace of Ann Lee."]
  no = ["Ann Lee visited Paris last summer.", "Ann Leeds was born in Paris.",
        "Ann Lee was born in Parisville.", "Ann Lee was born in Rome. Paris is big.",
        "Bob Stone was born in Paris.", "Paris is the birthplace of Ann Leeds."]
  assert [entailment.entails(text=t, fact=fact) for t in yes] == [True] * len(yes)
  assert [entailment.entails(text=t, fact=fact) for t in no] == [False] * len(no)
  with pytest.raises(ValueError, match="relation"):
    entailment.entails(text="x", fact={**fact, "relation": "spouse"})


def test_every_phrasing_is_used_and_the_query_is_one_of_them(world):
  for name, rel in synthetic_world.RELATIONS.items():
    assert rel.templates[0] == rel.query + " {O}."
    assert len(set(rel.templates)) >= 4
  text = {p["id"]: p["text"] for p in world.passages}
  uses = slots = 0
  for f in world.facts:
    assert f["inputs_plaintext"] == synthetic_world.RELATIONS[f["relation"]].query.format(
        S=f["subject"])
    assert f["targets_plaintext"] == f["object"] and f["object"][0] != " "
    assert re.fullmatch(r"F\d{6}", f["fact_id"])
    assert re.fullmatch(r"trex_synth:\d{15}", f["example_id"])
    sentence = f"{f['inputs_plaintext']} {f['targets_plaintext']}."
    uses += sum(sentence in text[pid] for pid in f["passage_ids"])
    slots += f["frequency"]
  # The query's phrasing is one of five drawn uniformly, and in full only at the
  # subject's first mention: well under 1/5 of the statements.
  assert 0.05 <= uses / slots <= 0.2


def test_subjects_are_unique_and_never_substrings_of_other_names(world):
  pairs = [(f["subject"], f["relation"]) for f in world.facts]
  assert len(set(pairs)) == len(pairs)
  subjects = sorted({f["subject"] for f in world.facts})
  names = sorted({f["object"] for f in world.facts} | set(subjects))
  for s in subjects:
    assert not [n for n in names if n != s and (s.lower() in n.lower() or n.lower() in s.lower())]
  # Objects are shared as in T-REx; states (capital_of) are one-to-one.
  objs = collections.Counter(f["object"] for f in world.facts if f["relation"] == "place_of_birth")
  assert max(objs.values()) >= 2
  caps = [f["object"] for f in world.facts if f["relation"] == "capital_of"]
  assert len(set(caps)) == len(caps)


@pytest.mark.parametrize("overrides,key", [
    (dict(facts_per_bucket=(1, 2, 3)), "world.facts_per_bucket"),
    (dict(facts_per_bucket=(0, 0, 0, 0)), "world.facts_per_bucket"),
    (dict(facts_per_bucket=(5000, 5000, 0, 0)), "world.facts_per_bucket"),
    (dict(relations=("capital_of",), facts_per_bucket=(30, 30, 0, 0)), "world.facts_per_bucket"),
    (dict(bucket_ranges=[("1", 1, 1), ("x", 5, 3), ("4-10", 4, 10), ("11-30", 11, 30)]),
     "world.bucket_ranges"),
    (dict(bucket_ranges=[("1", 0, 1), ("2-3", 2, 3), ("4-10", 4, 10), ("11-30", 11, 30)]),
     "world.bucket_ranges"),
    (dict(facts_per_passage=0), "world.facts_per_passage"),
    (dict(sentences_per_passage=(4, 2)), "world.sentences_per_passage"),
    (dict(relations=("place_of_birth", "spouse")), "world.relations"),
    (dict(distractor_passages=-1), "world.distractor_passages"),
    (dict(filler_passages=-2), "world.filler_passages"),
    (dict(sentences_median=0), "world.sentences_median"),
    (dict(sentences_sigma=-1), "world.sentences_sigma"),
    (dict(outlier_share=0.6), "world.outlier_share"),
])
def test_bad_config_raises_naming_key(overrides, key):
  with pytest.raises(ValueError, match=re.escape(key)):
    synthetic_world.generate_world(**_kwargs(**overrides))


def test_small_world_follows_every_config_knob():
  w = synthetic_world.generate_world(**_kwargs(
      seed=3, relations=("capital_of", "occupation"), facts_per_bucket=(4, 3, 2, 1),
      facts_per_passage=1, sentences_per_passage=(2, 2), distractor_passages=5,
      filler_passages=4, outlier_share=0.0))
  s = w.stats()
  assert s["facts"] == 10 and set(s["relations"]) == {"capital_of", "occupation"}
  assert s["kinds"]["fact"] == sum(f["frequency"] for f in w.facts)  # One fact a passage.
  assert s["kinds"]["distractor"] == 5 and s["kinds"]["filler"] == 4
  assert "outlier" not in s["kinds"]
  for p in w.passages:
    assert len(re.findall(r"[.!?](?:\s|$)", p["text"])) == 2
  # sigma = 0: every passage has the median's sentence count; outliers on top.
  w = synthetic_world.generate_world(**_kwargs(
      seed=3, relations=("capital_of",), facts_per_bucket=(4, 0, 0, 0), facts_per_passage=1,
      sentences_per_passage=(1, 30), sentences_median=5, sentences_sigma=0.0,
      distractor_passages=3, filler_passages=3, outlier_share=0.2))
  assert w.stats()["kinds"]["outlier"] == round(0.2 * 10 / 0.8)
  for p in w.passages:
    if p["kind"] != "outlier":
      assert len(re.findall(r"[.!?](?:\s|$)", p["text"])) == 5, p


# --- BYO ------------------------------------------------------------------------


def _byo(**paths):
  kw = dict(corpus_path=os.path.join(FIXTURES, "corpus.jsonl"),
            facts_path=os.path.join(FIXTURES, "facts.jsonl"),
            sentences_path=os.path.join(FIXTURES, "sentences.jsonl"))
  kw.update(paths)
  return world_lib.load_byo(**kw)


def test_byo_fixtures_load_with_frequencies_and_buckets_from_sentences():
  w = _byo()
  s = w.stats()
  assert s["facts"] == 10 and s["passages"] == 20
  assert s["kinds"] == {"filler": 6, "fact": 14}
  facts = {f["subject"]: f for f in w.facts}
  assert facts["Jacques-Louis David"]["frequency"] == 2  # One id, one triple.
  assert facts["Jacques-Louis David"]["bucket"] == "2-3"
  assert facts["Canberra"]["passage_ids"] == [
      "trex_sentence:s4", "trex_sentence:s5", "trex_sentence:s6"]
  assert facts["Nokia"]["bucket"] == "1"
  assert facts["Hudson River"]["frequency"] == 1  # Id and triple of one fact: counted once.
  assert facts["Frida Kahlo"]["example_id"] == "trex:P27:0002"
  assert facts["Frida Kahlo"]["inputs_plaintext"] == "Frida Kahlo is a citizen of"
  assert sum(f["frequency"] for f in w.facts) == 14
  # Above the top range goes to the top bucket.
  w2 = world_lib.load_byo(corpus_path=os.path.join(FIXTURES, "corpus.jsonl"),
                          facts_path=os.path.join(FIXTURES, "facts.jsonl"),
                          sentences_path=os.path.join(FIXTURES, "sentences.jsonl"),
                          bucket_ranges=[("1", 1, 1), ("2", 2, 2)])
  assert {f["subject"]: f["bucket"] for f in w2.facts}["Canberra"] == "2"


def _write(path, lines):
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return str(path)


def _lines(name):
  with open(os.path.join(FIXTURES, name)) as f:
    return [l.rstrip("\n") for l in f if l.strip()]


def test_malformed_byo_inputs_raise_errors_naming_file_and_line(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    _byo(corpus_path=str(tmp_path / "nope.jsonl"))
  bad = _lines("facts.jsonl")
  bad[2] = bad[2][:-1]
  with pytest.raises(ValueError, match=r"facts\.jsonl:3: bad JSON"):
    _byo(facts_path=_write(tmp_path / "facts.jsonl", bad))
  rows = [json.loads(l) for l in _lines("facts.jsonl")]
  del rows[4]["targets_plaintext"]
  with pytest.raises(ValueError, match=r":5: facts row lacks field\(s\) \['targets_plaintext'\]"):
    _byo(facts_path=_write(tmp_path / "f2.jsonl", [json.dumps(r) for r in rows]))
  corpus = _lines("corpus.jsonl")
  with pytest.raises(ValueError, match=r"duplicate id 'c4:00000000'"):
    _byo(corpus_path=_write(tmp_path / "c.jsonl", corpus + corpus[:1]))
  sents = _lines("sentences.jsonl")
  extra = json.dumps({"sentence_id": "x", "text": "t",
                      "fact_triples": [["Nokia", "headquarters", "Helsinki"]]})
  with pytest.raises(ValueError, match=r"sentences\.jsonl:15: fact_triple .*Helsinki.* no fact"):
    _byo(sentences_path=_write(tmp_path / "sentences.jsonl", sents + [extra]))
  # A fact no sentence entails is named.
  only = [l for l in sents if "Nokia" not in l]
  with pytest.raises(ValueError, match=r"no entailing sentence.*trex_P159_005"):
    _byo(sentences_path=_write(tmp_path / "s2.jsonl", only))

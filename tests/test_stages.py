"""The stage protocol (tda.pipeline + tda.workdir): commit, skip, refuse, resume,
publish; and the world and vocab stages under it."""

import os
import types

import pytest

from tda import config as config_lib
from tda import pipeline
from tda import stages as stages_lib
from tda import synthetic_world
from tda import workdir as wd
from tda.stages import vocab as vocab_stage
from tda.stages import world as world_stage

from tests import helpers

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "byo")


def _config(**world):
  c = config_lib.base_config()
  c.world.facts_per_bucket = (3, 3, 2, 1)
  c.world.distractor_passages = 4
  c.world.filler_passages = 3
  c.data.vocab_size = 320
  for k, v in world.items():
    setattr(c.world, k, v)
  return config_lib.finalize(c)


def _fake_stage(name="fake", *, calls, fail_after=None, resumable=False, knob=1):
  """A stage module: writes part files one by one, optionally crashing midway."""
  def run(ctx, out_dir):
    done = sorted(os.listdir(out_dir))
    calls.append(done)
    for i in range(3):
      part = os.path.join(out_dir, f"part{i}")
      if os.path.exists(part):
        continue
      if fail_after is not None and i == fail_after:
        raise RuntimeError("interrupted")
      wd.write_text(part, str(i))
    os.makedirs(os.path.join(out_dir, "results"), exist_ok=True)
    wd.write_text(os.path.join(out_dir, "results", f"{name}.txt"), "published")
    return {"parts": 3}
  return types.SimpleNamespace(STAGE=name, RESUMABLE=resumable,
                               fingerprint=lambda ctx: {"knob": knob}, run=run)


def test_stage_commits_once_then_skips(tmp_path):
  ctx, calls = helpers.context(_config(), tmp_path), []
  assert pipeline.run_stage(ctx, _fake_stage(calls=calls))
  d = tmp_path / "fake"
  assert sorted(os.listdir(d)) == ["COMMITTED.json", "part0", "part1", "part2", "results",
                                   "summary.json"]
  assert wd.read_json(d / "summary.json") == {"parts": 3}
  assert (tmp_path / "results" / "fake.txt").read_text() == "published"
  before = helpers.file_snapshot(d, contents=True)
  assert not pipeline.run_stage(ctx, _fake_stage(calls=calls))  # Skipped: not run again.
  assert len(calls) == 1 and helpers.file_snapshot(d, contents=True) == before


def test_changed_fingerprint_is_refused_naming_the_key(tmp_path):
  ctx, calls = helpers.context(_config(), tmp_path), []
  pipeline.run_stage(ctx, _fake_stage(calls=calls))
  before = helpers.file_snapshot(tmp_path / "fake", contents=True)
  with pytest.raises(wd.WorkdirConflict, match="differs in: knob"):
    pipeline.run_stage(ctx, _fake_stage(calls=calls, knob=2))
  assert helpers.file_snapshot(tmp_path / "fake", contents=True) == before and len(calls) == 1


def test_failed_stage_commits_nothing_and_reruns_from_scratch(tmp_path):
  ctx, calls = helpers.context(_config(), tmp_path), []
  with pytest.raises(RuntimeError, match="interrupted"):
    pipeline.run_stage(ctx, _fake_stage(calls=calls, fail_after=2))
  assert sorted(os.listdir(tmp_path / "fake")) == ["STARTED.json", "part0", "part1"]
  assert wd.committed(str(tmp_path), "fake") is None
  with pytest.raises(FileNotFoundError, match="not committed"):
    ctx.stage_dir("fake")  # Readers trust committed stages only.
  pipeline.run_stage(ctx, _fake_stage(calls=calls))
  assert calls[1] == ["STARTED.json"]  # Not resumable: the partial parts were dropped.
  assert wd.committed(str(tmp_path), "fake") is not None


def test_resumable_stage_resumes_partial_work_of_the_same_setup_only(tmp_path):
  ctx, calls = helpers.context(_config(), tmp_path), []
  with pytest.raises(RuntimeError):
    pipeline.run_stage(ctx, _fake_stage(calls=calls, fail_after=2, resumable=True))
  with pytest.raises(wd.WorkdirConflict, match="interrupted 'fake' run from a different"):
    pipeline.run_stage(ctx, _fake_stage(calls=calls, resumable=True, knob=2))
  assert sorted(os.listdir(tmp_path / "fake")) == ["STARTED.json", "part0", "part1"]
  pipeline.run_stage(ctx, _fake_stage(calls=calls, resumable=True))
  assert calls[-1] == ["STARTED.json", "part0", "part1"]  # Resumed, not restarted.
  assert (tmp_path / "fake" / "part2").read_text() == "2"
  assert "STARTED.json" not in os.listdir(tmp_path / "fake")


def test_uncommitted_stage_folder_is_not_overwritten(tmp_path):
  (tmp_path / "fake").mkdir()
  (tmp_path / "fake" / "mine.txt").write_text("keep")
  with pytest.raises(wd.WorkdirConflict, match="never committed"):
    pipeline.run_stage(helpers.context(_config(), tmp_path), _fake_stage(calls=[]))
  assert (tmp_path / "fake" / "mine.txt").read_text() == "keep"


def test_earlier_versions_temp_folder_is_refused_by_name(tmp_path):
  (tmp_path / "fake.tmp").mkdir()
  (tmp_path / "fake.tmp" / "STARTED.json").write_text("{}")
  with pytest.raises(wd.WorkdirConflict, match=r"fake\.tmp is the partial output of an "
                     "interrupted run of an earlier tda version"):
    pipeline.run_stage(helpers.context(_config(), tmp_path), _fake_stage(calls=[]))


def test_config_selects_known_stages_in_pipeline_order():
  c = config_lib.base_config()
  c.stages = "vocab, world"
  assert [s.STAGE for s in pipeline.stages_of(c)] == ["world", "vocab"]
  c.stages = "all"
  assert tuple(s.STAGE for s in pipeline.stages_of(c)) == stages_lib.NAMES
  c.stages = "world,trian"
  with pytest.raises(ValueError, match=r"unknown stage\(s\) \['trian'\]"):
    pipeline.stages_of(c)


def test_every_stage_module_speaks_the_protocol():
  for stage in stages_lib.STAGES:
    assert isinstance(stage.STAGE, str) and callable(stage.fingerprint), stage
    assert callable(stage.run), stage


def test_world_stage_commits_the_generated_world(tmp_path):
  ctx = helpers.context(_config(), tmp_path)
  pipeline.run_stage(ctx, world_stage)
  d = tmp_path / "world"
  assert sorted(os.listdir(d)) == ["COMMITTED.json", "facts.jsonl", "passages.jsonl",
                                   "stats.json", "summary.json"]
  stats = ctx.summary("world")
  assert stats["facts"] == 9 and stats["kinds"]["filler"] == 3
  direct = synthetic_world.generate_from_config(ctx.config)
  assert ctx.world.passages == direct.passages and ctx.world.facts == direct.facts
  before = helpers.file_snapshot(d, contents=True)
  with pytest.raises(wd.WorkdirConflict, match="seed"):
    pipeline.run_stage(helpers.context(_config(seed=7), tmp_path), world_stage)
  assert helpers.file_snapshot(d, contents=True) == before


def test_world_stage_reads_bring_your_own_files(tmp_path):
  ctx = helpers.context(_config(source="byo", byo_corpus=os.path.join(FIXTURES, "corpus.jsonl"),
                     byo_facts=os.path.join(FIXTURES, "facts.jsonl"),
                     byo_sentences=os.path.join(FIXTURES, "sentences.jsonl")), tmp_path)
  pipeline.run_stage(ctx, world_stage)
  assert ctx.summary("world")["facts"] == 10 and ctx.summary("world")["passages"] == 20
  assert len(ctx.world.facts) == 10


def test_reading_an_uncommitted_stage_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="stage 'world' is not committed"):
    helpers.context(_config(), tmp_path).world


def test_vocab_stage_trains_skips_conflicts_or_uses_a_given_model(tmp_path):
  run = tmp_path / "run"
  ctx = helpers.context(_config(), run)
  pipeline.run_stage(ctx, world_stage)
  pipeline.run_stage(ctx, vocab_stage)
  path = ctx.vocab_path
  assert path == str(run / "vocab" / "spm.model")
  assert ctx.summary("vocab")["piece_size"] == ctx.vocab.vocab_size
  mtime = os.path.getmtime(path)
  assert not pipeline.run_stage(helpers.context(_config(), run), vocab_stage)  # Skipped, not retrained.
  assert os.path.getmtime(path) == mtime
  bigger = _config()
  with bigger.unlocked():
    bigger.data.vocab_size = 400
  with pytest.raises(wd.WorkdirConflict, match="vocab_size"):
    pipeline.run_stage(helpers.context(bigger, run), vocab_stage)
  # An explicit vocab_path is validated, fingerprinted and used; nothing is copied.
  given = _config()
  with given.unlocked():
    given.data.vocab_path = path
  other = helpers.context(given, tmp_path / "other")
  pipeline.run_stage(other, vocab_stage)
  assert other.vocab_path == os.path.abspath(path)
  assert sorted(os.listdir(tmp_path / "other" / "vocab")) == ["COMMITTED.json", "summary.json"]
  missing = _config()
  with missing.unlocked():
    missing.data.vocab_path = str(tmp_path / "nope.model")
  with pytest.raises(FileNotFoundError, match="nope.model"):
    pipeline.run_stage(helpers.context(missing, tmp_path / "third"), vocab_stage)

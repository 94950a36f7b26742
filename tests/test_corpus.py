"""The corpus interface (tda.corpus): streamed tfds / seqio / JSONL sources give the
same rows, ids and tokens as the in-memory world path; each process reads only its
shards; truncation is counted; peak memory does not grow with the corpus."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tda import corpus as corpus_lib
from tda import data
from tda import standin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_ROWS = 60


@pytest.fixture(scope="module")
def c4_rows():
  return standin.c4_rows(N_ROWS)


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
  d = tmp_path_factory.mktemp("vocab")
  path = data.train_vocab(texts=standin.paragraphs()[:400], vocab_size=400,
                          model_prefix=str(d / "spm"))
  return data.get_vocabulary(path)


@pytest.fixture(scope="module")
def jsonl_dir(tmp_path_factory, c4_rows):
  d = tmp_path_factory.mktemp("jsonl")
  for k, part in enumerate([c4_rows[:25], c4_rows[25:26], c4_rows[26:]]):
    with open(d / f"c4-train.jsonl-{k:05d}-of-00003", "w") as f:
      for r in part:
        f.write(json.dumps(r) + "\n")
  return d


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory, c4_rows):
  """A TFDS dataset in C4's format (text, url, timestamp), built locally."""
  d = tmp_path_factory.mktemp("tfds")
  standin.build_c4_tfds(str(d), c4_rows, name="tiny_c4")
  return d


def _all(corpus):
  return list(corpus.texts(0, len(corpus)))


def test_jsonl_rows_ids_and_direct_lookup(jsonl_dir, c4_rows):
  c = corpus_lib.JsonlCorpus(files=str(jsonl_dir / "c4-train.jsonl-*"))
  assert len(c) == N_ROWS
  rows = _all(c)
  assert [t for _, t in rows] == [r["text"] for r in c4_rows]
  assert rows[0][0] == "c4-train.jsonl-00000-of-00003:0"
  assert rows[25][0] == "c4-train.jsonl-00001-of-00003:0"   # Ids: file name and line.
  assert rows[30][0] == "c4-train.jsonl-00002-of-00003:4"
  assert list(c.texts(24, 27)) == rows[24:27]               # Ranges across files.
  assert c.row_of(rows[30][0]) == 30
  assert c.lookup([rows[30][0], rows[2][0]]) == {rows[30][0]: rows[30][1],
                                                 rows[2][0]: rows[2][1]}
  with pytest.raises(KeyError, match="not in the corpus"):
    c.lookup(["nope:1"])
  by_url = corpus_lib.JsonlCorpus(files=str(jsonl_dir / "*"), id_key="url")
  assert [i for i, _ in _all(by_url)] == [r["url"] for r in c4_rows]
  assert by_url.lookup([c4_rows[40]["url"]]) == {c4_rows[40]["url"]: c4_rows[40]["text"]}
  with pytest.raises(FileNotFoundError, match="no file matches"):
    corpus_lib.JsonlCorpus(files=str(jsonl_dir / "missing-*"))


def test_tfds_and_seqio_sources_read_the_same_rows(tfds_dir, jsonl_dir, c4_rows):
  import seqio
  name = "tiny_c4:3.1.0"
  t = corpus_lib.TfdsCorpus(name=name, data_dir=str(tfds_dir))
  assert len(t) == N_ROWS
  rows = _all(t)
  # TFDS stores examples in its own (hashed) order; rows follow the stored order.
  assert sorted(x for _, x in rows) == sorted(r["text"] for r in c4_rows)
  assert rows[7][0] == "tiny_c4:3.1.0/train/7"
  assert list(t.texts(31, 35)) == rows[31:35]                  # train[31:35] slice.
  assert t.lookup([rows[33][0]]) == {rows[33][0]: rows[33][1]}
  # A prepared dataset's folder works without its builder class.
  folder = corpus_lib.TfdsCorpus(name=str(tfds_dir / "tiny_c4" / "3.1.0"))
  assert [x for _, x in _all(folder)] == [x for _, x in rows]
  url = corpus_lib.TfdsCorpus(name=name, data_dir=str(tfds_dir), id_key="url", max_rows=10)
  by_text = {r["text"]: r["url"] for r in c4_rows}
  assert [i for i, _ in _all(url)] == [by_text[x] for _, x in rows[:10]]
  with pytest.raises(ValueError, match="no split 'validation'"):
    corpus_lib.TfdsCorpus(name=name, data_dir=str(tfds_dir), split="validation")
  # A gs:// name is a prepared folder too (a local isdir is False there, and the
  # name would go to tfds.builder as a dataset name).
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from unittest import mock  # pylint: disable=g-import-not-at-top
  local_builder = tfds.builder_from_directory(str(tfds_dir / "tiny_c4" / "3.1.0"))
  with mock.patch.object(tfds, "builder_from_directory", return_value=local_builder) as m:
    remote = corpus_lib.TfdsCorpus(name="gs://bucket/tfds/tiny_c4/3.1.0")
  m.assert_called_once_with("gs://bucket/tfds/tiny_c4/3.1.0")
  assert len(remote) == N_ROWS

  task = "tda_test_tiny_c4_stream"
  if task not in seqio.TaskRegistry.names():
    seqio.TaskRegistry.add(task, source=seqio.TfdsDataSource(
        tfds_name=name, tfds_data_dir=str(tfds_dir)), preprocessors=[], output_features={})
  s = corpus_lib.SeqioCorpus(task=task)
  assert len(s) == N_ROWS
  assert [x for _, x in s.texts(20, 30)] == [x for _, x in rows[20:30]]
  assert s.row_of(f"{task}/train/12") == 12
  with pytest.raises(ValueError, match="not a registered seqio task"):
    corpus_lib.SeqioCorpus(task="tda_no_such_task")


def test_process_shards_partition_the_corpus(jsonl_dir):
  c = corpus_lib.JsonlCorpus(files=str(jsonl_dir / "*"))
  seen = []
  for p in range(3):
    mine = c.shards(8, p, 3)
    assert all(s % 3 == p for s, _, _ in mine)
    seen += [r for _, lo, hi in mine for r in range(lo, hi)]
  assert sorted(seen) == list(range(N_ROWS))


def test_tokens_truncation_and_take(jsonl_dir, vocab):
  c = corpus_lib.JsonlCorpus(files=str(jsonl_dir / "*"))
  texts = [t for _, t in _all(c)]
  full = [vocab.encode(t) + [1] for t in texts]
  rows = c.tokens(0, N_ROWS, vocab=vocab, seq_len=24)
  assert rows.n_truncated == sum(len(f) > 24 for f in full) > 0
  for n, f in enumerate(full):
    assert rows.tokens_nt[n, :min(len(f), 24)].tolist() == f[:24]
    assert not rows.tokens_nt[n, len(f):].any()
  took = c.take([50, 3, 17], vocab=vocab, seq_len=24, block=16)
  assert took.ids == [rows.ids[i] for i in (50, 3, 17)]
  assert np.array_equal(took.tokens_nt, rows.tokens_nt[[50, 3, 17]])


def test_streamed_tokens_equal_the_world_path(tmp_path, c4_rows, vocab):
  """Tokens made on the fly equal those of the world's seqio task (data.world_arrays)."""
  from tda import world as world_lib
  passages = [{"id": f"p{i}", "text": r["text"], "kind": "filler", "fact_ids": []}
              for i, r in enumerate(c4_rows)]
  facts = [{"fact_id": "f", "example_id": "e", "inputs_plaintext": "Python is a",
            "targets_plaintext": "language"}]
  world_lib.World(passages=passages, facts=facts).write(str(tmp_path))
  with open(tmp_path / "p.jsonl", "w") as f:
    for p in passages:
      f.write(json.dumps(p) + "\n")
  corpus, _ = data.world_arrays(world_dir=str(tmp_path),
                                vocab_path=vocab.sentencepiece_model_file, seq_len=32)
  streamed = corpus_lib.JsonlCorpus(files=str(tmp_path / "p.jsonl"), id_key="id")
  rows = streamed.tokens(0, len(streamed), vocab=vocab, seq_len=32)
  assert rows.ids == corpus.ids
  assert np.array_equal(rows.tokens_nt, corpus.tokens_nt)
  assert rows.n_truncated == corpus.n_truncated > 0
  world = corpus_lib.WorldCorpus(arrays=corpus, texts=[p["text"] for p in passages],
                                 world_digest="x")
  assert world.tokens(0, N_ROWS).n_truncated == corpus.n_truncated


def test_concat_appends_trex_sentences(jsonl_dir):
  sentences = os.path.join(ROOT, "tests", "fixtures", "trex", "trex_sentences.jsonl-*")
  c = corpus_lib.ConcatCorpus([corpus_lib.JsonlCorpus(files=str(jsonl_dir / "*")),
                               corpus_lib.JsonlCorpus(files=sentences, id_key="sentence_id")])
  assert len(c) == N_ROWS + 6
  assert [i for i, _ in c.texts(N_ROWS - 1, N_ROWS + 2)][1:] == ["s0", "s1"]
  assert c.lookup(["s4"])["s4"].startswith("Kahlo was born")


def test_bad_source_is_a_clear_error():
  from tests.helpers import tiny_config
  with pytest.raises(ValueError, match="data.source must be one of"):
    corpus_lib.streamed(tiny_config(**{"data.source": "c4"}))
  with pytest.raises(ValueError, match="needs data.jsonl"):
    corpus_lib.from_config(tiny_config(**{"data.source": "jsonl"}))


def _bench(*args):
  p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_stream_memory.py"),
                      *args], capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert p.returncode == 0, p.stderr[-3000:]
  return json.loads(p.stdout.strip().splitlines()[-1])


def test_peak_memory_does_not_grow_with_the_corpus():
  """Peak RSS after N/4 and N rows: flat when streamed; the same measurement sees
  the in-memory path grow (so it can tell)."""
  streamed = _bench("--rows", "20000")
  kept = _bench("--rows", "20000", "--materialise")
  print("streamed", streamed, "\nmaterialised", kept)
  assert streamed["rows"] == kept["rows"] == 20000
  assert streamed["rss_ratio"] <= 1.1
  assert kept["rss_ratio"] >= 1.3

"""Tests for tda.data: vocab, seqio tasks, arrays, the C4 stream."""

import os

import numpy as np
import pytest

from tda import config as config_lib
from tda import data
from tda import workdir as wd

_NAMES = ["José Núñez", "Zoë Ólafsdóttir", "Łukasz Wąsowski", "Søren Kjær",
          "Ann Smith", "Chloé Brontë", "Ünal Çelik", "Đặng Thị Hương", "Amélie Poulain",
          "Björn Åström"]
_CITIES = ["Paris", "Kraków", "Reykjavík", "São Paulo", "München", "Zürich",
           "Hà Nội", "İstanbul", "Malmö", "Córdoba"]
VOCAB_SIZE = 400


def _world_rows():
  passages, facts = [], []
  for i in range(50):
    name, city = _NAMES[i % 10], _CITIES[(3 * i) % 10]
    if i < 20:
      text = (f"{name} was born in the city of {city}. Later, {name.split()[0]} "
              f"moved away and wrote {i + 2} books — «great» ones.")
      kind, fids = "fact", [f"F{i % 10}"]
    else:
      text = (f"{city} is a city; the weather is mild in the year {1900 + i}. "
              f"Nobody named {name} lives there.")
      kind, fids = ("distractor" if i < 40 else "filler"), []
    passages.append({"id": f"p{i:03d}", "text": text, "kind": kind, "fact_ids": fids})
  for j in range(10):
    facts.append({
        "fact_id": f"F{j}", "example_id": f"trex_{j}", "relation": "place_of_birth",
        "subject": _NAMES[j], "object": _CITIES[(3 * j) % 10],
        "inputs_plaintext": f"{_NAMES[j]} was born in the city of",
        "targets_plaintext": _CITIES[(3 * j) % 10], "frequency": 2, "bucket": "2-3",
        "passage_ids": [f"p{j:03d}", f"p{j + 10:03d}"]})
  return passages, facts


def _write_world(world_dir, passages, facts):
  os.makedirs(world_dir, exist_ok=True)
  wd.write_jsonl(os.path.join(world_dir, "passages.jsonl"), passages)
  wd.write_jsonl(os.path.join(world_dir, "facts.jsonl"), facts)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("world"))
  passages, facts = _world_rows()
  _write_world(os.path.join(root, "world"), passages, facts)
  vocab_path = data.train_vocab(texts=[p["text"] for p in passages],
                                vocab_size=VOCAB_SIZE,
                                model_prefix=os.path.join(root, "spm"))
  names = data.register_world_tasks(world_dir=os.path.join(root, "world"),
                                    vocab_path=vocab_path)
  return dict(root=root, passages=passages, facts=facts, vocab_path=vocab_path,
              vocab=data.get_vocabulary(vocab_path), names=names)


def _config(vocab_size=VOCAB_SIZE, vocab_path=None):
  c = config_lib.base_config()
  c.data.vocab_size = vocab_size
  c.data.vocab_path = vocab_path
  return config_lib.finalize(c)


# --- Vocabulary --------------------------------------------------------------


def test_vocab_training_is_deterministic_and_uses_seqio_ids(world, tmp_path):
  texts = [p["text"] for p in world["passages"]]
  again = data.train_vocab(texts=texts, vocab_size=VOCAB_SIZE,
                           model_prefix=str(tmp_path / "again"))
  with open(world["vocab_path"], "rb") as f1, open(again, "rb") as f2:
    assert f1.read() == f2.read()
  vocab = world["vocab"]
  assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
  assert 259 < vocab.vocab_size <= VOCAB_SIZE


def test_tokenizer_round_trips_unicode(world):
  vocab = world["vocab"]
  texts = [p["text"] for p in world["passages"]] + [
      "Unseen: 漢字 🙂 Ωmega\tand  two  spaces\nnew line", " leading space"]
  for text in texts:
    ids = vocab.encode(text)
    assert data.UNK_ID not in ids
    assert vocab.decode(ids) == text
  # The TF tokenizer seqio uses inside tasks agrees with the Python one.
  assert vocab.encode_tf(texts[-2]).numpy().tolist() == vocab.encode(texts[-2])


def test_train_vocab_rejects_too_small_vocab_and_empty_texts(tmp_path):
  with pytest.raises(ValueError, match="too small"):
    data.train_vocab(texts=["a b"], vocab_size=100, model_prefix=str(tmp_path / "x"))
  with pytest.raises(ValueError, match="no non-empty"):
    data.train_vocab(texts=["", ""], vocab_size=400, model_prefix=str(tmp_path / "x"))


# --- Tasks and arrays ----------------------------------------------------------


def test_register_world_tasks_idempotent_and_unique(world, tmp_path):
  again = data.register_world_tasks(world_dir=os.path.join(world["root"], "world"),
                                    vocab_path=world["vocab_path"])
  assert again == world["names"]
  passages, facts = _world_rows()
  _write_world(str(tmp_path / "w2"), passages, facts)
  other = data.register_world_tasks(world_dir=str(tmp_path / "w2"),
                                    vocab_path=world["vocab_path"])
  assert set(other.values()).isdisjoint(world["names"].values())


def test_tokenized_corpus_matches_encoding(world):
  vocab = world["vocab"]
  arrays = data.tokenized_corpus(task_name=world["names"]["corpus"], seq_len=128)
  assert arrays.ids == [p["id"] for p in world["passages"]]
  assert arrays.tokens_nt.shape == (50, 128) and arrays.tokens_nt.dtype == np.int32
  assert arrays.n_truncated == 0
  for n, p in enumerate(world["passages"]):
    want = vocab.encode(p["text"]) + [data.EOS_ID]
    assert arrays.lengths_n[n] == len(want)
    assert arrays.tokens_nt[n, :len(want)].tolist() == want
    assert not arrays.tokens_nt[n, len(want):].any()


def test_tokenized_corpus_counts_truncation(world, caplog):
  vocab = world["vocab"]
  full = [len(vocab.encode(p["text"])) + 1 for p in world["passages"]]
  seq_len = int(np.median(full))
  want = sum(f > seq_len for f in full)
  assert 0 < want < 50
  with caplog.at_level("WARNING"):
    arrays = data.tokenized_corpus(task_name=world["names"]["corpus"], seq_len=seq_len)
  assert arrays.n_truncated == want
  assert f"{want} of 50 passages exceed seq_len={seq_len}" in caplog.text
  np.testing.assert_array_equal(arrays.lengths_n, np.minimum(full, seq_len))
  # Passages that fit end with EOS; truncated ones are cut, without EOS.
  for n, f in enumerate(full):
    last = arrays.tokens_nt[n, arrays.lengths_n[n] - 1]
    assert (last == data.EOS_ID) == (f <= seq_len)


def test_tokenized_queries_mask_is_exactly_the_target(world):
  vocab = world["vocab"]
  q = data.tokenized_queries(task_name=world["names"]["queries"], seq_len=128)
  assert q.ids == [f["example_id"] for f in world["facts"]]
  assert q.fact_ids == [f["fact_id"] for f in world["facts"]]
  longest = int((q.prompt_lens + q.target_lens).max())
  assert q.tokens_nl.shape[1] == -(-longest // 8) * 8 and q.tokens_nl.shape[1] % 8 == 0
  assert q.loss_mask_nl.dtype == np.float32
  for i, f in enumerate(world["facts"]):
    prompt, target = f["inputs_plaintext"], f["targets_plaintext"]
    mask = q.loss_mask_nl[i]
    p, t = q.prompt_lens[i], q.target_lens[i]
    assert mask.sum() == t and mask[p:p + t].all()
    assert vocab.decode(q.tokens_nl[i][mask == 1.0].tolist()) == target
    assert vocab.decode(q.tokens_nl[i, :p].tolist()) == prompt
    # What the model sees is exactly the encoding of "prompt target", no EOS.
    assert q.tokens_nl[i, :p + t].tolist() == vocab.encode(f"{prompt} {target}")
    assert vocab.decode(q.tokens_nl[i, :p + t].tolist()) == f"{prompt} {target}"
    assert not q.tokens_nl[i, p + t:].any()
  q16 = data.tokenized_queries(task_name=world["names"]["queries"], seq_len=128,
                               query_len=longest)
  assert q16.tokens_nl.shape[1] == longest


def test_tokenized_queries_raise_on_overlong_empty_or_incomplete_records(world, tmp_path):
  passages, facts = _world_rows()
  q = data.tokenized_queries(task_name=world["names"]["queries"], seq_len=128)
  longest = int((q.prompt_lens + q.target_lens).max())
  with pytest.raises(ValueError, match="longer than the limit"):
    data.tokenized_queries(task_name=world["names"]["queries"], seq_len=longest - 1)
  with pytest.raises(ValueError, match="query_len"):
    data.tokenized_queries(task_name=world["names"]["queries"], seq_len=16,
                           query_len=32)
  facts[3]["targets_plaintext"] = ""
  _write_world(str(tmp_path / "empty"), passages, facts)
  names = data.register_world_tasks(world_dir=str(tmp_path / "empty"),
                                    vocab_path=world["vocab_path"])
  with pytest.raises(ValueError, match="trex_3.*empty"):
    data.tokenized_queries(task_name=names["queries"], seq_len=128)
  del facts[3]["targets_plaintext"]
  _write_world(str(tmp_path / "missing"), passages, facts)
  names = data.register_world_tasks(world_dir=str(tmp_path / "missing"),
                                    vocab_path=world["vocab_path"])
  with pytest.raises(ValueError, match="record 3 lacks keys"):
    data.tokenized_queries(task_name=names["queries"], seq_len=128)

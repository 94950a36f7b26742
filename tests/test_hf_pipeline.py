"""The pipeline attributing a Hugging Face Llama folder (`model.checkpoint_format=
'hf_llama'`): a tiny random untied `LlamaForCausalLM` saved with `save_pretrained`
and a SentencePiece BPE `tokenizer.model`, run through `python -m tda.run` up to
retrieval with V estimated (the folder has no optimizer state)."""

import importlib.util
import json
import os

import numpy as np
import pytest

from tda import config as config_lib
from tda import hf_checkpoint as hfc
from tda import pipeline
from tda import workdir as wd
from tda.stages import train as train_stage
from tests import helpers
from tests import test_pipeline

_HAVE_HF = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))
pytestmark = pytest.mark.skipif(
    not _HAVE_HF, reason="torch and transformers not installed (pip install -e '.[bench]')")

_TEXTS = [f"{name} was born in {city} and works for {org}, entry {i}."
          for i, (name, city, org) in enumerate(
              [("Ada Lovelace", "London", "the Analytical Society"),
               ("Marie Curie", "Warsaw", "the Radium Institute"),
               ("Alan Turing", "Maida Vale", "the National Physical Laboratory")] * 10)]
STAGES = "world,vocab,train,second_moments,gradients,tables,retrieval"
# Small and one length bucket, so few shapes compile: the run takes ~40 s of CPU.
SMALL = ("--config.data.seq_len=64", "--config.model.max_len=64",
         "--config.gradients.length_bucket=64", "--config.gradients.batch_size=32",
         "--config.hessian.train_samples=8", "--config.gradients.v_estimate_samples=16")


def make_hf_folder(folder, *, tie=False, vocab_size=512):
  """A random `LlamaForCausalLM` (d_model 64, 2 layers) and a Llama-style
  SentencePiece tokenizer (unk 0, bos 1, eos 2, byte fallback) in `folder`."""
  import sentencepiece as spm
  import torch
  import transformers
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
      vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=128,
      tie_word_embeddings=tie, rms_norm_eps=1e-6, rope_theta=10_000.0, initializer_range=0.1,
      bos_token_id=1, eos_token_id=2)
  transformers.LlamaForCausalLM(cfg).to(torch.float32).eval().save_pretrained(str(folder))
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(_TEXTS), model_prefix=os.path.join(folder, "tokenizer"),
      vocab_size=400, model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
      pad_id=-1, normalization_rule_name="identity", remove_extra_whitespaces=False,
      hard_vocab_limit=False, minloglevel=2)
  os.remove(os.path.join(folder, "tokenizer.vocab"))
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
               "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
               "legacy": False}, f)
  return str(folder)


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf")
  folder = make_hf_folder(root / "llama")
  w = str(root / "W")
  test_pipeline.run_tda(w, f"--config.model.checkpoint={folder}",
                        "--config.model.checkpoint_format=hf_llama",
                        "--config.gradients.v_source=estimate",
                        "--config.eval.methods=('trackstar',)", f"--config.stages={STAGES}",
                        *SMALL)
  return folder, w


@pytest.mark.slow
def test_hf_folder_runs_through_retrieval(hf_run):
  folder, w = hf_run
  assert sorted(os.listdir(os.path.join(w, "train"))) == ["COMMITTED.json", "summary.json"]
  ext = wd.read_json(os.path.join(w, "train", "summary.json"))["external_checkpoint"]
  assert ext["path"] == folder and ext["format"] == "hf_llama" and ext["step"] == 0
  assert set(ext["files"]) == {"model.safetensors"}
  vocab = wd.read_json(os.path.join(w, "vocab", "summary.json"))
  assert vocab["path"] == folder and vocab["piece_size"] == 400
  # The model is config.json's (untied, sequential), not the config file's defaults.
  fp = wd.committed(w, "train")["fingerprint"]
  assert fp["model"]["tie_embeddings"] is False and fp["model"]["block"] == "sequential"
  cov = wd.read_json(os.path.join(w, "gradients", "coverage.json"))
  assert cov["by_kind"]["head"]["attributed"] == cov["by_kind"]["head"]["params"] == 64 * 512
  assert cov["attributed_share"] == 1.0
  assert os.path.isdir(os.path.join(w, "second_moments"))
  queries = test_pipeline._jsonl(os.path.join(w, "world", "facts.jsonl"))
  ranked = wd.read_json(os.path.join(w, "retrieval", "trackstar.json"))
  assert len(wd.read_json(os.path.join(w, "retrieval", "query_ids.json"))) == len(queries)
  assert len(ranked["top_ids"]) == len(queries) and all(len(r) for r in ranked["top_ids"])
  assert np.all(np.isfinite(ranked["top_scores"]))
  # Passages were tokenised by the folder's tokenizer: BOS (1) first, EOS (2) last.
  sp = hfc.load_vocabulary(folder)
  text = test_pipeline._jsonl(os.path.join(w, "world", "passages.jsonl"))[0]["text"]
  assert sp.encode(text)[0] == 1 and sp.eos_id == 2


@pytest.mark.slow
def test_changed_folder_is_refused(hf_run):
  folder, w = hf_run
  c = config_lib.base_config()
  c.model.checkpoint, c.model.checkpoint_format = folder, "hf_llama"
  c.gradients.v_source = "estimate"
  c.data.seq_len = c.model.max_len = 64
  config_lib.finalize(c)
  before = helpers.file_snapshot(w)
  assert not pipeline.run_stage(helpers.context(c, w), train_stage)  # Same folder: skipped.
  weights = os.path.join(folder, "model.safetensors")
  st = os.stat(weights)
  os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
  with pytest.raises(wd.WorkdirConflict, match=r"external_checkpoint\.files"):
    pipeline.run_stage(helpers.context(c, w), train_stage)
  assert helpers.file_snapshot(w) == before

"""tda.hf_checkpoint: HF Llama `save_pretrained` folders as our model, params, vocab.

The checkpoints are built here: a small seeded `LlamaForCausalLM` (torch, CPU)
saved with safetensors (float32, bf16, sharded) and tokenizers trained on a
few sentences. Tests that need torch/transformers skip with the reason when
they are missing; the config and safetensors-reading checks always run.
"""

import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tda import hf_checkpoint as hfc
from tda import model as model_lib

_HAVE_HF = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))
_NO_HF = "torch and transformers not installed (pip install -e '.[bench]')"
needs_hf = pytest.mark.skipif(not _HAVE_HF, reason=_NO_HF)

_SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=500.0)
_BASE_CONFIG = {"model_type": "llama", "hidden_act": "silu", "attention_bias": False,
                "mlp_bias": False, "head_dim": 16,
                "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}, **_SHAPE}
_TEXTS = [f"Ada Lovelace was born in the city of London, entry {i}. Über naïve café."
          for i in range(40)] + ["The quick brown fox jumps over the lazy dog."] * 5
_STRINGS = ["Ada  Lovelace was born in Zürich.", " London,\n entry 12 ", "x", "",
            "hello   world  ", "日本語", "a</s>b <s> c"]


def _hf_model(**changes):
  import torch
  import transformers
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(**{**_SHAPE, **changes}, initializer_range=0.1)
  model = transformers.LlamaForCausalLM(cfg).to(torch.float32).eval()
  with torch.no_grad():  # Non-trivial norm scales, so a misplaced one shows.
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module")
def hf_model():
  if not _HAVE_HF:
    pytest.skip(_NO_HF)
  return _hf_model()


@pytest.fixture(scope="module")
def hf_model_untied():
  if not _HAVE_HF:
    pytest.skip(_NO_HF)
  return _hf_model(tie_word_embeddings=False)


@pytest.fixture(scope="module")
def tokens():
  return np.random.default_rng(3).integers(0, _SHAPE["vocab_size"], (3, 20)).astype(np.int32)


def _hf_logits(model, tokens_bt):
  import torch
  with torch.no_grad():
    return model(torch.from_numpy(tokens_bt.astype(np.int64))).logits.float().numpy()


def _our_logits(folder, tokens_bt):
  cfg, params = hfc.load(folder)
  return np.asarray(model_lib.Transformer(cfg).apply({"params": params}, tokens_bt))


def _save(model, folder, **kw):
  model.save_pretrained(str(folder), **kw)
  return str(folder)


# ---------------------------------------------------------------------------
# Config.


def test_model_config_from_hf():
  cfg = hfc.model_config_from_hf(_BASE_CONFIG)
  assert cfg == model_lib.ModelConfig(
      vocab_size=512, d_model=64, n_layers=2, n_heads=4, head_dim=16, n_kv_heads=2, d_ff=128,
      max_len=128, block="sequential", rope_base=500.0, norm_eps=1e-5, scale_embeddings=False)
  legacy = {k: v for k, v in _BASE_CONFIG.items() if k not in ("rope_parameters", "head_dim")}
  legacy.update(rope_theta=1e4, num_key_value_heads=None)
  cfg2 = hfc.model_config_from_hf(legacy, max_len=32)
  assert (cfg2.rope_base, cfg2.head_dim, cfg2.n_kv_heads, cfg2.max_len) == (1e4, 16, 4, 32)
  over = hfc.config_overrides(cfg)
  assert over["model.block"] == "sequential" and over["model.scale_embeddings"] is False
  assert over["data.vocab_size"] == over["model.vocab_size"] == 512
  assert over["model.rope_base"] == 500.0 and over["model.n_kv_heads"] == 2
  assert over["model.tie_embeddings"] is True
  untied = hfc.model_config_from_hf({**_BASE_CONFIG, "tie_word_embeddings": False})
  assert untied.tie_embeddings is False
  # LlamaConfig's default (save_pretrained always writes the key) is untied.
  no_key = {k: v for k, v in _BASE_CONFIG.items() if k != "tie_word_embeddings"}
  assert hfc.model_config_from_hf(no_key).tie_embeddings is False


@pytest.mark.parametrize("change, match", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, r"rope_scaling="),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}},
     r"rope_parameters.rope_type='linear'"),
    ({"attention_bias": True}, r"attention_bias=true"),
    ({"mlp_bias": True}, r"mlp_bias=true"),
    ({"hidden_act": "gelu"}, r"hidden_act='gelu'"),
    ({"model_type": "gemma"}, r"model_type='gemma'.*\(1 \+ weight\) RMSNorm"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default"}}}, r"per-layer-type"),
    ({"sliding_window": 4096}, r"sliding_window=4096"),
    ({"num_key_value_heads": 3}, r"not a multiple of num_key_value_heads=3"),
])
def test_unsupported_config_names_the_field(change, match):
  with pytest.raises(ValueError, match=match):
    hfc.model_config_from_hf({**_BASE_CONFIG, **change})


def test_unsupported_config_in_folder_refused_by_load_params(tmp_path):
  with open(tmp_path / "config.json", "w") as f:
    json.dump({**_BASE_CONFIG, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, f)
  with pytest.raises(ValueError, match="rope_scaling"):
    hfc.load_params(str(tmp_path))


def test_raw_reader_matches_safetensors(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {"a": rng.normal(size=(3, 5)).astype(ml_dtypes.bfloat16),
             "b": rng.normal(size=(7,)).astype(np.float16),
             "c": rng.normal(size=(2, 2)).astype(np.float32)}
  path = str(tmp_path / "t.safetensors")
  save_file(tensors, path)
  header = hfc._safetensors_header(path)  # pylint: disable=protected-access
  assert header["a"]["dtype"] == "BF16"
  for name, want in tensors.items():
    raw = hfc._read_raw(path, name, header)  # pylint: disable=protected-access
    assert raw.dtype == want.dtype and raw.shape == want.shape
    np.testing.assert_array_equal(raw.astype(np.float32), want.astype(np.float32))
    np.testing.assert_array_equal(
        hfc._read_tensor(path, name, header).astype(np.float32),  # pylint: disable=protected-access
        want.astype(np.float32))


# ---------------------------------------------------------------------------
# Weights and logits.


@needs_hf
@pytest.mark.slow
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_float32_logits_match(tied, hf_model, hf_model_untied, tokens, tmp_path):
  model = hf_model if tied else hf_model_untied
  folder = _save(model, tmp_path / "f32")
  diff = float(np.max(np.abs(_our_logits(folder, tokens) - _hf_logits(model, tokens))))
  print(f"{'tied' if tied else 'untied'} float32 max |logit diff| = {diff:.3g}")
  assert diff < 1e-4, diff
  params = hfc.load_params(folder)
  assert params["embed"]["embedding"].dtype == np.float32
  np.testing.assert_array_equal(params["layer_1"]["attn"]["k"]["kernel"],
                                model.model.layers[1].self_attn.k_proj.weight.detach().numpy().T)
  if tied:
    assert "lm_head" not in params
    return
  np.testing.assert_array_equal(params["lm_head"]["kernel"],
                                model.lm_head.weight.detach().numpy().T)
  assert not np.array_equal(params["lm_head"]["kernel"].T, params["embed"]["embedding"])
  # A tied config against an untied folder, and an untied folder without its head.
  cfg = hfc.model_config_from_hf(folder)
  with pytest.raises(ValueError, match=r"tie_embeddings=True \(checkpoint: False\)"):
    hfc.load_params(folder, model_lib.ModelConfig(**{**cfg.__dict__, "tie_embeddings": True}))
  path = os.path.join(folder, "model.safetensors")
  save_file({k: v for k, v in load_file(path).items() if k != "lm_head.weight"}, path)
  with pytest.raises(KeyError, match=r"'lm_head\.weight' is missing"):
    hfc.load_params(folder)


_NO_TORCH_SCRIPT = """
import sys


class _Block:  # Any import of torch or transformers fails.
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in ("torch", "transformers"):
      raise ImportError(f"{name} is blocked in this test")
    return None


sys.meta_path.insert(0, _Block())
import numpy as np
from tda import hf_checkpoint as hfc
from tda import model as model_lib
cfg, params = hfc.load(sys.argv[1])
tokens = np.load(sys.argv[2])
np.save(sys.argv[3], np.asarray(model_lib.Transformer(cfg).apply({"params": params}, tokens)))
print(hfc.load_vocabulary(sys.argv[4]).encode("Ada Lovelace"))
assert "torch" not in sys.modules and "transformers" not in sys.modules
"""


@needs_hf
@pytest.mark.slow
def test_loads_without_torch(hf_model, tokens, tmp_path):
  folder = _save(copy.deepcopy(hf_model).to(__import__("torch").bfloat16), tmp_path / "m")
  tok_folder = _sp_folder(tmp_path, {"add_bos_token": True})
  np.save(tmp_path / "tokens.npy", tokens)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
      [sys.executable, "-c", _NO_TORCH_SCRIPT, folder, str(tmp_path / "tokens.npy"),
       str(tmp_path / "logits.npy"), tok_folder],
      cwd=root, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1] == str(list(hfc.load_vocabulary(tok_folder).encode(
      "Ada Lovelace")))
  np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), _our_logits(folder, tokens),
                             rtol=0, atol=1e-6)


@needs_hf
@pytest.mark.slow
def test_bfloat16_checkpoint(hf_model, tokens, tmp_path):
  import torch
  import transformers
  folder = _save(copy.deepcopy(hf_model).to(torch.bfloat16), tmp_path / "bf16")
  ours = _our_logits(folder, tokens)
  # Same (bf16-rounded) weights in float32 on both sides: as tight as float32.
  hf_bf16_weights = transformers.AutoModelForCausalLM.from_pretrained(
      folder, dtype=torch.float32).eval()
  diff = float(np.max(np.abs(ours - _hf_logits(hf_bf16_weights, tokens))))
  # Against the original float32 weights: bf16 rounding (8-bit mantissa) only.
  orig = _hf_logits(hf_model, tokens)
  diff_orig, scale = float(np.max(np.abs(ours - orig))), float(np.max(np.abs(orig)))
  print(f"bf16 checkpoint: max |logit diff| {diff:.3g} vs HF on the same weights, "
        f"{diff_orig:.3g} vs the float32 original (max |logit| {scale:.3g})")
  assert diff < 1e-4, diff
  assert diff_orig < 0.02 * scale, (diff_orig, scale)


@needs_hf
@pytest.mark.slow
def test_sharded_checkpoint(hf_model, tokens, tmp_path):
  folder = _save(hf_model, tmp_path / "sharded", max_shard_size="100KB")
  shards = [n for n in os.listdir(folder) if n.endswith(".safetensors")]
  assert len(shards) > 1 and os.path.exists(os.path.join(folder, "model.safetensors.index.json"))
  diff = float(np.max(np.abs(_our_logits(folder, tokens) - _hf_logits(hf_model, tokens))))
  print(f"sharded ({len(shards)} files) max |logit diff| = {diff:.3g}")
  assert diff < 1e-4, diff


@needs_hf
@pytest.mark.slow
def test_missing_unexpected_and_misshapen_tensors(hf_model, tmp_path):
  folder = _save(hf_model, tmp_path / "broken")
  path = os.path.join(folder, "model.safetensors")
  tensors = load_file(path)
  name = "model.layers.1.mlp.up_proj.weight"
  save_file({k: v for k, v in tensors.items() if k != name}, path)
  with pytest.raises(KeyError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' is missing"):
    hfc.load_params(folder)
  save_file({**tensors, "model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}, path)
  with pytest.raises(ValueError, match=r"no place for.*q_proj\.bias"):
    hfc.load_params(folder)
  save_file(tensors, path)
  cfg = hfc.model_config_from_hf(folder)
  wrong = model_lib.ModelConfig(**{**cfg.__dict__, "d_ff": 96})
  with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.gate_proj\.weight' has shape "
                     r"\(128, 64\), expected \(96, 64\)"):
    hfc.load_params(folder, wrong)
  with pytest.raises(ValueError, match=r"rope_base=10000.0 \(checkpoint: 500.0\)"):
    hfc.load_params(folder, model_lib.ModelConfig(**{**cfg.__dict__, "rope_base": 1e4}))


# ---------------------------------------------------------------------------
# Tokenizers.


def _sp_folder(tmp_path, tok_config):
  """A Llama-style folder tokenizer: SentencePiece BPE tokenizer.model (unk 0,
  bos 1, eos 2, byte fallback, identity normalisation) + tokenizer_config.json."""
  import sentencepiece as spm
  folder = tmp_path / "sp"
  folder.mkdir(exist_ok=True)
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(_TEXTS), model_prefix=str(folder / "tokenizer"), vocab_size=400,
      model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
      normalization_rule_name="identity", remove_extra_whitespaces=False,
      split_digits=True, hard_vocab_limit=False, minloglevel=2)
  os.remove(folder / "tokenizer.vocab")
  with open(folder / "config.json", "w") as f:
    json.dump(_BASE_CONFIG, f)
  with open(folder / "tokenizer_config.json", "w") as f:
    json.dump({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
               "unk_token": "<unk>", "legacy": False, **tok_config}, f)
  return str(folder)


def _check_same_ids(folder):
  import transformers
  hf = transformers.AutoTokenizer.from_pretrained(folder)
  for special in (True, False):
    vocab = hfc.load_vocabulary(folder, add_special_tokens=special)
    for s in _STRINGS:
      want = hf(s, add_special_tokens=special).input_ids
      assert list(vocab.encode(s)) == want, (folder, special, s)
  vocab = hfc.load_vocabulary(folder)
  assert vocab.eos_id == hf.eos_token_id and vocab.unk_id == hf.unk_token_id
  assert vocab.pad_id == 0
  ids = vocab.encode("Ada Lovelace")
  assert vocab.decode(ids) == hf.decode(ids)
  return hf, vocab


@needs_hf
@pytest.mark.slow
@pytest.mark.parametrize("tok_config", [{"add_bos_token": True, "add_eos_token": False},
                                        {"add_bos_token": True, "add_eos_token": True},
                                        {"add_bos_token": False}])
def test_sentencepiece_tokenizer_same_ids_as_hf(tmp_path, tok_config):
  folder = _sp_folder(tmp_path, tok_config)
  hf, vocab = _check_same_ids(folder)
  assert (vocab.bos_id, vocab.eos_id, vocab.unk_id) == (1, 2, 0)
  assert vocab.vocab_size == hf.vocab_size == 400
  # The same tokenizer saved by transformers as tokenizer.json only.
  saved = str(tmp_path / "json")
  hf.save_pretrained(saved)
  if os.path.exists(os.path.join(saved, "tokenizer.model")):
    os.remove(os.path.join(saved, "tokenizer.model"))
  shutil.copy(os.path.join(folder, "config.json"), saved)
  _check_same_ids(saved)


@needs_hf
@pytest.mark.slow
def test_bpe_tokenizer_json_same_ids_as_hf(tmp_path):
  import tokenizers
  import transformers
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.train_from_iterator(_TEXTS, tokenizers.trainers.BpeTrainer(
      vocab_size=400, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
  tok.post_processor = tokenizers.processors.TemplateProcessing(
      single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
  folder = str(tmp_path / "bpe")
  fast.save_pretrained(folder)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(_BASE_CONFIG, f)
  _, vocab = _check_same_ids(folder)
  assert vocab.eos_id == 1 and vocab.encode("x")[0] == 0  # BOS is id 0: see the module doc.
  # The pipeline pads with id 0: a BOS at id 0 is refused, and so is a regular token there.
  with pytest.raises(ValueError, match=r"adds '<\|begin_of_text\|>' \(id 0\) to every text"):
    hfc.check_pipeline_vocabulary(folder)
  with open(os.path.join(folder, "tokenizer.json")) as f:
    spec = json.load(f)
  spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] != 0]
  with open(os.path.join(folder, "tokenizer.json"), "w") as f:
    json.dump(spec, f)
  with pytest.raises(ValueError, match=r"token id 0 is the regular token"):
    hfc.check_pipeline_vocabulary(folder)


def test_vocabulary_tf_ops(tmp_path):
  pytest.importorskip("sentencepiece")
  import tensorflow as tf
  folder = _sp_folder(tmp_path, {"add_bos_token": True})
  # Llama's layout (<unk> 0, special, never added) fits the pipeline's padding id 0.
  assert hfc.check_pipeline_vocabulary(folder, model_vocab_size=512) == 400
  with pytest.raises(ValueError, match=r"400 ids, more than the model's vocab_size=256"):
    hfc.check_pipeline_vocabulary(folder, model_vocab_size=256)
  strict = hfc.load_vocabulary(folder, strict_pad=True)
  assert strict.encode("Ada") == hfc.load_vocabulary(folder).encode("Ada")
  with pytest.raises(ValueError, match=r"include id 0 \('<unk>'\).*padding"):
    strict.encode("<unk>")
  vocab = hfc.load_vocabulary(folder)
  s = "Ada  Lovelace was born in Zürich."
  ids = vocab.encode(s)
  assert ids[0] == 1
  assert vocab.encode_tf(tf.constant(s)).numpy().tolist() == list(ids)
  ds = tf.data.Dataset.from_tensor_slices([s, "x"]).map(vocab.encode_tf)
  assert [x.tolist() for x in ds.as_numpy_iterator()] == [list(ids), list(vocab.encode("x"))]
  assert vocab.decode_tf(tf.constant(ids[1:], tf.int32)).numpy().decode() == s


# ---------------------------------------------------------------------------
# The pipeline's use of a folder (model.checkpoint_format='hf_llama').


def _numpy_folder(tmp_path, *, tie):
  """A folder written without torch: our random params in HF names (convert_hf)."""
  import jax
  from tda import convert_hf
  hf_config = {**_BASE_CONFIG, "tie_word_embeddings": tie}
  cfg = hfc.model_config_from_hf(hf_config)
  params = model_lib.init_params(model_lib.Transformer(cfg), jax.random.key(0), 8)
  folder = tmp_path / f"numpy_tie{tie}"
  folder.mkdir()
  save_file(convert_hf.to_hf_state_dict(params=params, cfg=cfg),
            str(folder / "model.safetensors"))
  with open(folder / "config.json", "w") as f:
    json.dump(hf_config, f)
  return str(folder), jax.tree.map(np.asarray, params)


def _pipeline_config(folder, **changes):
  from tda import config as config_lib
  c = config_lib.base_config()
  c.model.checkpoint, c.model.checkpoint_format = folder, "hf_llama"
  c.gradients.v_source = "estimate"
  c.data.seq_len = c.model.max_len = 64
  c.mesh.axes = (("data", 2), ("model", 2))
  for k, v in changes.items():
    section, key = k.split(".")
    c[section][key] = v
  return config_lib.finalize(c)


def test_pipeline_restore_is_sharded_and_checked(tmp_path):
  import jax
  from jax.sharding import PartitionSpec as P
  from tda import sharding
  from tda import train as train_lib
  assert jax.device_count() == 4
  folder, want = _numpy_folder(tmp_path, tie=False)
  config = _pipeline_config(folder)
  cfg = model_lib.model_config(config)  # From config.json, not the config's model.*.
  assert (cfg.block, cfg.d_model, cfg.n_kv_heads, cfg.tie_embeddings, cfg.max_len) == (
      "sequential", 64, 2, False, 64)
  desc = train_lib.describe_checkpoint(config)
  assert desc["format"] == "hf_llama" and desc["step"] == 0 and set(desc["files"]) == {
      "model.safetensors"}
  model, state, meta = train_lib.load_trained(config, folder, 0)
  assert meta["format"] == "hf_llama" and state.step == 0
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), b)
  head = state.params["lm_head"]["kernel"]
  assert head.sharding.spec == P("data", "model")
  full = sum(x.nbytes for x in jax.tree.leaves(want))
  per_device = sharding.addressable_bytes(state.params)
  assert len(per_device) == 4 and max(per_device.values()) <= full / 3, (per_device, full)
  assert jax.tree.structure(state.opt_state) == jax.tree.structure(
      train_lib.make_optimizer(config).init(want))
  del model
  # Clear errors naming the field.
  with pytest.raises(train_lib.CheckpointMismatch, match="v_source='estimate'"):
    train_lib.describe_checkpoint(_pipeline_config(folder, **{"gradients.v_source": "checkpoint"}))
  with pytest.raises(ValueError, match=r"model.vocab_size=256 differs from vocab_size=512"):
    model_lib.model_config(_pipeline_config(folder, **{"model.vocab_size": 256}))
  with pytest.raises(ValueError, match=r"data.seq_len=256 exceeds max_position_embeddings=128"):
    model_lib.model_config(_pipeline_config(folder, **{"data.seq_len": 256}))
  with pytest.raises(ValueError, match=r"model.checkpoint_step=3: a Hugging Face folder"):
    train_lib.describe_checkpoint(_pipeline_config(folder, **{"model.checkpoint_step": 3}))
  with pytest.raises(FileNotFoundError, match=r"has no config.json; supported formats: hf_llama"):
    model_lib.model_config(_pipeline_config(str(tmp_path)))


def test_tied_folder_structure_hash_differs_from_untied(tmp_path):
  from tda import train as train_lib
  untied, _ = _numpy_folder(tmp_path, tie=False)
  tied, _ = _numpy_folder(tmp_path, tie=True)
  a, b = (train_lib.describe_checkpoint(_pipeline_config(f)) for f in (untied, tied))
  assert a["structure_sha256"] != b["structure_sha256"]
  assert a["config_sha256"] != b["config_sha256"]

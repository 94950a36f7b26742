"""tda.convert_hf: our Llama-style model and Adafactor state as HF objects.

The torch/transformers half is skipped (with the reason printed) when the
`.[bench]` extra is not installed; the state mapping is pure numpy and always runs.
"""

import importlib.util
import os

import numpy as np
import pytest

from tda import convert_hf
from tda import correction as corr_lib
from tda import model as model_lib
from tests import helpers

_HAVE_HF = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))
_NO_HF = "torch and transformers not installed (pip install -e '.[bench]')"
if not _HAVE_HF:
  print(f"tests/test_convert_hf.py: HF halves skipped: {_NO_HF}")

# Vocab 512 > d_model 64, d_ff 128 > 64, MQA k/v 64 x 32: every matrix factored
# (min_dim_size_to_factor 32), with optax's row side on either torch axis.
_OVERRIDES = {"model.block": "sequential", "model.scale_embeddings": False}


@pytest.fixture(scope="module")
def trained():
  config = helpers.tiny_config(**_OVERRIDES)
  model, params, opt_state = helpers.trained_state(config, steps=3)
  return config, model, params, opt_state


def _cfg(config):
  return model_lib.model_config(config)


def test_refuses_parallel_or_scaled_models():
  with pytest.raises(ValueError, match="block='parallel'.*scale_embeddings=True"):
    convert_hf.check_convertible(_cfg(helpers.tiny_config()))


def test_hf_module_names():
  assert convert_hf.hf_module_name(("layer_3", "mlp", "down", "kernel")) == "layers.3.mlp.down_proj"
  assert convert_hf.hf_module_name(("layer_0", "attn", "k", "kernel")) == "layers.0.self_attn.k_proj"
  with pytest.raises(ValueError, match="not a dense kernel"):
    convert_hf.hf_module_name(("embed", "embedding"))


def test_state_dict_layout(trained):
  config, _, params, _ = trained
  sd = convert_hf.to_hf_state_dict(params=params, cfg=_cfg(config))
  np.testing.assert_array_equal(sd["model.layers.1.self_attn.k_proj.weight"],
                                np.asarray(params["layer_1"]["attn"]["k"]["kernel"]).T)
  np.testing.assert_array_equal(sd["model.embed_tokens.weight"],
                                np.asarray(params["embed"]["embedding"]))
  assert sd["model.layers.0.mlp.up_proj.weight"].shape == (128, 64)
  assert "lm_head.weight" not in sd


def test_moments_preserve_v_and_round_trip(trained):
  config, _, params, opt_state = trained
  cfg = _cfg(config)
  _, fs = corr_lib.second_moments(opt_state)
  hf = convert_hf.adafactor_moments_to_hf(opt_state=opt_state, cfg=cfg)
  back = convert_hf.adafactor_moments_from_hf(moments=hf, cfg=cfg)
  n_factored = n_swapped = 0
  for name, path, transposed in convert_hf.param_map(cfg):
    shape = np.asarray(model_lib.param_at(params, path)).shape
    if "exp_avg_sq" in hf[name]:
      assert len(shape) == 1, f"{name} should be factored"
      np.testing.assert_array_equal(hf[name]["exp_avg_sq"], model_lib.param_at(fs.v, path))
      np.testing.assert_array_equal(back[path]["v"], model_lib.param_at(fs.v, path))
      continue
    n_factored += 1
    v_ours = convert_hf.factored_v(v_row=model_lib.param_at(fs.v_row, path),
                                   v_col=model_lib.param_at(fs.v_col, path), shape=shape)
    row, col = hf[name]["exp_avg_sq_row"], hf[name]["exp_avg_sq_col"]
    v_torch = np.outer(row, col) / row.mean()          # transformers' / bergson's V.
    np.testing.assert_allclose(v_torch, v_ours.T if transposed else v_ours, rtol=1e-5)
    n_swapped += not np.array_equal(row, model_lib.param_at(fs.v_row, path))
    v_back = convert_hf.factored_v(v_row=back[path]["v_row"], v_col=back[path]["v_col"],
                                   shape=shape)
    np.testing.assert_allclose(v_back, v_ours, rtol=1e-5)
  assert n_factored == 1 + 2 * 7  # Embedding + 7 matrices a layer.
  assert 0 < n_swapped < n_factored  # Both orientations were exercised.


@pytest.mark.slow  # Imports torch and transformers.
@pytest.mark.skipif(not _HAVE_HF, reason=_NO_HF)
def test_hf_model_same_logits(trained):
  config, model, params, _ = trained
  hf_model = convert_hf.to_hf_model(params=params, cfg=_cfg(config))
  toks = helpers.random_tokens(3, 24, config.data.vocab_size, seed=5, min_len=10)
  diff = convert_hf.max_logit_diff(model=model, params=params, hf_model=hf_model, tokens_bt=toks)
  scale = float(np.abs(np.asarray(model.apply({"params": params}, toks))).max())
  assert diff < 1e-4 * max(scale, 1.0), (diff, scale)


@pytest.mark.slow
@pytest.mark.skipif(not _HAVE_HF, reason=_NO_HF)
def test_saved_dir_loads_in_transformers_and_bergson_layout(trained, tmp_path):
  import torch
  import transformers
  config, model, params, opt_state = trained
  cfg = _cfg(config)
  out = convert_hf.save_hf(params=params, opt_state=opt_state, cfg=cfg,
                           out_dir=str(tmp_path / "hf"), step=3, max_position_embeddings=256)
  loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  toks = helpers.random_tokens(2, 16, config.data.vocab_size, seed=6)
  assert convert_hf.max_logit_diff(model=model, params=params, hf_model=loaded,
                                   tokens_bt=toks) < 1e-4
  tok = transformers.AutoTokenizer.from_pretrained(out)
  assert tok.model_max_length == 256 and tok.pad_token_id == 0
  # transformers' own Adafactor accepts the state and takes a step with it.
  sd = torch.load(os.path.join(out, "optimizer.pt"), weights_only=False)
  names = [n for n, _ in loaded.named_parameters()]
  assert sd["state"][names.index("model.layers.0.mlp.down_proj.weight")][
      "exp_avg_sq_row"].shape == (64,)
  opt = transformers.optimization.Adafactor(loaded.parameters(), lr=1e-3, relative_step=False,
                                            scale_parameter=False, warmup_init=False)
  opt.load_state_dict(sd)
  loaded(torch.from_numpy(toks.astype(np.int64)), labels=torch.from_numpy(
      toks.astype(np.int64))).loss.backward()
  opt.step()
  assert all(np.isfinite(p.detach().numpy()).all() for p in loaded.parameters())


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("sentencepiece") is None or not _HAVE_HF,
                    reason=_NO_HF)
def test_tokenizer_from_sentencepiece_matches(tmp_path):
  import sentencepiece as spm
  import transformers
  from tda import data as data_lib
  texts = [f"Ada Lovelace was born in the city of London, entry {i}." for i in range(200)]
  path = data_lib.train_vocab(texts=texts, vocab_size=320, model_prefix=str(tmp_path / "sp"))
  sp = spm.SentencePieceProcessor(model_file=path)
  tok = convert_hf.make_tokenizer(sp_model_path=path, vocab_size=320, max_len=128)
  for s in ("Ada  Lovelace was born in Zürich.", " London,\n entry 12 ", "x"):
    ids = sp.encode(s)
    assert tok(s).input_ids == ids, s
    assert tok.decode(ids) == sp.decode(ids), s
  assert tok.pad_token_id == 0 and tok.eos_token_id == 1
  tok.save_pretrained(str(tmp_path / "tok"))
  again = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
  assert again("Ada Lovelace").input_ids == sp.encode("Ada Lovelace")

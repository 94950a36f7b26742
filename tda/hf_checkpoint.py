"""Hugging Face Llama checkpoints as our model, params and seqio vocabulary.

Reads a `save_pretrained` folder of a `LlamaForCausalLM` (config.json,
`model.safetensors` or shards listed in `model.safetensors.index.json`, and a
tokenizer as `tokenizer.json` or SentencePiece `tokenizer.model`) without torch:
weights come through safetensors' numpy API (bf16 via ml_dtypes), the tokenizer
through the `tokenizers` / `sentencepiece` libraries.

The weight names and layouts are `tda.convert_hf.param_map`, the table the
export direction uses, read in reverse (torch's Linear weight [out, in] is
transposed into our Dense kernel (in, out)).

What maps exactly onto `tda.model` (`block='sequential'`,
`scale_embeddings=False`): Llama with SiLU SwiGLU, RMSNorm, default RoPE
(half-split), grouped-query attention, no biases, tied input/output embeddings
or (`tie_word_embeddings=false`, most Llama-2/3 checkpoints) a separate
`lm_head` (`tie_embeddings=False`). Everything else is refused with an error
naming the config field: `rope_scaling` / non-default `rope_parameters` (Llama
3.1+ 'llama3' scaling), attention or MLP biases, another activation, and other
model types (Gemma's GeGLU and (1 + weight) RMSNorm have no switch in our model).

In the pipeline (`model.checkpoint_format='hf_llama'`): `pipeline_model_config`
gives the model of the run from config.json, `describe_folder` identifies the
folder for the train stage's fingerprint, and `load_vocabulary` is the vocab
stage's vocabulary.

Token ids: the vocabulary gives exactly the ids `transformers.AutoTokenizer`
gives (BOS/EOS as the tokenizer's post-processor or `tokenizer_config.json`'s
`add_bos_token` / `add_eos_token` say; special-token strings in the text are
parsed as HF parses them). tda's pipeline, like seqio, pads with id 0 and treats
id 0 as padding (`tda.model.shift`), and appends `eos_id` where a feature has
`add_eos`. So `pad_id` is 0 here, and a text whose tokens include id 0 would
lose that token to the loss masks. `check_pipeline_vocabulary` therefore refuses
a tokenizer whose id 0 is a regular token (a BPE tokenizer.json such as Llama
3's, where it is '!') or is the BOS the tokenizer adds; one whose id 0 is a
special token it never adds (Llama SentencePiece: `<unk>`, produced only for
text byte fallback cannot cover) is accepted, and `HfVocabulary(strict_pad=True)`
(the pipeline's) raises, naming the text, if an encoding ever contains id 0.
`eos_id` and `unk_id` are the tokenizer's own (Llama: 2 and 0), not seqio's 1
and 2.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Sequence

import numpy as np
import seqio

from tda import convert_hf
from tda import fs
from tda import model as model_lib

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
    "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_MODEL_TYPES = ("llama",)


# ---------------------------------------------------------------------------
# Config.


def _read_json(path: str) -> dict[str, Any]:
  with open(path) as f:
    return json.load(f)


def _hf_config(config_json) -> dict[str, Any]:
  """config.json as a dict from a dict, a config.json path or its folder."""
  if isinstance(config_json, dict):
    return config_json
  path = os.fspath(config_json)
  if os.path.isdir(path):
    path = os.path.join(path, "config.json")
  return _read_json(path)


def _rope_theta(c: dict[str, Any]) -> float:
  """rope_theta from `rope_parameters` (transformers 5) or top level; refuses scaling."""
  scaling = c.get("rope_scaling")
  if scaling is not None and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
    raise ValueError(f"unsupported HF config: rope_scaling={scaling!r} (tda.model implements "
                     "the default RoPE only)")
  params = c.get("rope_parameters") or {}
  if any(isinstance(v, dict) for v in params.values()):
    raise ValueError(f"unsupported HF config: per-layer-type rope_parameters={params!r}")
  if params.get("rope_type", "default") != "default":
    raise ValueError(f"unsupported HF config: rope_parameters.rope_type="
                     f"{params['rope_type']!r} (tda.model implements the default RoPE only)")
  theta = params.get("rope_theta", c.get("rope_theta", 10_000.0))
  return float(theta)


def model_config_from_hf(config_json, *, max_len: int | None = None, dtype: str = "float32",
                         param_dtype: str = "float32") -> model_lib.ModelConfig:
  """Our `ModelConfig` for a HF Llama config.

  Args:
    config_json: config.json as a dict, its path, or the checkpoint folder.
    max_len: our `model.max_len` (default: the HF `max_position_embeddings`).
      Default RoPE does not depend on it; it bounds the sequences we run.
    dtype: our compute dtype.
    param_dtype: the dtype `load_params` casts the weights to.

  Returns:
    A `block='sequential'`, `scale_embeddings=False` config.

  Raises:
    ValueError: naming the config field, for anything tda.model cannot express.
  """
  c = _hf_config(config_json)
  model_type = c.get("model_type")
  if model_type not in _MODEL_TYPES:
    extra = (" (Gemma: GeGLU activation and (1 + weight) RMSNorm have no switch in tda.model)"
             if str(model_type).startswith("gemma") else "")
    raise ValueError(f"unsupported HF config: model_type={model_type!r}, expected one of "
                     f"{list(_MODEL_TYPES)}{extra}")
  for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "vocab_size"):
    if key not in c:
      raise ValueError(f"HF config has no {key!r}")
  problems = []
  act = c.get("hidden_act", "silu")
  if act not in ("silu", "swish"):
    problems.append(f"hidden_act={act!r} (tda.model's MLP is SiLU SwiGLU)")
  for key in ("attention_bias", "mlp_bias"):
    if c.get(key, False):
      problems.append(f"{key}=true (tda.model's projections have no bias)")
  if c.get("sliding_window") is not None:
    problems.append(f"sliding_window={c['sliding_window']} (tda.model attends to all positions)")
  if problems:
    raise ValueError("unsupported HF config: " + "; ".join(problems))
  theta = _rope_theta(c)
  d_model, n_heads = int(c["hidden_size"]), int(c["num_attention_heads"])
  head_dim = int(c.get("head_dim") or d_model // n_heads)
  n_kv = int(c.get("num_key_value_heads") or n_heads)
  if n_heads % n_kv:
    raise ValueError(f"unsupported HF config: num_attention_heads={n_heads} is not a multiple "
                     f"of num_key_value_heads={n_kv}")
  if head_dim % 2:
    raise ValueError(f"unsupported HF config: head_dim={head_dim} is odd (RoPE needs it even)")
  if max_len is None:
    max_len = int(c.get("max_position_embeddings", 2048))
  return model_lib.ModelConfig(
      vocab_size=int(c["vocab_size"]), d_model=d_model, n_layers=int(c["num_hidden_layers"]),
      n_heads=n_heads, head_dim=head_dim, n_kv_heads=n_kv, d_ff=int(c["intermediate_size"]),
      max_len=int(max_len), block="sequential", rope_base=theta,
      norm_eps=float(c.get("rms_norm_eps", 1e-6)), dtype=dtype, param_dtype=param_dtype,
      scale_embeddings=False,
      # LlamaConfig's default is untied (save_pretrained always writes the key).
      tie_embeddings=bool(c.get("tie_word_embeddings", False)))


def config_overrides(cfg: model_lib.ModelConfig) -> dict[str, Any]:
  """`tda.config` overrides (dotted keys) that give `cfg`'s model shape.

  E.g. `{"model.d_model": 64, ..., "data.vocab_size": 512}`; pass each as
  `--config.<key>=<value>`. `data.vocab_size` is set too (with
  `model.vocab_size`) so the pipeline's vocabulary-sized arrays agree.
  """
  out = {f"model.{k}": getattr(cfg, k) for k in (
      "block", "vocab_size", "d_model", "n_layers", "n_heads", "head_dim", "n_kv_heads",
      "d_ff", "max_len", "rope_base", "norm_eps", "scale_embeddings", "tie_embeddings",
      "dtype", "param_dtype")}
  out["data.vocab_size"] = cfg.vocab_size
  return out


# ---------------------------------------------------------------------------
# Weights.


def _safetensors_header(path: str) -> dict[str, Any]:
  with open(path, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(n))
  header.pop("__metadata__", None)
  return header


def _read_raw(path: str, name: str, header: dict[str, Any]) -> np.ndarray:
  """One tensor from the file's bytes (the fallback for dtypes numpy lacks)."""
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  info = header[name]
  dt = {"BF16": ml_dtypes.bfloat16, **_SAFETENSORS_DTYPES}.get(info["dtype"])
  if dt is None:
    raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
  begin, end = info["data_offsets"]
  with open(path, "rb") as f:
    base = 8 + int.from_bytes(f.read(8), "little")  # Data follow the JSON header.
    f.seek(base + begin)
    buf = f.read(end - begin)
  return np.frombuffer(buf, dtype=np.dtype(dt).newbyteorder("<")).reshape(info["shape"])


def _read_tensor(path: str, name: str, header: dict[str, Any]) -> np.ndarray:
  """One tensor through safetensors' numpy API; raw bytes + ml_dtypes if that fails
  (older safetensors cannot give bf16 as numpy)."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  try:
    with safe_open(path, framework="np") as f:
      return np.asarray(f.get_tensor(name))
  except Exception:  # pylint: disable=broad-except
    if header[name]["dtype"] in _SAFETENSORS_DTYPES:
      raise
    return _read_raw(path, name, header)


def _tensor_files(folder: str) -> dict[str, str]:
  """HF tensor name -> safetensors file holding it."""
  index = os.path.join(folder, "model.safetensors.index.json")
  if os.path.exists(index):
    weight_map = _read_json(index)["weight_map"]
    return {k: os.path.join(folder, v) for k, v in weight_map.items()}
  single = os.path.join(folder, "model.safetensors")
  if not os.path.exists(single):
    raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json "
                            "(only safetensors checkpoints are read; no pytorch_model.bin)")
  return {k: single for k in _safetensors_header(single)}


def _tensor_plan(folder: str, cfg: model_lib.ModelConfig | None):
  """(cfg, [(HF name, our path, transposed, file, header)]) after checking, without
  reading any tensor, that the folder holds exactly the tensors `cfg` needs, each
  of the right shape (see `load_params` for the errors)."""
  folder = os.fspath(folder)
  hf_cfg = _hf_config(folder)
  folder_cfg = model_config_from_hf(hf_cfg)  # Refuses unsupported features.
  cfg = cfg or folder_cfg
  convert_hf.check_convertible(cfg)
  differ = [f"{k}={getattr(cfg, k)!r} (checkpoint: {getattr(folder_cfg, k)!r})"
            for k in ("rope_base", "norm_eps", "tie_embeddings")
            if getattr(cfg, k) != getattr(folder_cfg, k)]
  if differ:
    raise ValueError(f"{folder}: cfg disagrees with config.json: " + "; ".join(differ))
  files = _tensor_files(folder)
  headers: dict[str, dict[str, Any]] = {}
  expected = model_lib.param_shapes(model_lib.Transformer(cfg), 2)
  table = convert_hf.param_map(cfg)
  known = {name for name, _, _ in table}
  # Tied: lm_head equals embed_tokens when saved at all.
  ignorable = {"lm_head.weight"} if cfg.tie_embeddings else set()
  extra = sorted(n for n in files if n not in known and n not in ignorable
                 and not n.endswith("rotary_emb.inv_freq"))
  if extra:
    raise ValueError(f"{folder}: tensors tda.model has no place for: {extra[:8]}"
                     f"{' ...' if len(extra) > 8 else ''}")
  plan = []
  for name, path, transposed in table:
    if name not in files:
      raise KeyError(f"{folder}: tensor {name!r} is missing from the checkpoint")
    file = files[name]
    if file not in headers:
      headers[file] = _safetensors_header(file)
    if name not in headers[file]:
      raise KeyError(f"{file}: tensor {name!r} is missing (the index lists it there)")
    want = tuple(model_lib.param_at(expected, path).shape)
    want_hf = want[::-1] if transposed else want
    got = tuple(headers[file][name]["shape"])
    if got != want_hf:
      raise ValueError(f"{file}: tensor {name!r} has shape {got}, expected {want_hf} "
                       f"(our {'/'.join(path)} is {want})")
    plan.append((name, path, transposed, file, headers[file]))
  return cfg, plan


def load_params(folder: str, cfg: model_lib.ModelConfig | None = None, *,
                shardings=None) -> dict[str, Any]:
  """Our Flax param tree from a HF Llama `save_pretrained` folder.

  Args:
    folder: holds config.json and the safetensors weights (one file or shards).
    cfg: our model config (default: `model_config_from_hf(folder)`); the
      weights are cast to `cfg.param_dtype`.
    shardings: optional tree of `jax.sharding.Sharding`s like the params
      (`tda.sharding.param_shardings`): each tensor is then read on the host,
      one at a time, and each device receives only its shard
      (`jax.make_array_from_callback`); never replicated on one device.

  Returns:
    {'embed': {'embedding': ...}, 'layer_i': {...}, 'final_norm': {...}} (and
    'lm_head' when untied) of numpy arrays, or of jax.Arrays with `shardings`:
    what `Transformer(cfg).apply({'params': params}, tokens)` takes.

  Raises:
    ValueError: unsupported config (see `model_config_from_hf`), a tensor with
      the wrong shape (naming it and both shapes), or a tensor our model has no
      place for (e.g. a bias).
    KeyError: a tensor the model needs is not in the checkpoint (naming it).
  """
  import jax  # pylint: disable=g-import-not-at-top
  cfg, plan = _tensor_plan(folder, cfg)
  out: dict[str, Any] = {}
  for name, path, transposed, file, header in plan:
    a = _read_tensor(file, name, header)
    a = np.ascontiguousarray((a.T if transposed else a).astype(np.dtype(cfg.param_dtype)))
    if shardings is not None:
      a = jax.make_array_from_callback(a.shape, model_lib.param_at(shardings, path),
                                       lambda index, a=a: a[index])
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = a
  return out


# ---------------------------------------------------------------------------
# The pipeline's view of a folder (`model.checkpoint_format='hf_llama'`).

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json")
FOLDER_LAYOUT = ("hf_llama: a Hugging Face save_pretrained folder of a LlamaForCausalLM "
                 "(config.json; model.safetensors or model.safetensors.index.json and its "
                 "shards; tokenizer.model or tokenizer.json, with tokenizer_config.json)")


def _checkpoint_folder(config) -> str:
  if fs.is_remote(config.model.checkpoint):
    raise ValueError(f"model.checkpoint={config.model.checkpoint!r}: a Hugging Face folder "
                     "(model.checkpoint_format='hf_llama') is read from a local disk; copy it "
                     "first (e.g. gcloud storage cp -r) and pass the local folder")
  folder = os.path.abspath(config.model.checkpoint)
  if not os.path.isfile(os.path.join(folder, "config.json")):
    raise FileNotFoundError(f"model.checkpoint={config.model.checkpoint!r} has no "
                            f"config.json; supported formats: {FOLDER_LAYOUT}")
  return folder


def pipeline_model_config(config) -> model_lib.ModelConfig:
  """The run's model for `model.checkpoint_format='hf_llama'`: the shape from the
  folder's config.json (model.block, d_model, ..., tie_embeddings: the config's
  values for these are not used), `max_len`, `dtype`, `param_dtype` and `remat`
  from `config.model`.

  Raises:
    FileNotFoundError: no config.json in `model.checkpoint`.
    ValueError: naming the field: an unsupported HF config; `model.vocab_size`
      set (> 0) and different from config.json's `vocab_size`; `data.seq_len` or
      `model.max_len` beyond config.json's `max_position_embeddings`.
  """
  m = config.model
  folder = _checkpoint_folder(config)
  c = _read_json(os.path.join(folder, "config.json"))
  try:
    cfg = model_config_from_hf(c, max_len=m.max_len, dtype=m.dtype, param_dtype=m.param_dtype)
  except ValueError as e:
    raise ValueError(f"{folder}/config.json: {e}") from e
  if m.vocab_size > 0 and m.vocab_size != cfg.vocab_size:
    raise ValueError(f"model.vocab_size={m.vocab_size} differs from vocab_size="
                     f"{cfg.vocab_size} in {folder}/config.json (leave it at -1)")
  max_pos = c.get("max_position_embeddings")
  for key, value in (("data.seq_len", config.data.seq_len), ("model.max_len", m.max_len)):
    if max_pos is not None and value > int(max_pos):
      raise ValueError(f"{key}={value} exceeds max_position_embeddings={max_pos} in "
                       f"{folder}/config.json")
  return dataclasses.replace(cfg, remat=m.remat)


def structure_hash(folder: str, cfg: model_lib.ModelConfig) -> str:
  """A short hash of the folder's tensors the model reads: names, shapes, dtypes and
  our paths (from the safetensors headers; no tensor is read)."""
  _, plan = _tensor_plan(folder, cfg)
  blob = json.dumps([[name, "/".join(path), header[name]["shape"], header[name]["dtype"]]
                     for name, path, _, _, header in plan]).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def _file_record(path: str) -> dict[str, int]:
  st = os.stat(path)
  return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def describe_folder(config) -> dict[str, Any]:
  """What identifies `model.checkpoint` (hf_llama) in the train stage's fingerprint,
  after checking every tensor against the run's model without reading any: path,
  format, the tensor structure hash, config.json's sha256, and the size and mtime
  of every weights file (a rewritten checkpoint is refused, never mixed)."""
  folder = _checkpoint_folder(config)
  cfg = model_lib.model_config(config)
  files = sorted(set(_tensor_files(folder).values()))
  index = os.path.join(folder, "model.safetensors.index.json")
  if os.path.exists(index):
    files.append(index)
  return {"path": folder, "step": 0, "format": "hf_llama",
          "structure_sha256": structure_hash(folder, cfg),
          "config_sha256": _file_sha256(os.path.join(folder, "config.json")),
          "files": {os.path.relpath(f, folder): _file_record(f) for f in files}}


def _file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def tokenizer_fingerprint(folder: str) -> dict[str, str]:
  """{file: sha256} of the folder's tokenizer files (those present)."""
  folder = os.path.abspath(folder)
  out = {n: _file_sha256(os.path.join(folder, n)) for n in TOKENIZER_FILES
         if os.path.exists(os.path.join(folder, n))}
  if not ({"tokenizer.json", "tokenizer.model"} & set(out)):
    raise FileNotFoundError(f"{folder}: no tokenizer.json or tokenizer.model; supported "
                            f"formats: {FOLDER_LAYOUT}")
  return out


# ---------------------------------------------------------------------------
# Tokenizer.


def _generate_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
  """BPE merges of a SentencePiece BPE vocab, ordered as transformers orders them
  (`transformers.tokenization_utils_base.generate_merges` without scores)."""
  merges = []
  for merged, piece_id in vocab.items():
    local = [(merged[:i], merged[i:], piece_id) for i in range(1, len(merged))
             if merged[:i] in vocab and merged[i:] in vocab]
    merges += sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]]))
  merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])))
  return [(l, r) for l, r, _ in merges]


def _tokenizer_from_sentencepiece(path: str, tok_config: dict[str, Any]):
  """The `tokenizers.Tokenizer` transformers' LlamaTokenizer builds from a
  SentencePiece BPE `tokenizer.model` (byte fallback, Metaspace with the
  non-legacy 'first' prepend scheme, control pieces as special tokens)."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, pre_tokenizers  # pylint: disable=g-import-not-at-top
  proto = sentencepiece_model_pb2.ModelProto()
  with open(path, "rb") as f:
    proto.ParseFromString(f.read())
  spec = sentencepiece_model_pb2.TrainerSpec
  if proto.trainer_spec.model_type != spec.BPE:
    raise ValueError(f"{path}: SentencePiece model_type is "
                     f"{spec.ModelType.Name(proto.trainer_spec.model_type)}; Llama's "
                     "tokenizer.model is BPE (for another kind, pass a tokenizer.json)")
  vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(
      vocab=vocab, merges=_generate_merges(vocab), fuse_unk=True, byte_fallback=True,
      unk_token=proto.pieces[proto.trainer_spec.unk_id].piece))
  legacy = tok_config.get("legacy", False)
  add_prefix_space = tok_config.get("add_prefix_space")
  add_prefix_space = True if add_prefix_space is None else add_prefix_space
  scheme = ("always" if legacy else "first") if add_prefix_space else "never"
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=scheme,
                                               split=False)
  dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
  if add_prefix_space:
    dec.append(decoders.Strip(content=" ", left=1))
  tok.decoder = decoders.Sequence(dec)
  # SentencePiece control (type 3) and unknown (2) pieces are special; user-defined (4) not.
  specials = [tokenizers.AddedToken(p.piece, special=True, normalized=False)
              for p in proto.pieces if p.type in (2, 3)]
  users = [tokenizers.AddedToken(p.piece, special=False, normalized=False)
           for p in proto.pieces if p.type == 4]
  tok.add_special_tokens(specials)
  if users:
    tok.add_tokens(users)
  _set_bos_eos(tok, tok_config, default_bos=False, default_eos=False, force=True)
  return tok


def _token_str(value) -> str | None:
  if isinstance(value, dict):
    return value.get("content")
  return value


def _set_bos_eos(tok, tok_config: dict[str, Any], *, default_bos: bool, default_eos: bool,
                 force: bool) -> None:
  """transformers' `update_post_processor`: BOS/EOS templates from tokenizer_config.

  Applied when `force` (no post-processor of its own) or when tokenizer_config
  sets `add_bos_token` / `add_eos_token` explicitly, as transformers does."""
  from tokenizers import processors  # pylint: disable=g-import-not-at-top
  explicit = "add_bos_token" in tok_config or "add_eos_token" in tok_config
  if not (force or explicit or tok.post_processor is None):
    return
  bos, eos = _token_str(tok_config.get("bos_token")), _token_str(tok_config.get("eos_token"))
  add_bos = bool(tok_config.get("add_bos_token", default_bos)) and bos is not None
  add_eos = bool(tok_config.get("add_eos_token", default_eos)) and eos is not None
  single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
  pair = (f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1"
          f"{(' ' + eos + ':1') if add_eos else ''}")
  special = ([(bos, tok.token_to_id(bos))] if add_bos else []) + (
      [(eos, tok.token_to_id(eos))] if add_eos else [])
  tok.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                     special_tokens=special)


def load_tokenizer(folder: str):
  """The checkpoint's tokenizer as a `tokenizers.Tokenizer` giving HF's ids.

  `tokenizer.json` is preferred (what `AutoTokenizer` loads); otherwise a
  SentencePiece BPE `tokenizer.model` is converted as transformers converts it.
  """
  import tokenizers  # pylint: disable=g-import-not-at-top
  folder = os.fspath(folder)
  cfg_path = os.path.join(folder, "tokenizer_config.json")
  tok_config = _read_json(cfg_path) if os.path.exists(cfg_path) else {}
  json_path, sp_path = (os.path.join(folder, n) for n in ("tokenizer.json", "tokenizer.model"))
  if os.path.exists(json_path):
    tok = tokenizers.Tokenizer.from_file(json_path)
    _set_bos_eos(tok, tok_config, default_bos=False, default_eos=False, force=False)
    return tok
  if os.path.exists(sp_path):
    return _tokenizer_from_sentencepiece(sp_path, tok_config)
  raise FileNotFoundError(f"{folder}: no tokenizer.json or tokenizer.model")


class HfVocabulary(seqio.Vocabulary):
  """A seqio vocabulary around a HF checkpoint's tokenizer (same ids as HF).

  `encode(s)` is `AutoTokenizer(s, add_special_tokens=...).input_ids`;
  `pad_id` is 0 (seqio's and tda's padding id: see the module docstring for
  what that means for the HF token with id 0); `eos_id` / `unk_id` are the
  tokenizer's. The TF ops (`encode_tf` / `decode_tf`, what seqio's
  `tokenize` preprocessor calls) run the Python tokenizer through
  `tf.numpy_function`, so a tf.data pipeline using them is not serialisable.
  """

  def __init__(self, folder: str, *, add_special_tokens: bool = True,
               strict_pad: bool = False):
    """Args: folder: the checkpoint folder; add_special_tokens: add BOS/EOS as
    the tokenizer's post-processor says (HF's default) or not; strict_pad: an
    encoding containing id 0 (the pipeline's padding) is an error naming the text."""
    super().__init__(extra_ids=0)
    self._folder = os.fspath(folder)
    self._tok = load_tokenizer(self._folder)
    self._add_special = add_special_tokens
    self._strict_pad = strict_pad
    cfg_path = os.path.join(self._folder, "tokenizer_config.json")
    tok_config = _read_json(cfg_path) if os.path.exists(cfg_path) else {}
    self._eos = self._special_id(tok_config, "eos_token")
    self._bos = self._special_id(tok_config, "bos_token")
    self._unk = self._special_id(tok_config, "unk_token")

  def _special_id(self, tok_config, key) -> int | None:
    s = _token_str(tok_config.get(key))
    if s is None:
      defaults = {"eos_token": "</s>", "bos_token": "<s>", "unk_token": "<unk>"}
      s = defaults[key]
    return self._tok.token_to_id(s)

  @property
  def tokenizer(self):
    """The underlying `tokenizers.Tokenizer`."""
    return self._tok

  @property
  def bos_id(self) -> int | None:
    return self._bos

  @property
  def eos_id(self) -> int | None:
    return self._eos

  @property
  def unk_id(self) -> int | None:
    return self._unk

  @property
  def _base_vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def _encode(self, s: str) -> Sequence[int]:
    ids = self._tok.encode(s, add_special_tokens=self._add_special).ids
    if self._strict_pad and 0 in ids:
      raise ValueError(f"{self._folder}: the tokens of {s[:80]!r} include id 0 "
                       f"({self._tok.id_to_token(0)!r}), which the pipeline treats as "
                       "padding; remove or replace what produces it")
    return ids

  def _decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def _encode_tf(self, s):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    def enc(b):
      b = b.item() if isinstance(b, np.ndarray) else b
      return np.asarray(self._encode(b.decode("utf-8")), np.int32)
    out = tf.numpy_function(enc, [s], tf.int32, stateful=False)
    return tf.ensure_shape(out, [None])

  def _decode_tf(self, ids):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    def dec(a):
      a = np.asarray(a)
      if a.ndim == 1:
        return np.asarray(self._decode(a[a != self.pad_id]).encode("utf-8"), object)
      return np.asarray([self._decode(r[r != self.pad_id]).encode("utf-8") for r in a], object)
    return tf.numpy_function(dec, [ids], tf.string, stateful=False)

  def __eq__(self, other) -> bool:
    return (isinstance(other, HfVocabulary) and self._folder == other._folder
            and self._add_special == other._add_special
            and self._strict_pad == other._strict_pad)

  def __hash__(self) -> int:
    return hash((self._folder, self._add_special, self._strict_pad))


def load_vocabulary(folder: str, *, add_special_tokens: bool = True,
                    strict_pad: bool = False) -> HfVocabulary:
  """The checkpoint's tokenizer as a seqio vocabulary (`HfVocabulary`)."""
  return HfVocabulary(folder, add_special_tokens=add_special_tokens, strict_pad=strict_pad)


def check_pipeline_vocabulary(folder: str, *, model_vocab_size: int | None = None) -> int:
  """Checks the folder's tokenizer fits tda's pipeline; returns its size.

  The pipeline pads with id 0 and appends EOS itself (module docstring).

  Raises:
    ValueError: id 0 is a regular (not special) token, or the BOS the tokenizer
      adds to every text; the tokenizer has no EOS or appends it itself; it has
      more ids than the model's `model_vocab_size`.
  """
  vocab = HfVocabulary(folder)
  tok = vocab.tokenizer
  piece0 = tok.id_to_token(0)
  special0 = getattr(tok.get_added_tokens_decoder().get(0), "special", False)
  if not special0:
    raise ValueError(f"{folder}: token id 0 is the regular token {piece0!r}, but tda's "
                     "pipeline pads with id 0 and would mask it out of every loss; "
                     "tokenizers with a regular token at id 0 (e.g. Llama 3's) are not "
                     "supported")
  ids = vocab.encode("a")
  if ids and ids[0] == 0:
    raise ValueError(f"{folder}: the tokenizer adds {piece0!r} (id 0) to every text, but "
                     "tda's pipeline pads with id 0; not supported")
  if vocab.eos_id is None:
    raise ValueError(f"{folder}: the tokenizer has no EOS token (tokenizer_config.json "
                     "'eos_token'); the pipeline ends every passage with it")
  if ids and ids[-1] == vocab.eos_id:
    raise ValueError(f"{folder}: the tokenizer appends EOS itself (add_eos_token); the "
                     "pipeline appends it to passages: set add_eos_token to false in "
                     "tokenizer_config.json")
  if model_vocab_size is not None and vocab.vocab_size > model_vocab_size:
    raise ValueError(f"{folder}: the tokenizer has {vocab.vocab_size} ids, more than the "
                     f"model's vocab_size={model_vocab_size}")
  return vocab.vocab_size


def load(folder: str, *, max_len: int | None = None, param_dtype: str = "float32"):
  """(cfg, params) of a HF Llama folder: `model_config_from_hf` + `load_params`."""
  cfg = model_config_from_hf(folder, max_len=max_len, param_dtype=param_dtype)
  return cfg, load_params(folder, cfg)

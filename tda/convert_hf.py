"""Our Llama-style model and Adafactor state as Hugging Face objects (for bergson).

bergson (EleutherAI's PyTorch TrackStar pipeline) reads a `save_pretrained`
causal LM plus a tokenizer, and the optimizer's second moments as a PyTorch
`optimizer.pt` in transformers' Adafactor layout. This module maps our
`block='sequential'`, `scale_embeddings=False` Transformer onto
`LlamaForCausalLM` (tied embeddings, or an `lm_head` when `tie_embeddings=False`)
and our optax Adafactor state onto that layout, so both pipelines see the same model and the same V.

Weights: a Dense kernel is stored (in, out); torch's Linear weight is
[out, in], so kernels are transposed. Embedding, RMSNorm scales and RoPE
(half-split / rotate_half, inv_freq = base^(-2i/head_dim)) carry over as they
are; query heads map to KV heads the same way (head h uses KV head
h // (n_heads / n_kv_heads)).

Second moments (DESIGN.md §2): optax factors a parameter along its two largest
axes (`tda.correction.factored_axes`: d1 = second largest, d0 = largest; ties keep
axis order): `v_row` is the mean over d0, indexed by d1, and V = v_row v_colᵀ /
mean(v_row). transformers (and bergson's AdafactorNormalizer) use the torch
weight's axes: `exp_avg_sq_row` indexed by axis 0 (the mean over the last
axis), `exp_avg_sq_col` by axis 1, V = row colᵀ / mean(row). When optax's d1 is
torch's axis 0 the vectors carry over; otherwise they swap, and the new column
is rescaled by mean(v_col) / mean(v_row) so that V is unchanged (V is the only
thing either side uses; the split of scale between the factors is not kept).
Parameters optax left unfactored (vectors, and matrices under
`min_dim_size_to_factor`) keep their full V as `exp_avg_sq`; bergson reads a
2-D `exp_avg_sq` as Adam-style (eps outside the sqrt), so for an exact match
size the model so every dense matrix is factored.

torch and transformers are imported inside the functions that need them only
(the `.[bench]` extra), never at module import.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from tda import correction as corr_lib
from tda import model as model_lib

_ATTN = (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "o_proj"))
_MLP = (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj"))

# SentencePiece pieces of our ids 0/1/2 (tda.data: PAD, EOS, UNK; no BOS).
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


def check_convertible(cfg: model_lib.ModelConfig) -> None:
  """Raises ValueError if `cfg` has no exact LlamaForCausalLM equivalent."""
  problems = []
  if cfg.block != "sequential":
    problems.append(f"model.block={cfg.block!r} (Llama needs 'sequential')")
  if cfg.scale_embeddings:
    problems.append("model.scale_embeddings=True (Llama looks embeddings up unscaled)")
  if cfg.head_dim % 2:
    problems.append(f"model.head_dim={cfg.head_dim} is odd (RoPE needs it even)")
  if problems:
    raise ValueError("cannot convert to LlamaForCausalLM: " + "; ".join(problems))


def param_map(cfg: model_lib.ModelConfig) -> list[tuple[str, tuple[str, ...], bool]]:
  """(HF parameter name, our params path, transposed) in LlamaForCausalLM's
  `named_parameters()` order (`lm_head.weight` last, untied models only).

  The one name/layout table of both directions: export here, import in
  `tda.hf_checkpoint.load_params` (which reads it in reverse)."""
  out = [("model.embed_tokens.weight", ("embed", "embedding"), False)]
  for i in range(cfg.n_layers):
    pre, ours = f"model.layers.{i}.", f"layer_{i}"
    out += [(f"{pre}self_attn.{hf}.weight", (ours, "attn", n, "kernel"), True)
            for n, hf in _ATTN]
    out += [(f"{pre}mlp.{hf}.weight", (ours, "mlp", n, "kernel"), True) for n, hf in _MLP]
    out += [(f"{pre}input_layernorm.weight", (ours, "attn_norm", "scale"), False),
            (f"{pre}post_attention_layernorm.weight", (ours, "mlp_norm", "scale"), False)]
  out.append(("model.norm.weight", ("final_norm", "scale"), False))
  if not cfg.tie_embeddings:
    out.append(("lm_head.weight", ("lm_head", "kernel"), True))
  return out


def hf_module_name(path: tuple[str, ...]) -> str:
  """bergson's module name (relative to `model.base_model`) of a dense kernel path,
  e.g. ('layer_0', 'attn', 'q', 'kernel') -> 'layers.0.self_attn.q_proj'."""
  names = dict(_ATTN + _MLP)
  if (len(path) != 4 or not path[0].startswith("layer_") or path[-1] != "kernel"
      or path[2] not in names):
    raise ValueError(f"{'/'.join(path)} is not a dense kernel of a layer")
  group = "self_attn" if path[1] == "attn" else "mlp"
  return f"layers.{int(path[0][len('layer_'):])}.{group}.{names[path[2]]}"


def to_hf_state_dict(*, params, cfg: model_lib.ModelConfig) -> dict[str, np.ndarray]:
  """Our params as LlamaForCausalLM's state dict (float32 numpy, torch layout)."""
  check_convertible(cfg)
  out = {}
  for name, path, transposed in param_map(cfg):
    a = np.asarray(model_lib.param_at(params, path), np.float32)
    out[name] = np.ascontiguousarray(a.T if transposed else a)
  return out


def llama_config(*, cfg: model_lib.ModelConfig, max_position_embeddings: int | None = None):
  """The equivalent `transformers.LlamaConfig`.

  Args:
    cfg: our model shape (sequential block, unscaled embeddings).
    max_position_embeddings: the HF model's declared context (default
      `cfg.max_len`). Llama's default RoPE does not depend on it, so a larger
      value changes no logit; bergson caps `--token_batch_size` (tokens per
      batch) at it, so the bench declares more to let bergson batch documents.
  """
  import transformers  # pylint: disable=g-import-not-at-top
  check_convertible(cfg)
  return transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
      intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers,
      num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
      head_dim=cfg.head_dim, hidden_act="silu",
      max_position_embeddings=max_position_embeddings or cfg.max_len,
      rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_base,
      rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base},
      attention_bias=False, mlp_bias=False, tie_word_embeddings=cfg.tie_embeddings,
      pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=None,
      torch_dtype="float32")


def to_hf_model(*, params, cfg: model_lib.ModelConfig,
                max_position_embeddings: int | None = None):
  """A `LlamaForCausalLM` (float32, eval mode) holding our weights."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  hf_cfg = llama_config(cfg=cfg, max_position_embeddings=max_position_embeddings)
  model = transformers.LlamaForCausalLM(hf_cfg).to(torch.float32).eval()
  names = [n for n, _ in model.named_parameters()]
  want = [n for n, _, _ in param_map(cfg)]
  if names != want:
    raise RuntimeError(f"LlamaForCausalLM's parameters differ from the expected map: "
                       f"{sorted(set(names) ^ set(want))[:6]} (transformers "
                       f"{transformers.__version__})")
  sd = {k: torch.from_numpy(np.array(v)) for k, v in to_hf_state_dict(params=params, cfg=cfg).items()}
  missing, unexpected = model.load_state_dict(sd, strict=False)
  if cfg.tie_embeddings:
    missing = [m for m in missing if m != "lm_head.weight"]  # Tied to embed_tokens.
  if missing or unexpected:
    raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
  if cfg.tie_embeddings:
    model.tie_weights()
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
      raise RuntimeError("lm_head is not tied to embed_tokens after loading")
  return model


def _torch_axis0_is_d1(shape, transposed: bool) -> bool:
  d1, _ = corr_lib.factored_axes(shape)  # Same choice as optax.
  return d1 == (1 if transposed else 0)


def adafactor_moments_to_hf(*, opt_state, cfg: model_lib.ModelConfig) -> dict[str, dict[str, np.ndarray]]:
  """Per HF parameter name: {'exp_avg_sq_row', 'exp_avg_sq_col'} or {'exp_avg_sq'}.

  Args:
    opt_state: our optax state holding an Adafactor `FactoredState`.
    cfg: the model shape.

  Returns:
    float32 numpy arrays in torch layout, V preserved exactly (module docstring).
  """
  kind, fs = corr_lib.second_moments(opt_state)
  if kind != "adafactor":
    raise ValueError(f"the optimizer state is {kind}'s; transformers' Adafactor layout "
                     "needs an Adafactor (factored) state")
  out = {}
  for name, path, transposed in param_map(cfg):
    v = np.asarray(model_lib.param_at(fs.v, path), np.float32)
    p_shape = _param_shape(cfg, path)
    if v.shape == p_shape:  # optax kept the full V (a vector, or a small matrix).
      out[name] = {"exp_avg_sq": np.ascontiguousarray(v.T if transposed else v)}
      continue
    v_row = np.asarray(model_lib.param_at(fs.v_row, path), np.float32)
    v_col = np.asarray(model_lib.param_at(fs.v_col, path), np.float32)
    if _torch_axis0_is_d1(p_shape, transposed):
      row, col = v_row, v_col
    else:
      row, col = v_col, v_row * (np.mean(v_col, dtype=np.float64) /
                                 np.mean(v_row, dtype=np.float64))
    out[name] = {"exp_avg_sq_row": np.ascontiguousarray(row, np.float32),
                 "exp_avg_sq_col": np.ascontiguousarray(col, np.float32)}
  return out


def adafactor_moments_from_hf(*, moments: dict[str, dict[str, Any]],
                              cfg: model_lib.ModelConfig) -> dict[tuple[str, ...], dict[str, np.ndarray]]:
  """Inverse of `adafactor_moments_to_hf`: per our params path, {'v_row', 'v_col'}
  (optax's axes) or {'v'} (full, our layout). V is preserved, not the factor scale."""
  out = {}
  for name, path, transposed in param_map(cfg):
    m = {k: np.asarray(v, np.float32) for k, v in moments[name].items()}
    if "exp_avg_sq" in m:
      full = m["exp_avg_sq"]
      out[path] = {"v": full.T if transposed and full.ndim == 2 else full}
      continue
    row, col = m["exp_avg_sq_row"], m["exp_avg_sq_col"]
    if _torch_axis0_is_d1(_param_shape(cfg, path), transposed):
      out[path] = {"v_row": row, "v_col": col}
    else:
      out[path] = {"v_row": col, "v_col": row * np.float32(np.mean(col, dtype=np.float64) /
                                                           np.mean(row, dtype=np.float64))}
  return out


def factored_v(*, v_row: np.ndarray, v_col: np.ndarray, shape) -> np.ndarray:
  """The full V an optax factored state stands for, in `shape` (our layout)."""
  d1, _ = corr_lib.factored_axes(shape)
  r = np.asarray(v_row, np.float64)
  c = np.asarray(v_col, np.float64)
  v = np.outer(r, c) / np.mean(r)  # [size(d1), size(d0)]
  return (v if d1 == 0 else v.T).astype(np.float32)


def _param_shape(cfg: model_lib.ModelConfig, path: tuple[str, ...]) -> tuple[int, ...]:
  if path[0] == "embed":
    return (cfg.vocab_size, cfg.d_model)
  if path[0] == "lm_head":
    return (cfg.d_model, cfg.vocab_size)
  if path[-1] == "scale":
    return (cfg.d_model,)
  q_out, kv_out = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
  return {"q": (cfg.d_model, q_out), "k": (cfg.d_model, kv_out), "v": (cfg.d_model, kv_out),
          "o": (q_out, cfg.d_model), "gate": (cfg.d_model, cfg.d_ff),
          "up": (cfg.d_model, cfg.d_ff), "down": (cfg.d_ff, cfg.d_model)}[path[-2]]


def hf_optimizer_state_dict(*, moments: dict[str, dict[str, np.ndarray]],
                            cfg: model_lib.ModelConfig, step: int,
                            decay_rate: float = 0.8, learning_rate: float = 0.0) -> dict[str, Any]:
  """transformers.Adafactor's `state_dict()` (one param group, indices in
  `named_parameters()` order), what bergson's `--optimizer_state` loads.

  `learning_rate` (our schedule's last value) is recorded for transformers'
  `load_state_dict`; bergson reads only the second moments."""
  import torch  # pylint: disable=g-import-not-at-top
  state = {}
  for idx, (name, _, _) in enumerate(param_map(cfg)):
    entry = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in moments[name].items()}
    state[idx] = {"step": int(step), "RMS": 0.0, **entry}
  group = {"lr": float(learning_rate), "eps": (1e-30, 1e-3), "clip_threshold": 1.0,
           "decay_rate": -float(decay_rate), "beta1": None, "weight_decay": 0.0,
           "scale_parameter": False, "relative_step": False, "warmup_init": False,
           "params": list(range(len(state)))}
  return {"state": state, "param_groups": [group]}


def make_tokenizer(*, sp_model_path: str | None, vocab_size: int, max_len: int):
  """A transformers fast tokenizer with our ids (bergson always loads one).

  With our SentencePiece (unigram) model: its pieces and scores in a
  `tokenizers` Unigram model with SentencePiece's dummy prefix, whitespace
  pieces and byte fallback, so `encode` and `decode` give sp's ids and text
  (transformers' LlamaTokenizer assumes a BPE model and does not). Without one:
  a word-level stand-in whose tokens are `t<id>` (inputs then go in
  pre-tokenised). No BOS/EOS is added.
  """
  import tokenizers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, normalizers, pre_tokenizers  # pylint: disable=g-import-not-at-top
  specials = {PAD_ID: "<pad>", EOS_ID: "</s>", UNK_ID: "<unk>"}
  if sp_model_path is not None:
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    sp = spm.SentencePieceProcessor(model_file=sp_model_path)
    if sp.get_piece_size() > vocab_size:
      raise ValueError(f"{sp_model_path} has {sp.get_piece_size()} pieces, more than the "
                       f"model's vocab_size={vocab_size}")
    for i, piece in specials.items():
      if sp.id_to_piece(i) != piece:
        raise ValueError(f"{sp_model_path}: id {i} is {sp.id_to_piece(i)!r}, expected {piece!r} "
                         "(tda.data's PAD/EOS/UNK convention)")
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = tokenizers.Tokenizer(tokenizers.models.Unigram(pieces, unk_id=UNK_ID,
                                                         byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                           normalizers.Replace(" ", "\u2581")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581",
                                                 prepend_scheme="never", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(content=" ", left=1)])
  else:
    vocab = {specials.get(i, f"t{i}"): i for i in range(max(vocab_size, 3))}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
      model_max_length=max_len)


def save_hf(*, params, opt_state, cfg: model_lib.ModelConfig, out_dir: str, step: int,
            sp_model_path: str | None = None, max_position_embeddings: int | None = None,
            decay_rate: float = 0.8, learning_rate: float = 0.0) -> str:
  """Writes `out_dir` = save_pretrained model + tokenizer + `optimizer.pt`.

  Args:
    params, opt_state: our trained parameters and optax Adafactor state.
    cfg: the model shape.
    out_dir: target folder (created).
    step: optimizer steps taken (transformers' per-parameter `step`).
    sp_model_path: our SentencePiece model (None: a word-level stand-in).
    max_position_embeddings: see `llama_config`.
    decay_rate: our `train.adafactor_decay_rate` (recorded in the param group).
    learning_rate: our schedule's last learning rate (recorded likewise).

  Returns:
    `out_dir`; pass it as bergson's `--model` and `--optimizer_state`.
  """
  import torch  # pylint: disable=g-import-not-at-top
  model = to_hf_model(params=params, cfg=cfg, max_position_embeddings=max_position_embeddings)
  os.makedirs(out_dir, exist_ok=True)
  model.save_pretrained(out_dir)
  tok = make_tokenizer(sp_model_path=sp_model_path, vocab_size=cfg.vocab_size,
                       max_len=max_position_embeddings or cfg.max_len)
  tok.save_pretrained(out_dir)
  moments = adafactor_moments_to_hf(opt_state=opt_state, cfg=cfg)
  torch.save(hf_optimizer_state_dict(moments=moments, cfg=cfg, step=step,
                                     decay_rate=decay_rate, learning_rate=learning_rate),
             os.path.join(out_dir, "optimizer.pt"))
  return out_dir


def max_logit_diff(*, model: model_lib.Transformer, params, hf_model, tokens_bt) -> float:
  """max |our logits − HF logits| over `tokens_bt` (right-padded with 0; only
  positions before each row's padding are compared)."""
  import torch  # pylint: disable=g-import-not-at-top
  tokens_bt = np.asarray(tokens_bt, np.int32)
  ours = np.asarray(model.apply({"params": params}, tokens_bt))
  with torch.no_grad():
    theirs = hf_model(torch.from_numpy(tokens_bt.astype(np.int64))).logits.float().numpy()
  valid = np.cumsum(tokens_bt[:, ::-1] != 0, axis=1)[:, ::-1] > 0  # Up to the last real token.
  return float(np.max(np.abs(ours - theirs)[valid]))

"""Decoder-only LM in the paper's family (PaLM), with a Llama-style option.

PaLM block (default): one RMSNorm feeding attention and MLP in parallel,
`x + attn(norm(x)) + mlp(norm(x))`; multi-query attention (one shared K/V head),
SwiGLU MLP, RoPE, no biases, tied input/output embeddings. `block='sequential'`
gives the Llama ordering `x + attn(norm1(x))`, then `+ mlp(norm2(·))`.
`tie_embeddings=False` gives a separate output head `lm_head` (a Dense
d_model → vocab, as most Llama checkpoints have) instead of the tied table.

Gradient taps (DESIGN.md §2, the factored kernel): every weight is reachable as an
(input, output-gradient) pair. Each `Dense` sows its input under
`intermediates/<path>/in` and adds a zero perturbation `perturbations/<path>/out`
to its output; the gradient of the loss w.r.t. that perturbation is the output
gradient δ. RMSNorm taps its normalised input and output the same way; the tied
embedding taps both its uses: the lookup (`lookup_out`, with token ids as the
one-hot input) and the logits (`logits_in`, `logits_out`); an untied embedding
taps the lookup only, and its head is a tapped `Dense`. Applying the model
without those collections costs nothing extra.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static model shape; built from `config.model` by `model_config()`."""
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  head_dim: int
  n_kv_heads: int
  d_ff: int
  max_len: int
  block: str = "parallel"
  rope_base: float = 10_000.0
  norm_eps: float = 1e-6
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False
  scale_embeddings: bool = True
  tie_embeddings: bool = True


# Fields added after checkpoints and workdirs were first recorded, with the value
# that earlier records implied: `config_record` leaves them out at that value, so
# those records (a checkpoint's meta, a committed fingerprint) stay valid.
_RECORD_DEFAULTS = {"tie_embeddings": True}


def config_record(cfg: ModelConfig) -> dict[str, Any]:
  """`cfg` as the dict recorded in checkpoint metas and fingerprints."""
  d = dataclasses.asdict(cfg)
  for k, v in _RECORD_DEFAULTS.items():
    if d[k] == v:
      del d[k]
  return d


def from_record(record: dict[str, Any]) -> dict[str, Any]:
  """A recorded model dict with the fields `config_record` left out restored."""
  return {**_RECORD_DEFAULTS, **record}


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  """The model of the run: `config.model`, or, for a Hugging Face checkpoint
  (`model.checkpoint_format='hf_llama'`), its config.json (`tda.hf_checkpoint`)."""
  m = config.model
  if m.get("checkpoint") and m.get("checkpoint_format") == "hf_llama":
    from tda import hf_checkpoint  # pylint: disable=g-import-not-at-top
    return hf_checkpoint.pipeline_model_config(config)
  vocab = m.vocab_size if m.vocab_size > 0 else config.data.vocab_size
  if m.block not in ("parallel", "sequential"):
    raise ValueError(f"model.block must be 'parallel' or 'sequential', got {m.block!r}")
  if m.n_heads % m.n_kv_heads:
    raise ValueError(f"model.n_heads={m.n_heads} is not a multiple of "
                     f"model.n_kv_heads={m.n_kv_heads}")
  return ModelConfig(vocab_size=vocab, d_model=m.d_model, n_layers=m.n_layers,
                     n_heads=m.n_heads, head_dim=m.head_dim, n_kv_heads=m.n_kv_heads,
                     d_ff=m.d_ff, max_len=m.max_len, block=m.block,
                     rope_base=m.rope_base, norm_eps=m.norm_eps, dtype=m.dtype,
                     param_dtype=m.param_dtype, remat=m.remat,
                     scale_embeddings=m.scale_embeddings, tie_embeddings=m.tie_embeddings)


def _dt(name: str):
  return jnp.dtype(name)


class Dense(nn.Module):
  """Bias-free dense layer `y = x @ kernel`, kernel (in, out), with gradient taps."""
  features: int
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n_in = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.normal(stddev=n_in ** -0.5),
                        (n_in, self.features), _dt(self.param_dtype))
    self.sow("intermediates", "in", x)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    return self.perturb("out", y)


class RMSNorm(nn.Module):
  """RMSNorm with a learned scale, tapped like a diagonal layer."""
  eps: float = 1e-6
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],),
                       _dt(self.param_dtype))
    x32 = x.astype(jnp.float32)
    xhat = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    xhat = xhat.astype(self.dtype)
    self.sow("intermediates", "in", xhat)
    return self.perturb("out", xhat * scale.astype(self.dtype))


class Embedder(nn.Module):
  """Tied embedding: `encode` looks tokens up, `decode` gives logits."""
  vocab_size: int
  d_model: int
  dtype: str = "float32"
  param_dtype: str = "float32"
  scale: bool = True

  def setup(self):
    self.embedding = self.param(
        "embedding", nn.initializers.normal(stddev=self.d_model ** -0.5),
        (self.vocab_size, self.d_model), _dt(self.param_dtype))

  def encode(self, tokens_bt: Array) -> Array:
    x = jnp.take(self.embedding, tokens_bt, axis=0).astype(self.dtype)
    x = self.perturb("lookup_out", x)  # δ here is the gradient w.r.t. the looked-up rows.
    return x * jnp.asarray(self.d_model ** 0.5, self.dtype) if self.scale else x

  def decode(self, h_btd: Array) -> Array:
    self.sow("intermediates", "logits_in", h_btd)
    logits = jnp.dot(h_btd, self.embedding.astype(self.dtype).T)
    return self.perturb("logits_out", logits)


def rope(x_bthd: Array, positions_t: Array, base: float) -> Array:
  """Rotary position embedding over the last axis (half-split convention)."""
  half = x_bthd.shape[-1] // 2
  freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  ang_tf = positions_t[:, None].astype(jnp.float32) * freqs[None, :]
  sin, cos = jnp.sin(ang_tf)[None, :, None, :], jnp.cos(ang_tf)[None, :, None, :]
  x1, x2 = x_bthd[..., :half].astype(jnp.float32), x_bthd[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_bthd.dtype)


class Attention(nn.Module):
  """Causal multi-query (or grouped-query) attention with RoPE."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, h_btd: Array) -> Array:
    c = self.cfg
    b, t, _ = h_btd.shape
    dense = lambda f, name: Dense(f, c.dtype, c.param_dtype, name=name)
    q = dense(c.n_heads * c.head_dim, "q")(h_btd).reshape(b, t, c.n_heads, c.head_dim)
    k = dense(c.n_kv_heads * c.head_dim, "k")(h_btd).reshape(b, t, c.n_kv_heads, c.head_dim)
    v = dense(c.n_kv_heads * c.head_dim, "v")(h_btd).reshape(b, t, c.n_kv_heads, c.head_dim)
    pos = jnp.arange(t)
    q, k = rope(q, pos, c.rope_base), rope(k, pos, c.rope_base)
    g = c.n_heads // c.n_kv_heads
    q = q.reshape(b, t, c.n_kv_heads, g, c.head_dim)
    logits = jnp.einsum("bqkgh,bskh->bkgqs", q, k).astype(jnp.float32)
    logits = logits * (c.head_dim ** -0.5)
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(c.dtype)
    out = jnp.einsum("bkgqs,bskh->bqkgh", probs, v).reshape(b, t, c.n_heads * c.head_dim)
    return dense(c.d_model, "o")(out)


class Mlp(nn.Module):
  """SwiGLU MLP."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, h_btd: Array) -> Array:
    c = self.cfg
    gate = Dense(c.d_ff, c.dtype, c.param_dtype, name="gate")(h_btd)
    up = Dense(c.d_ff, c.dtype, c.param_dtype, name="up")(h_btd)
    return Dense(c.d_model, c.dtype, c.param_dtype, name="down")(nn.silu(gate) * up)


class Block(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_btd: Array) -> Array:
    c = self.cfg
    norm = lambda name: RMSNorm(c.norm_eps, c.dtype, c.param_dtype, name=name)
    if c.block == "parallel":
      h = norm("norm")(x_btd)
      return x_btd + Attention(c, name="attn")(h) + Mlp(c, name="mlp")(h)
    x_btd = x_btd + Attention(c, name="attn")(norm("attn_norm")(x_btd))
    return x_btd + Mlp(c, name="mlp")(norm("mlp_norm")(x_btd))


class Transformer(nn.Module):
  """`tokens [B, T] -> logits [B, T, V]`; with `hidden_only=True`, the final hidden
  states [B, T, D] (after the final norm) the head reads, without the head (the
  factored kernel's fused head takes them from there: `tda.gradients.fused_head`)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_bt: Array, hidden_only: bool = False) -> Array:
    c = self.cfg
    emb = Embedder(c.vocab_size, c.d_model, c.dtype, c.param_dtype, c.scale_embeddings,
                   name="embed")
    x = emb.encode(tokens_bt)
    block_cls = nn.remat(Block) if c.remat else Block
    for i in range(c.n_layers):
      x = block_cls(c, name=f"layer_{i}")(x)
    h = RMSNorm(c.norm_eps, c.dtype, c.param_dtype, name="final_norm")(x)
    if hidden_only:
      return h
    if c.tie_embeddings:
      return emb.decode(h).astype(jnp.float32)
    return Dense(c.vocab_size, c.dtype, c.param_dtype, name="lm_head")(h).astype(jnp.float32)


def token_nll(logits_btv: Array, targets_bt: Array, mask_bt: Array) -> Array:
  """Per-example summed next-token NLL: logits at t predict targets at t. Returns [B].

  Written as logsumexp minus the target's logit, picked by an iota comparison:
  the same values as `-take_along_axis(log_softmax(...))`, but its gradient is the
  softmax minus a one-hot formed inside the fusion, where a gather's gradient
  would materialise a [B, T, V] zero tensor and scatter into it (about a sixth of
  the LM head's backward on CPU; scripts/bench_gradients.py --profile).
  """
  logits = logits_btv.astype(jnp.float32)
  hit = jnp.arange(logits.shape[-1], dtype=targets_bt.dtype) == targets_bt[..., None]
  target_logit = jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
  nll_bt = jax.nn.logsumexp(logits, axis=-1) - target_logit
  return jnp.sum(nll_bt * mask_bt, axis=-1)


def shift(tokens_bt: Array, mask_bt: Array | None = None):
  """Inputs, targets and target mask for next-token prediction.

  Args:
    tokens_bt: int tokens, 0 = padding.
    mask_bt: which token positions carry loss (default: every non-pad token).

  Returns:
    (inputs [B, T-1], targets [B, T-1], mask [B, T-1] float32).
  """
  if mask_bt is None:
    mask_bt = (tokens_bt != 0)
  return tokens_bt[:, :-1], tokens_bt[:, 1:], mask_bt[:, 1:].astype(jnp.float32)


def example_losses(model: Transformer, variables: dict[str, Any], tokens_bt: Array,
                   mask_bt: Array | None = None, **apply_kw):
  """Summed NLL per example [B] (and apply's mutable state when asked)."""
  inputs, targets, mask = shift(tokens_bt, mask_bt)
  out = model.apply(variables, inputs, **apply_kw)
  if apply_kw.get("mutable"):
    logits, state = out
    return token_nll(logits, targets, mask), state
  return token_nll(out, targets, mask)


def init_params(model: Transformer, rng: Array, seq_len: int):
  return model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]


def param_shapes(model: Transformer, seq_len: int):
  """Parameter shapes without allocating anything (jax.eval_shape)."""
  return jax.eval_shape(lambda r: init_params(model, r, seq_len), jax.random.key(0))


def count_params(tree) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))


def param_at(tree, path: tuple[str, ...]):
  """The node of a nested-dict tree (params, or an optimizer statistic tree of the
  same structure) at `path`, e.g. ('layer_0', 'mlp', 'up', 'kernel')."""
  for key in path:
    tree = tree[key]
  return tree


def bucket_lengths(lengths_n, *, multiple: int, max_len: int):
  """Per example, the padded length it runs at: its length rounded up to `multiple`.

  Trailing padding never changes a causal LM's loss or gradients, so trimming it
  is exact; bucketing keeps the number of compiled shapes small (max_len/multiple).
  """
  b = -(-np.maximum(np.asarray(lengths_n), 2) // multiple) * multiple
  return np.minimum(b, max_len)


def fixed_batches(n: int, batch: int) -> Iterator[tuple[slice, int]]:
  """(rows, padding) covering range(n) in order, `batch` rows at a time.

  Every call then runs at one fixed batch shape (nothing recompiles): pad each
  slice with `pad_rows(x[rows], padding)` and keep the first `rows` outputs.
  """
  for s in range(0, n, batch):
    rows = slice(s, min(s + batch, n))
    yield rows, batch - (rows.stop - rows.start)


def pad_rows(x: np.ndarray, padding: int, value=0) -> np.ndarray:
  """`x` with `padding` rows of `value` appended on axis 0."""
  return np.pad(x, ((0, padding),) + ((0, 0),) * (np.ndim(x) - 1), constant_values=value)

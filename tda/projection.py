"""The random projection P_d, never materialised (DESIGN.md §2).

Every weight matrix W (n_in × n_out, flax layout) is projected two-sided,
`P_in W P_outᵀ` with P_in (k_in × n_in), P_out (k_out × n_out) of i.i.d.
N(0, 1/k) entries, so E‖P_in W P_outᵀ‖² = ‖W‖².

Pooling: matrices are grouped into *blocks*; a block's output is the k_in × k_out
sum of its members' projections, each member with its own matrices. A sum of
independent Kronecker-Gaussian maps is a Gaussian map of the concatenated
parameters, so pooling keeps the JL property while fixing d = Σ_blocks k_in·k_out.
  * `pooling='layer'`: one block per matrix (LoGra-style).
  * `pooling='block'`: `layers_per_block` contiguous layers × `groups` (attention
    and MLP apart, optionally split into in/out projections): the paper's blocks
    (8 layers, 16 blocks × 64 × 64 = 65,536 at 8B).
Vectors (RMSNorm scales, n) are members too: as 1 × n matrices, projected to
`p_in ⊗ (P_out g)`, and pooled into the block of their layer (the final norm into
the last block). The tied embedding (vocab × d_model) is one member: its vocab
side sees both the logit output gradients and the one-hot token lookups, so both of
its gradient terms land in one projection; `embed_block='own'` gives it its own
block, `'first'` pools it into block 0 (so d stays exactly Σ of the layer blocks).
An untied model (`model.tie_embeddings=False`) has the lookup table and a separate
output head (`lm_head`, a dense d_model × vocab member); the head joins the
embedding's block, so d is the same as the tied model's.

Matrices are derived from (seed, member path) alone, so every host, query and
passage sees the same ones, whatever the batch or process.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

DENSE, VECTOR, EMBED = "dense", "vector", "embed"

# Member name within a layer -> group under the fine ('attn_in', ...) and coarse names.
_FINE_GROUP = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "attn_out",
               "gate": "mlp_in", "up": "mlp_in", "down": "mlp_out"}


@dataclasses.dataclass(frozen=True)
class Member:
  path: tuple[str, ...]   # Parameter path in the params tree.
  kind: str               # DENSE | VECTOR | EMBED
  shape: tuple[int, ...]  # Parameter shape.

  @property
  def name(self) -> str:
    return "/".join(self.path)


@dataclasses.dataclass(frozen=True)
class Block:
  name: str
  k_in: int
  k_out: int
  members: tuple[Member, ...]

  @property
  def dim(self) -> int:
    return self.k_in * self.k_out


@dataclasses.dataclass(frozen=True)
class Plan:
  blocks: tuple[Block, ...]

  @property
  def dim(self) -> int:
    return sum(b.dim for b in self.blocks)

  @property
  def members(self) -> tuple[Member, ...]:
    return tuple(m for b in self.blocks for m in b.members)

  def offsets(self) -> list[int]:
    return list(np.cumsum([0] + [b.dim for b in self.blocks])[:-1])

  def restrict(self, keep) -> "Plan":
    """Plan with only the members for which `keep(member)` holds."""
    blocks = []
    for b in self.blocks:
      ms = tuple(m for m in b.members if keep(m))
      if ms:
        blocks.append(dataclasses.replace(b, members=ms))
    return Plan(tuple(blocks))


def _flatten(tree, prefix=()):
  if isinstance(tree, dict) or hasattr(tree, "items"):
    for k, v in tree.items():
      yield from _flatten(v, prefix + (k,))
  else:
    yield prefix, tree


def make_plan(*, param_shapes, pooling: str, k_in: int, k_out: int,
              layers_per_block: int = 8, groups: Sequence[str] = ("attn", "mlp"),
              embed_block: str = "own") -> Plan:
  """Groups the model's parameters into projection blocks.

  Args:
    param_shapes: params tree (arrays or ShapeDtypeStructs) of `tda.model.Transformer`.
    pooling: 'layer' or 'block'.
    k_in, k_out: projection size per side of every block.
    layers_per_block: contiguous layers per block ('block' pooling).
    groups: 'attn'/'mlp' (coarse) or 'attn_in'/'attn_out'/'mlp_in'/'mlp_out' (fine).
    embed_block: 'own' or 'first' (pool the embedding into block 0).

  Returns:
    The Plan.
  """
  if pooling not in ("layer", "block"):
    raise ValueError(f"gradients.pooling must be 'layer' or 'block', got {pooling!r}")
  if embed_block not in ("own", "first"):
    raise ValueError(f"gradients.embed_block must be 'own' or 'first', got {embed_block!r}")
  fine = any(g in _FINE_GROUP.values() for g in groups)
  layer_members: dict[tuple[int, str], list[Member]] = {}
  vectors: dict[int, list[Member]] = {}
  embed, head, final_norm, n_layers = None, None, None, 0
  for path, leaf in _flatten(param_shapes):
    shape = tuple(leaf.shape)
    m = re.fullmatch(r"layer_(\d+)", path[0])
    if path[0] == "embed":
      embed = Member(path, EMBED, shape)
    elif path[0] == "lm_head":
      head = Member(path, DENSE, shape)
    elif path[0] == "final_norm":
      final_norm = Member(path, VECTOR, shape)
    elif m:
      layer = int(m.group(1))
      n_layers = max(n_layers, layer + 1)
      if path[-1] == "scale":
        vectors.setdefault(layer, []).append(Member(path, VECTOR, shape))
      else:
        group = _FINE_GROUP[path[-2]] if fine else path[1]
        if group not in groups:
          raise ValueError(f"parameter {'/'.join(path)} is in group {group!r}, "
                           f"not among gradients.groups={tuple(groups)}")
        layer_members.setdefault((layer, group), []).append(Member(path, DENSE, shape))
    else:
      raise ValueError(f"unknown parameter {'/'.join(path)}")

  blocks: list[Block] = []
  if pooling == "layer":
    for layer in range(n_layers):
      first = True
      for g in groups:
        for mem in layer_members.get((layer, g), []):
          extra = tuple(vectors.get(layer, [])) if first else ()
          first = False
          blocks.append(Block(mem.name, k_in, k_out, (mem,) + extra))
  else:
    if layers_per_block < 1:
      raise ValueError(f"gradients.layers_per_block must be >= 1, got {layers_per_block}")
    for start in range(0, n_layers, layers_per_block):
      layers = range(start, min(start + layers_per_block, n_layers))
      for gi, g in enumerate(groups):
        ms = [mem for l in layers for mem in layer_members.get((l, g), [])]
        if gi == 0:
          ms += [v for l in layers for v in vectors.get(l, [])]
        if ms:
          blocks.append(Block(f"layers_{layers[0]}-{layers[-1]}/{g}", k_in, k_out, tuple(ms)))
  if final_norm is not None:
    last = blocks[-1]
    blocks[-1] = dataclasses.replace(last, members=last.members + (final_norm,))
  vocab = tuple(x for x in (embed, head) if x is not None)  # The head joins the embedding.
  if vocab:
    if embed_block == "own":
      blocks.insert(0, Block("embed", k_in, k_out, vocab))
    else:
      blocks[0] = dataclasses.replace(blocks[0], members=vocab + blocks[0].members)
  return Plan(tuple(blocks))


def member_key(seed: int, member: Member) -> jax.Array:
  """A key derived from the seed and the member's path only (stable across hosts)."""
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(member.name.encode()) & 0x7FFFFFFF)


def member_matrices(*, seed: int, member: Member, k_in: int, k_out: int,
                    dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
  """(P_in [k_in, n_in], P_out [k_out, n_out]) with N(0, 1/k) entries.

  A VECTOR member (n,) is a 1 × n matrix: P_in is [k_in, 1].
  """
  n_in, n_out = (1, member.shape[0]) if member.kind == VECTOR else member.shape
  key_in, key_out = jax.random.split(member_key(seed, member))
  p_in = jax.random.normal(key_in, (k_in, n_in), jnp.float32) * (k_in ** -0.5)
  p_out = jax.random.normal(key_out, (k_out, n_out), jnp.float32) * (k_out ** -0.5)
  return p_in.astype(dtype), p_out.astype(dtype)


def plan_matrices(*, seed: int, plan: Plan, dtype=jnp.float32) -> dict[str, tuple[jax.Array, jax.Array]]:
  """All members' projection matrices, keyed by member name."""
  return {m.name: member_matrices(seed=seed, member=m, k_in=b.k_in, k_out=b.k_out, dtype=dtype)
          for b in plan.blocks for m in b.members}


def project_full(*, grads_bmn: jax.Array, member: Member, p_in: jax.Array,
                 p_out: jax.Array) -> jax.Array:
  """Projects materialised per-example gradients [B, n_in, n_out] (or [B, n]) to [B, k_in, k_out]."""
  if member.kind == VECTOR:
    return jnp.einsum("i,bk->bik", p_in[:, 0], grads_bmn @ p_out.T)
  return jnp.einsum("in,bnm,km->bik", p_in, grads_bmn, p_out)


def param_kind(path: Sequence[str]) -> str:
  """The coverage kind of a parameter: 'embeddings', 'attention', 'mlp', 'norms',
  'head' (an untied output head, `lm_head`) or 'other'."""
  if path[-1] == "scale" or "norm" in path[0]:
    return "norms"
  if path[0] == "embed":
    return "embeddings"
  if path[0] in ("head", "lm_head", "unembed"):
    return "head"
  if len(path) > 1 and path[1] in ("attn", "mlp"):
    return {"attn": "attention", "mlp": "mlp"}[path[1]]
  return "other"


COVERAGE_KINDS = ("embeddings", "attention", "mlp", "norms", "head", "other")


def coverage(plan: Plan, param_shapes) -> dict:
  """Which parameters the plan attributes: counts and shares of all parameters, by
  kind, and every parameter that is not a projection member with the reason.

  Args:
    plan: the projection plan.
    param_shapes: the model's params tree (arrays or ShapeDtypeStructs).

  Returns:
    {'total_params', 'attributed_params', 'attributed_share', 'tensors',
     'attributed_tensors', 'by_kind': {kind: {'params', 'attributed', 'share_of_all',
     'attributed_share_of_kind', 'tensors'}}, 'not_attributed': [{'name', 'kind',
     'params', 'reason'}], 'notes': [...]}; attributed + not attributed parameters add
    up to the total.
  """
  members = {m.path for m in plan.members}
  leaves = [(tuple(p), int(np.prod(leaf.shape, dtype=np.int64)))
            for p, leaf in _flatten(param_shapes)]
  total = sum(n for _, n in leaves)
  by_kind = {k: {"params": 0, "attributed": 0, "tensors": 0} for k in COVERAGE_KINDS}
  missing = []
  for path, n in leaves:
    kind = param_kind(path)
    row = by_kind[kind]
    row["params"] += n
    row["tensors"] += 1
    if path in members:
      row["attributed"] += n
    else:
      missing.append({"name": "/".join(path), "kind": kind, "params": n,
                      "reason": "not a projection member of the plan (excluded by "
                                "gradients.pooling/groups or a restricted plan)"})
  for row in by_kind.values():
    row["share_of_all"] = row["attributed"] / total if total else 0.0
    row["attributed_share_of_kind"] = (row["attributed"] / row["params"]
                                       if row["params"] else None)
  attributed = sum(r["attributed"] for r in by_kind.values())
  notes = []
  if by_kind["head"]["params"] == 0 and by_kind["embeddings"]["params"]:
    notes.append("no separate output head: it is tied to the embedding, whose one "
                 "member carries both the lookup and the logit gradients")
  if by_kind["head"]["attributed"]:
    notes.append("the untied output head (lm_head) is a member of the embedding's block")
  if by_kind["norms"]["attributed"]:
    notes.append("norm scales are members as 1 x n matrices, pooled into their "
                 "layer's first block (the final norm into the last block)")
  return {"total_params": total, "attributed_params": attributed,
          "attributed_share": attributed / total if total else 0.0,
          "tensors": len(leaves), "attributed_tensors": len(members),
          "by_kind": {k: r for k, r in by_kind.items() if r["tensors"] or k == "head"},
          "not_attributed": missing, "notes": notes}


def format_coverage(cov: dict) -> str:
  """One log line per kind of a `coverage` report."""
  lines = [f"coverage: {cov['attributed_params']:,} of {cov['total_params']:,} parameters "
           f"attributed ({100 * cov['attributed_share']:.1f}%), "
           f"{cov['attributed_tensors']} of {cov['tensors']} tensors"]
  for k, r in cov["by_kind"].items():
    lines.append(f"  {k:<10} {r['attributed']:>12,} / {r['params']:>12,} "
                 f"({100 * r['share_of_all']:.1f}% of all)")
  for m in cov["not_attributed"]:
    lines.append(f"  not attributed: {m['name']} ({m['params']:,}): {m['reason']}")
  lines += [f"  note: {n}" for n in cov["notes"]]
  return "\n".join(lines)

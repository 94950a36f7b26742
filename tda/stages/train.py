"""Stage 'train': trains the model on the world's corpus (`tda.train`), or, with
`model.checkpoint` set, adopts an existing model's checkpoint instead.

Training writes `checkpoints/` (orbax: params, the full optimizer state, step and
data position). Resumable: an interrupted run continues from its newest
checkpoint, with exactly the batches the uninterrupted run would have seen.

An external checkpoint (`model.checkpoint`, `model.checkpoint_step`,
`model.checkpoint_format`) is checked against the config without loading arrays
(`tda.train.describe_checkpoint`) and fingerprinted by its absolute path, step
and the hash of its tree's structure, shapes and dtypes, so a rerun in the same
workdir against another checkpoint is refused. Nothing is written but the
summary naming it; `load` then points every model-reading stage at it. A
Hugging Face folder (`model.checkpoint_format='hf_llama'`, `tda.hf_checkpoint`)
is fingerprinted by its path, the hash of its tensors' names, shapes and dtypes,
config.json's sha256 and its weight files' sizes and mtimes; it is step 0.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from tda import corpus as corpus_lib
from tda import fs
from tda import train as train_lib
from tda import workdir as wd

STAGE = "train"
RESUMABLE = True
CHECKPOINTS = "checkpoints"


@dataclasses.dataclass(frozen=True)
class Checkpoints:
  """The checkpoints later stages read: folder, steps usable and the attributed step."""
  dir: str
  steps: list[int]
  step: int


def fingerprint(ctx) -> dict[str, Any]:
  if ctx.config.model.checkpoint:
    fp = train_lib.fingerprint(ctx.config)
    return {"model": fp["model"], "data.seq_len": fp["data.seq_len"],
            "external_checkpoint": train_lib.describe_checkpoint(ctx.config)}
  fp = {**train_lib.fingerprint(ctx.config), "upstream": ctx.upstream("world", "vocab")}
  if corpus_lib.streamed(ctx.config):
    fp["corpus"] = ctx.corpus.fingerprint()
  return fp


def run(ctx, out_dir: str) -> dict[str, Any]:
  if ctx.config.model.checkpoint:
    return {"external_checkpoint": train_lib.describe_checkpoint(ctx.config)}
  if corpus_lib.streamed(ctx.config):
    # Training from scratch keeps the corpus in memory (small streamed corpora, e.g.
    # :runlocal); at scale the model is brought (model.checkpoint).
    corpus = ctx.corpus
    corpus_lib.in_memory(corpus, ctx.config, "training from scratch")
    rows = corpus.tokens(0, len(corpus), vocab=ctx.vocab, seq_len=ctx.config.data.seq_len)
    tokens_nt, n_truncated = rows.tokens_nt, rows.n_truncated
  else:
    corpus, _ = ctx.arrays
    tokens_nt, n_truncated = corpus.tokens_nt, corpus.n_truncated
  summary = train_lib.train(ctx.config, os.path.join(out_dir, CHECKPOINTS),
                            tokens_nt=tokens_nt)
  summary["n_truncated_passages"] = n_truncated
  return summary


def load(ctx) -> Checkpoints:
  """The committed checkpoints: this stage's own, or the external one it adopted
  (its steps up to the adopted one, for the model-quality trend)."""
  external = ctx.summary(STAGE).get("external_checkpoint")
  want = ctx.config.model.checkpoint
  if (external or {}).get("path") != (fs.abspath(want) if want else None):
    raise wd.WorkdirConflict(
        f"the train stage in {ctx.workdir} was committed with model.checkpoint="
        f"{(external or {}).get('path')!r}, but the config has {want!r}; refusing to mix "
        "them: use a new --workdir.")
  if external and external.get("format") == "hf_llama":  # One model, no steps.
    return Checkpoints(dir=external["path"], steps=[external["step"]], step=external["step"])
  if external:
    steps = [s for s in train_lib.available_steps(external["path"]) if s <= external["step"]]
    return Checkpoints(dir=external["path"], steps=steps, step=external["step"])
  path = os.path.join(ctx.stage_dir(STAGE), CHECKPOINTS)
  steps = train_lib.available_steps(path)
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {path}; run the train stage")
  return Checkpoints(dir=path, steps=steps, step=steps[-1])


def checkpoint_dir(ctx) -> str:
  """The committed checkpoints' folder."""
  return load(ctx).dir

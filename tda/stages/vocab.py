"""Stage 'vocab': the SentencePiece model of the run.

`data.vocab_path` set: that file, validated and fingerprinted by its sha256
(nothing copied). Else a vocab trained on the world's passages, committed as
`spm.model`.
"""

from __future__ import annotations

import os
from typing import Any

from tda import data
from tda import fs
from tda import workdir as wd

STAGE = "vocab"
MODEL = "spm.model"


def fingerprint(ctx) -> dict[str, Any]:
  d = ctx.config.data
  if d.vocab_path:
    data.check_vocab_file(d.vocab_path)
    return {"vocab_path": os.path.abspath(d.vocab_path),
            "sha256": wd.file_sha256(d.vocab_path)}
  passages = os.path.join(ctx.stage_dir("world"), "passages.jsonl")
  return {"vocab_size": d.vocab_size, "passages_sha256": wd.file_sha256(passages),
          "trainer_version": data.TRAINER_VERSION}


def run(ctx, out_dir: str) -> dict[str, Any]:
  d = ctx.config.data
  if d.vocab_path:
    return {"path": os.path.abspath(d.vocab_path), "piece_size": data.check_vocab_file(d.vocab_path)}
  passages = os.path.join(ctx.stage_dir("world"), "passages.jsonl")
  with fs.local_dir(out_dir, upload=True) as local:  # SentencePiece writes local files.
    path = data.train_vocab(texts=(r["text"] for r in wd.read_jsonl(passages)),
                            vocab_size=d.vocab_size, model_prefix=os.path.join(local, "spm"))
    piece_size = data.check_vocab_file(path)
  return {"path": None, "piece_size": piece_size, "requested": d.vocab_size}


def load(ctx) -> str:
  """The model file: `data.vocab_path`, or the one this stage trained."""
  path = ctx.summary(STAGE)["path"]
  return path or os.path.join(ctx.stage_dir(STAGE), MODEL)

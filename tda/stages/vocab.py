"""Stage 'vocab': the vocabulary of the run.

`data.vocab_path` set: that SentencePiece file (or Hugging Face checkpoint
folder), validated and fingerprinted by its sha256 (nothing copied). A Hugging
Face checkpoint (`model.checkpoint_format='hf_llama'`) without it: the folder's
own tokenizer (`tda.hf_checkpoint.check_pipeline_vocabulary`), fingerprinted by
its tokenizer files' sha256. Else a vocab trained on the world's passages,
committed as `spm.model`.
"""

from __future__ import annotations

import os
from typing import Any

from tda import corpus as corpus_lib
from tda import data
from tda import fs
from tda import workdir as wd

STAGE = "vocab"
MODEL = "spm.model"


def _external(ctx) -> str | None:
  """The existing vocabulary the run uses (a file or a HF folder), if any."""
  m = ctx.config.model
  if ctx.config.data.vocab_path:
    return fs.abspath(ctx.config.data.vocab_path)
  if m.checkpoint and m.checkpoint_format == "hf_llama":
    return fs.abspath(m.checkpoint)
  return None


def _check(ctx, path: str) -> int:
  if fs.isdir(path):
    from tda import hf_checkpoint  # pylint: disable=g-import-not-at-top
    from tda import model as model_lib  # pylint: disable=g-import-not-at-top
    return hf_checkpoint.check_pipeline_vocabulary(
        path, model_vocab_size=model_lib.model_config(ctx.config).vocab_size)
  return data.check_vocab_file(fs.local_file(path))  # SentencePiece reads local files.


def fingerprint(ctx) -> dict[str, Any]:
  d = ctx.config.data
  path = _external(ctx)
  if path and fs.isdir(path):
    from tda import hf_checkpoint  # pylint: disable=g-import-not-at-top
    _check(ctx, path)
    return {"vocab_path": path, "tokenizer_sha256": hf_checkpoint.tokenizer_fingerprint(path)}
  if path:
    _check(ctx, path)
    return {"vocab_path": path, "sha256": wd.file_sha256(path)}
  if corpus_lib.streamed(ctx.config):
    return {"vocab_size": d.vocab_size, "corpus": ctx.corpus.fingerprint(),
            "trainer_version": data.TRAINER_VERSION}
  passages = os.path.join(ctx.stage_dir("world"), "passages.jsonl")
  return {"vocab_size": d.vocab_size, "passages_sha256": wd.file_sha256(passages),
          "trainer_version": data.TRAINER_VERSION}


def run(ctx, out_dir: str) -> dict[str, Any]:
  d = ctx.config.data
  path = _external(ctx)
  if path:
    return {"path": path, "piece_size": _check(ctx, path)}
  if corpus_lib.streamed(ctx.config):  # Small streamed corpora only (e.g. :runlocal).
    texts = [t for _, t in corpus_lib.in_memory(ctx.corpus, ctx.config, "training a vocab")]
  else:
    passages = os.path.join(ctx.stage_dir("world"), "passages.jsonl")
    texts = (r["text"] for r in wd.read_jsonl(passages))
  with fs.local_dir(out_dir, upload=True) as local:  # SentencePiece writes local files.
    path = data.train_vocab(texts=texts, vocab_size=d.vocab_size,
                            model_prefix=os.path.join(local, "spm"))
    piece_size = data.check_vocab_file(path)
  return {"path": None, "piece_size": piece_size, "requested": d.vocab_size}


def load(ctx) -> str:
  """The vocabulary: `data.vocab_path`, a HF checkpoint folder, or the one this
  stage trained (`data.get_vocabulary` reads each)."""
  path = ctx.summary(STAGE)["path"]
  return path or os.path.join(ctx.stage_dir(STAGE), MODEL)

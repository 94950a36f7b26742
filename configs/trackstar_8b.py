"""TrackStar at the paper's scale: an 8B PaLM-style model over all of C4.

    python -m tda.run --config=configs/trackstar_8b.py --workdir=gs://.../run

* Model: 32 layers, d_model 4096, 16 heads × 256, multi-query attention, SwiGLU
  d_ff 14336, vocab 256k, tied embeddings: 7.83B parameters (checked with
  jax.eval_shape in tests). bf16 compute, f32 parameters and Adafactor state.
* Projection: the paper's block pooling: 8 contiguous layers × {attention in,
  attention out, MLP in, MLP out} = 16 blocks of 64 × 64, d = 2^16 = 65,536; the
  embedding is pooled into block 0 and norm scales into their layer's block, so d
  stays exactly 2^16.
* R: λ = 0.99 for C4-scale R_train vs the T-REx queries' R_eval (the paper's C4
  setting), damping 1.0 × mean eigenvalue (the default; `hessian.damping`), full
  65,536² eigendecomposition.
* Data: C4 streamed from TFDS (`data.source='tfds'`, `c4/en:3.1.0`; `tda.corpus`),
  each process reading only its own table shards; the queries and ground truth from
  the released T-REx files (`data.trex_facts`, `data.trex_sentences`; `tda.trex`),
  whose sentences are appended to the corpus. Set `data.vocab_path` to the model's
  SentencePiece file, `data.tfds_data_dir` to the prepared C4 and `model.checkpoint`
  to the model (README, "Scale").
* Mesh: data × model (FSDP over the model axis), declared once here.
* Tables: bfloat16 rows, 2^20 rows per shard (~128 GiB per shard at d = 2^16).
* ScaNN per shard: 1,000 leaves (~sqrt(rows)), 10% searched, SOAR spilling, 2-dim AH
  blocks, 100 candidates reordered exactly: recall@10 0.99 against exact search in
  scripts/bench_retrieval.py at 1M rows (set index.method='exact' for exact search).

`:runlocal` shrinks everything to run on a laptop CPU, on the same streamed path:
a local C4-format JSONL corpus and T-REx-format files built from text shipped with
Python and the synthetic world (`data.local_standin`, `tda.standin`), no download.
"""

from tda import config as config_lib


def get_config(arg=None):
  c = config_lib.c4_scale_config(
      name="trackstar_8b", d_model=4096, n_layers=32, n_heads=16, head_dim=256, d_ff=14336,
      layers_per_block=8, model_axis=4, runlocal=False)  # MODEL: one v5e/v4 host's chips.
  c.data.vocab_path = None   # Set to the model's SentencePiece file for a real run.
  c.data.tfds_data_dir = None  # The prepared C4 (e.g. gs://<bucket>/tensorflow_datasets).
  c.data.trex_facts = None     # e.g. gs://<bucket>/trex/trex_facts_sample.jsonl
  c.data.trex_sentences = None  # e.g. gs://<bucket>/trex/trex_sentences.jsonl-*-of-00020
  m, g, ix = c.model, c.gradients, c.index
  m.remat = True
  # Per process (one host's 4 chips, mesh 1 × 4): 1 example a chip compiles to 12.55 GiB
  # of a v5e chip's 16 (`python -m tda.compile_check --config=configs/trackstar_8b.py
  # --topology=v5e-256`); 2 a chip to 15.66 GiB, too close to the limit.
  g.batch_size, g.length_bucket = 4, 256
  c.hessian.train_samples = 1_000_000
  # The dev sweep ranks 100K passages drawn apart from R's sample (plus the dev ground
  # truth): 10% more rows to featurise and hold than R's sample alone.
  c.hessian.sweep_pool = 100_000
  c.hessian.lambda_ = 0.99
  ix.num_leaves, ix.num_leaves_to_search, ix.reorder = 1000, 100, 100
  c.eval.rank_depth = 1000  # MRR within the top 1,000: no full ranking of all of C4.
  # BM25 and dense hold the corpus in memory (tda.corpus.in_memory): not over all of C4.
  c.eval.methods = ("trackstar",)
  if arg == "runlocal":
    c.data.source, c.data.local_standin, c.data.local_standin_rows = "jsonl", True, 2000
    c.eval.methods = ("trackstar", "bm25")
    c.data.vocab_size, c.data.seq_len = 512, 128
    m.d_model, m.n_layers, m.n_heads, m.head_dim, m.d_ff, m.max_len = 64, 2, 2, 32, 128, 128
    m.dtype, m.remat = "float32", False
    g.layers_per_block, g.k_in, g.k_out, g.batch_size, g.length_bucket = 1, 8, 8, 8, 32
    c.world.facts_per_bucket = (8, 8, 8, 4)
    c.world.distractor_passages, c.world.filler_passages = 20, 10
    c.train.steps, c.train.batch_size, c.train.min_dim_size_to_factor = 20, 8, 32
    c.hessian.train_samples, c.hessian.lambda_ = 32, 0.9
    c.tables.dtype, c.tables.rows_per_shard = "float32", 64
    ix.method, ix.num_leaves, ix.num_leaves_to_search, ix.reorder = "exact", None, None, None
    c.mesh.axes = (("data", -1), ("model", 1))
    c.eval.tailpatch_queries, c.eval.tailpatch_k = 4, 3
  return config_lib.finalize(c)

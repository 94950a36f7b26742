"""The one config schema every experiment file fills in.

Experiment files (`configs/<name>.py`) call `base_config()` and override values;
every key is declared here (even as `None`) and the returned config is locked by
`finalize()`, so a mistyped `--config.foo=...` override fails loudly.
"""

from __future__ import annotations

import hashlib
import json

import ml_collections

from tda import errors

# Paper frequency buckets (DESIGN.md §3): facts stated in 1, 2-3, 4-10, 11-30 passages.
DEFAULT_BUCKETS = (("1", 1, 1), ("2-3", 2, 3), ("4-10", 4, 10), ("11-30", 11, 30))


def _str():
  """A None default that `--config.x=...` can still override with a str."""
  return ml_collections.config_dict.placeholder(str)


def _int():
  return ml_collections.config_dict.placeholder(int)


def _float():
  return ml_collections.config_dict.placeholder(float)


def base_config() -> ml_collections.ConfigDict:
  """Returns the unlocked base config with every key declared."""
  c = ml_collections.ConfigDict()
  c.name = "base"
  c.seed = 0
  c.stages = "all"  # 'all', or a comma-separated subset of tda.stages.NAMES.

  # --- The embedded fact world (tda.world) -------------------------------
  c.world = w = ml_collections.ConfigDict()
  w.seed = 0
  w.source = "synthetic"  # 'synthetic' | 'byo' (bring your own files).
  w.relations = ("place_of_birth", "citizenship", "capital_of", "developer",
                 "headquarters", "sport", "original_language", "occupation",
                 "named_after")
  # Facts per frequency bucket; bucket names/ranges in `bucket_ranges`.
  w.bucket_ranges = tuple(f"{n}:{lo}:{hi}" for n, lo, hi in DEFAULT_BUCKETS)
  w.facts_per_bucket = (60, 60, 60, 40)
  w.facts_per_passage = 2           # Max facts stated in one fact passage.
  # Passage length (docs/DESIGN.md §7): round(exp(N(log median, sigma))) sentences,
  # clamped to `sentences_per_passage`. sigma = 1: C4's heavy tail (log-normal);
  # the median and the floor of 2 keep the corpus's token budget; ~12% of passages
  # are longer than data.seq_len and are truncated (train summary counts them).
  w.sentences_per_passage = (2, 60)
  w.sentences_median = 2.0
  w.sentences_sigma = 1.0
  w.distractor_passages = 300       # Mention subject/object, entail nothing.
  w.filler_passages = 150
  w.outlier_share = 0.03            # Boilerplate, repeated lines, digit tables, code.
  w.byo_corpus = _str()       # BYO: corpus JSONL (id, text).
  w.byo_facts = _str()        # BYO: T-REx facts JSONL.
  w.byo_sentences = _str()    # BYO: T-REx sentences JSONL (sentence_id, text, fact_triples).

  # --- Tokenisation and data (tda.data) -----------------------------------
  c.data = d = ml_collections.ConfigDict()
  # The corpus (tda.corpus): 'world' (in memory) | streamed: 'tfds' | 'seqio' | 'jsonl'.
  d.source = "world"
  d.vocab_size = 2048
  d.vocab_path = _str()          # Existing SentencePiece model; None: train on the world.
  d.seq_len = 128
  d.tfds_name = "c4/en:3.1.0"    # source='tfds': a TFDS name, or a prepared dataset's folder.
  d.tfds_data_dir = _str()
  d.seqio_task = _str()          # source='seqio': a registered task's name.
  d.jsonl = _str()               # source='jsonl': comma-separated globs of JSONL shards.
  d.split = "train"
  d.text_key = "text"            # The record field holding the passage.
  d.id_key = _str()              # A record field used as row id (e.g. 'url'); None: index.
  d.max_rows = _int()            # Read only the first rows of the source; None: all.
  # A streamed corpus is held in memory only by training from scratch (no model.checkpoint)
  # and the BM25/dense baselines; both are refused above this many rows.
  d.max_rows_in_memory = 100_000
  # T-REx as released (tda.trex): queries and ground truth for streamed sources.
  d.trex_facts = _str()          # Globs of trex_facts*.jsonl.
  d.trex_sentences = _str()      # Globs of trex_sentences.jsonl-000XX-of-000NN.
  d.trex_sentences_in_corpus = True  # Append the sentences to the corpus (ground truth rows).
  # Build a small local C4-format corpus and T-REx-format files from text shipped with
  # Python and the synthetic world (tda.standin), then stream them: for :runlocal.
  d.local_standin = False
  d.local_standin_rows = 2000

  # --- Model (tda.model) --------------------------------------------------
  c.model = m = ml_collections.ConfigDict()
  m.block = "parallel"   # 'parallel' (PaLM) | 'sequential' (Llama-style).
  m.vocab_size = -1      # -1: take data.vocab_size.
  m.d_model = 128
  m.n_layers = 2
  m.n_heads = 4
  m.head_dim = 32
  m.n_kv_heads = 1       # 1: multi-query attention (PaLM).
  m.d_ff = 512
  m.max_len = 128
  m.rope_base = 10_000.0
  m.norm_eps = 1e-6
  m.dtype = "float32"        # Compute dtype.
  m.param_dtype = "float32"
  m.remat = False
  m.scale_embeddings = True  # Multiply looked-up embeddings by sqrt(d_model) (PaLM); False: Llama.
  m.tie_embeddings = True    # One table for lookup and logits; False: a separate lm_head.
  # An existing model to attribute instead of training one: its checkpoint folder
  # (orbax: `<checkpoint>/<step>/` with items `state` = {params, opt_state} and `meta`
  # holding the model config; see README "Attribute your own model"). None: train.
  m.checkpoint = _str()
  m.checkpoint_step = _int()     # The step attributed; None: the newest in the folder.
  m.checkpoint_format = "orbax"  # Supported: tda.train.CHECKPOINT_FORMATS. 'hf_llama': a
  # Hugging Face Llama save_pretrained folder; the model shape (model.*) then comes
  # from its config.json and the vocabulary from its tokenizer (tda.hf_checkpoint).

  # --- Training (tda.train) -----------------------------------------------
  c.train = t = ml_collections.ConfigDict()
  t.optimizer = "adafactor"  # 'adafactor' | 'adam'
  t.learning_rate = 1e-2
  # Two epochs, as the paper trains its models (two epochs of English C4): ⌈2 × 1,445
  # passages / 32⌉ = 91 steps on the default world (tests/test_world.py checks it),
  # warm-up 10% of them. Longer training memorises this small corpus (400 steps, 8.9
  # epochs: final train loss 0.20, against 0.71), far from the paper's regime.
  t.warmup_steps = 9
  t.steps = 91
  t.batch_size = 32
  t.length_group = 8             # Batches of similar-length passages (0: uniform batches).
  t.min_dim_size_to_factor = 128
  t.adafactor_decay_rate = 0.8
  t.adam_b1 = 0.9
  t.adam_b2 = 0.99
  t.adam_eps = 1e-8
  t.weight_decay = 0.0
  t.grad_clip = 1.0
  t.checkpoint_every = 50
  t.max_to_keep = 10
  t.log_every = 50

  # --- Model evaluation on the queries (tda.model_eval) -------------------
  c.model_eval = me = ml_collections.ConfigDict()
  me.batch_size = 64
  me.max_new_tokens = 8
  me.num_samples = 5         # Temperature samples per query: model_confidence, the viewers'
                             # decoder samples (0: skip; confidence is then p(target)).
  me.temperature = 1.0

  # --- Per-example gradients (tda.gradients, tda.projection, tda.correction)
  c.gradients = g = ml_collections.ConfigDict()
  g.kernel = "factored"          # 'factored' | 'reference' (vmap of grad; tests, small runs).
  g.pooling = "block"            # 'block' (paper) | 'layer' (LoGra-style).
  g.layers_per_block = 1         # Paper: 8 at 8B.
  g.groups = ("attn", "mlp")     # Or ('attn_in', 'attn_out', 'mlp_in', 'mlp_out').
  g.embed_block = "own"          # 'own' | 'first' (pool the embedding into block 0).
  g.k_in = 24                    # Projection size per side of every block.
  g.k_out = 24
  g.seed = 1234                  # Projection seed: same matrices on every host.
  g.correction = True            # Compute the optimizer-corrected variant too.
  g.eps = 1e-12                  # Added to V's statistics (tda.correction).
  g.adam_v = "materialise"       # 'materialise' (exact) | 'rank1' (fit) for Adam's V.
  g.v_source = "checkpoint"      # V from the 'checkpoint' optimizer state | 'estimate'
                                 # (tda.v_estimate; stage 'second_moments').
  g.v_estimate_samples = 1024    # Corpus passages V is estimated on (seeded by `seed`).
  g.batch_size = 32
  g.length_bucket = 32           # Run each example at its length rounded up to this.

  # --- Hessian approximation R (tda.hessian) ------------------------------
  c.hessian = h = ml_collections.ConfigDict()
  h.train_samples = 4096         # Training passages sampled for R_train (all, if fewer);
                                 # R is estimated from >= 4 × d of them (a warning otherwise).
  h.sweep_pool = 4096            # Passages the dev damping sweep ranks (all, if fewer): drawn
                                 # apart from R_train's sample, plus the dev ground truth.
  h.lambda_rule = "top_k"        # 'top_k' (paper's rule, unnormalised R) | 'fixed' (lambda_,
                                 # unnormalised) | 'fixed_normalised' (lambda_ on trace-scaled R).
  h.lambda_ = 0.9                # λ for the 'fixed' rules (paper: 0.9 on T-REx, 0.99 on C4).
  h.lambda_top_k_fraction = 1000 / 65536  # 'top_k': K/d of R_eval's directions downweighted.
  h.damping_candidates = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # × mean eigenvalue; chosen per method on dev.
  # A dev optimum at an end of the grid extends it past that end (ratio of the end's
  # two candidates), up to this many candidates, while dev MRR says so.
  h.damping_extend_steps = 3
  h.damping = 1.0                # × mean eigenvalue, where no dev sweep runs (the trend).
  h.block_diagonal = False       # Block-diagonal R over projection blocks.

  # --- Gradient tables (tda.tables) ---------------------------------------
  c.tables = tb = ml_collections.ConfigDict()
  tb.dtype = "float32"           # 'float32' | 'bfloat16' | 'int8'
  tb.rows_per_shard = 512

  # --- Retrieval (tda.index) ----------------------------------------------
  c.index = ix = ml_collections.ConfigDict()
  ix.method = "exact"            # 'exact' | 'scann'
  ix.k = 10
  # ScaNN (per table shard); None: derived from the shard's row count (see
  # tda.index.ScannIndex.build). scripts/bench_retrieval.py measures the trade-off.
  ix.num_leaves = _int()
  ix.num_leaves_to_search = _int()
  ix.dims_per_block = 2          # Asymmetric hashing: 4-bit code per 2 dims.
  ix.aq_threshold = 0.2          # Anisotropic quantization (score-aware loss).
  ix.reorder = _int()            # Candidates rescored exactly (float32 dot).
  ix.training_sample_size = _int()
  ix.soar_lambda = 1.0           # SOAR spilled assignment; None: off.
  ix.spherical = False           # Spherical k-means for the partition tree.
  ix.avq = _float()              # Anisotropic k-means for the tree; None: off.
  ix.chunk_rows = 65536

  # --- Evaluation (tda.stages.evaluation) ---------------------------------
  c.eval = ev = ml_collections.ConfigDict()
  ev.methods = ("trak", "exp1", "exp2", "exp3", "exp4", "exp5", "trackstar",
                "trackstar_no_task_r", "bm25", "dense")
  ev.tailpatch_k = 10
  ev.dev_fraction = 0.3          # Share of each (bucket, relation) stratum of queries on dev.
  ev.split_seed = 0              # Seed of the dev/test split (tda.protocol).
  ev.rank_depth = 0              # Rank depth for MRR (0: the whole corpus, exact).
  ev.bootstrap_samples = 1000    # Resamples of the test queries for the evaluation's 95% CIs
                                 # (the trend stage's use 1,000, tda.trend).
  ev.tailpatch_queries = 0       # Test queries tail-patched per method (0: all).
  ev.tailpatch_lr = _float()     # None: the training schedule's final LR.
  ev.dense_model = "all-MiniLM-L6-v2"

  # --- The paper's trend by model size (tda.trend, stage 'trend') ---------
  # Smaller models trained exactly like the attributed one (same data, optimizer,
  # steps, so epochs), as 'name:d_model:n_layers:n_heads:d_ff'; (): no trend.
  c.trend = tr = ml_collections.ConfigDict()
  tr.sizes = ("small:32:1:1:128", "medium:64:2:2:256")
  tr.final_name = "large"        # The attributed model's label in the trend.

  # --- Tracing your own prompts (tda.query, tda.serve) --------------------
  c.query = qy = ml_collections.ConfigDict()
  qy.batch_size = 8              # Rows per gradient batch (a request, its per-token rows).
  qy.max_prompt_chars = 2000     # Longer prompts or targets are refused.
  qy.max_k = 100                 # Largest k a request may ask for.
  qy.length_bucket = 32          # Query rows run at their length rounded up to this
                                 # (each length is one compilation); 0: data.seq_len.

  # --- Cost planning (tda.plan) -------------------------------------------
  c.plan = pl = ml_collections.ConfigDict()
  pl.rows = _int()               # Rows to featurise; None: 365M for the C4 configs.
  pl.mean_tokens = _float()      # None: 160e9 / 365e6 for C4, else data.seq_len.
  pl.mfu = 0.4                   # Share of peak bf16 FLOP/s assumed.
  pl.queries = 5000              # Queries for the retrieval estimate.
  pl.topology = "v5e-256"        # Chip for estimates (tda.topology.TOPOLOGIES).

  # --- Sharding (tda.sharding) --------------------------------------------
  c.mesh = ml_collections.ConfigDict()
  c.mesh.axes = (("data", -1), ("model", 1))
  # A mesh axis that does not divide a parameter dimension (tda.sharding.PARAM_RULES):
  # an error naming the parameter, dimension and axis if True, else that dimension
  # is replicated (with a warning).
  c.mesh.strict_param_sharding = False

  return c


def c4_scale_config(*, name: str, d_model: int, n_layers: int, n_heads: int, head_dim: int,
                    d_ff: int, layers_per_block: int, model_axis: int,
                    runlocal: bool) -> ml_collections.ConfigDict:
  """The paper's setting for a PaLM-shaped model over C4 (unlocked; caller finalizes).

  bf16 compute, 256k vocab, 2048-token passages, the paper's block pooling into
  64 × 64 blocks (attention and MLP, in and out apart; embedding pooled into block 0),
  λ = 0.9, bfloat16 tables of 2^20 rows, ScaNN retrieval. C4 is streamed from TFDS
  (`tda.corpus`). `runlocal` shrinks the model and streams a local stand-in
  (`data.local_standin`) so the same config runs on a laptop CPU.
  """
  c = base_config()
  c.name = name
  c.data.source, c.data.tfds_name = "tfds", "c4/en:3.1.0"
  c.data.vocab_size, c.data.seq_len = 256_000, 2048
  m = c.model
  m.d_model, m.n_layers, m.n_heads, m.head_dim, m.n_kv_heads = (
      d_model, n_layers, n_heads, head_dim, 1)
  m.d_ff, m.max_len, m.dtype = d_ff, 2048, "bfloat16"
  g = c.gradients
  g.pooling, g.layers_per_block = "block", layers_per_block
  g.groups = ("attn_in", "attn_out", "mlp_in", "mlp_out")
  g.embed_block = "first"
  g.k_in = g.k_out = 64
  c.hessian.lambda_ = 0.9
  c.tables.dtype, c.tables.rows_per_shard = "bfloat16", 1 << 20
  c.index.method = "scann"
  c.trend.sizes = ()
  c.mesh.axes = (("data", -1), ("model", model_axis))
  if runlocal:  # The same streamed path over a local stand-in (tda.standin).
    c.data.source, c.data.local_standin = "jsonl", True
    c.data.vocab_size, c.data.seq_len, m.max_len = 2048, 128, 128
    m.d_model, m.n_layers, m.d_ff, m.dtype = 64, 2, 128, "float32"
    g.k_in = g.k_out = 8
    c.mesh.axes = (("data", -1), ("model", 1))
  return c


def finalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Locks the config so unknown keys fail; returns it."""
  config.lock()
  return config


def config_hash(config: ml_collections.ConfigDict, *sections: str) -> str:
  """A stable short hash of the given top-level sections (all when none)."""
  d = config.to_dict()
  if sections:
    d = {k: d[k] for k in sections}
  blob = json.dumps(d, sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def bucket_ranges(config: ml_collections.ConfigDict) -> list[tuple[str, int, int]]:
  """Parses `world.bucket_ranges` into (name, lo, hi) triples."""
  out = []
  for spec in config.world.bucket_ranges:
    try:
      name, lo, hi = spec.split(":")
      out.append((name, int(lo), int(hi)))
    except ValueError as e:
      raise errors.UserError(
          f"world.bucket_ranges entry {spec!r} is not 'name:lo:hi'") from e
  return out

"""A tiny streamed-corpus config for tests: the local stand-in (JSONL in C4's format
plus T-REx-format queries), a tiny model, tables of 8-row shards."""

from tda import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.name = "stream_tiny"
  d = c.data
  d.source, d.local_standin, d.local_standin_rows = "jsonl", True, 64
  d.vocab_size, d.seq_len = 400, 64
  m = c.model
  m.d_model, m.n_layers, m.n_heads, m.head_dim, m.d_ff, m.max_len = 32, 1, 2, 16, 64, 64
  c.world.facts_per_bucket = (2, 2, 2, 1)
  c.world.distractor_passages, c.world.filler_passages = 4, 2
  c.train.steps, c.train.batch_size, c.train.warmup_steps = 2, 8, 1
  c.train.checkpoint_every, c.train.min_dim_size_to_factor = 2, 16
  g = c.gradients
  g.k_in = g.k_out = 4
  g.batch_size, g.length_bucket = 8, 16
  c.hessian.train_samples = 16
  c.tables.rows_per_shard = 8
  c.eval.methods = ("trackstar",)
  c.trend.sizes = ()
  c.eval.tailpatch_queries, c.eval.tailpatch_k = 2, 2
  return config_lib.finalize(c)

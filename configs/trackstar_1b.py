"""TrackStar on a 1B-parameter PaLM-style model.

Shapes only differ from trackstar_8b; see that file for the data and mesh set-up.
"""

from tda import config as config_lib


def get_config(arg=None):
  c = config_lib.base_config()
  c.name = "trackstar_1b"
  c.data.source = "c4"
  c.data.vocab_size = 256_000
  c.data.seq_len = 2048
  m = c.model
  m.d_model, m.n_layers, m.n_heads, m.head_dim, m.n_kv_heads = 2048, 16, 16, 128, 1
  m.d_ff, m.max_len, m.dtype = 4096, 2048, "bfloat16"
  c.gradients.pooling = "block"
  c.gradients.layers_per_block = 4
  c.gradients.groups = ("attn_in", "attn_out", "mlp_in", "mlp_out")
  c.gradients.embed_block = "first"
  c.gradients.k_in = c.gradients.k_out = 64
  c.hessian.lambda_ = 0.9
  c.tables.dtype = "bfloat16"
  c.tables.rows_per_shard = 1 << 20
  c.index.method = "scann"
  c.eval.trend_steps = ()
  c.mesh.axes = (("data", -1), ("model", 4))
  if arg == "runlocal":
    c.data.vocab_size, c.data.seq_len, m.max_len = 2048, 128, 128
    m.d_model, m.n_layers, m.d_ff, m.dtype = 64, 2, 128, "float32"
    c.gradients.k_in = c.gradients.k_out = 8
    c.mesh.axes = (("data", -1), ("model", 1))
  return config_lib.finalize(c)

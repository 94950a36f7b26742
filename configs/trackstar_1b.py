"""TrackStar on a 1B-parameter PaLM-style model over C4.

`:runlocal` shrinks it to run on a laptop CPU. See trackstar_8b.py for the full set-up.
"""

from tda import config as config_lib


def get_config(arg=None):
  return config_lib.finalize(config_lib.c4_scale_config(
      name="trackstar_1b", d_model=2048, n_layers=16, n_heads=16, head_dim=128, d_ff=4096,
      layers_per_block=4, model_axis=4, runlocal=arg == "runlocal"))

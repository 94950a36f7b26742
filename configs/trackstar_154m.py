"""TrackStar on a 154M-parameter PaLM-style model (the paper's smallest scale) over C4.

`:runlocal` shrinks it to run on a laptop CPU. See trackstar_8b.py for the full set-up.
"""

from tda import config as config_lib


def get_config(arg=None):
  return config_lib.finalize(config_lib.c4_scale_config(
      name="trackstar_154m", d_model=512, n_layers=8, n_heads=8, head_dim=64, d_ff=1536,
      layers_per_block=2, model_axis=1, runlocal=arg == "runlocal"))

"""Entry point: `python -m tda.run --config=configs/<name>.py[:arg] --workdir=DIR`.

Intentionally short: parse flags, set up JAX, call `tda.pipeline.run`.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for every stage's outputs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  import jax
  from tda import distributed
  from tda import pipeline
  distributed.initialize(_CONFIG.value)
  jax.config.update("jax_threefry_partitionable", True)
  logging.info("config:\n%s", _CONFIG.value)
  timings = pipeline.run(_CONFIG.value, _WORKDIR.value)
  logging.info("timings (s): %s", timings)


if __name__ == "__main__":
  app.run(main)

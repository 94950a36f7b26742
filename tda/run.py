"""Entry point: `python -m tda.run --config=configs/<name>.py[:arg] --workdir=DIR`.

Intentionally short: parse flags, quiet third-party logs, set up JAX, print a
header, call `tda.pipeline.run`, print the result table. A mistake in the inputs
(`tda.errors.UserError`: a mistyped config key, a bad data file, a workdir from
another setup, a missing checkpoint) ends the run with one message on stderr and
exit status 2; `--verbosity=1` adds the traceback and third-party logs.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from tda import errors
from tda import run_output

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for every stage's outputs.")
flags.mark_flags_as_required(["config", "workdir"])


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing; a bad config override (e.g. a mistyped key) is a user error."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    run_output.exit_on_user_error(
        errors.UserError(f"{e}. See python -m tda.run --helpshort for the flags."),
        verbose=run_output.verbose_in(argv), cause=e)
    raise  # not reached
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # ml_collections raises these from an override of a key the config lacks
    # or of the wrong type, while absl parses the flags.
    bad = [a for a in argv[1:] if a.startswith("--config.")]
    msg = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'").replace("\n", " ")
    cfg = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")]
    err = errors.UserError(
        f"bad config override {' '.join(bad) or '(none)'}: {msg} Fix the key or value against "
        f"the config file ({cfg[0].split(':')[0] if cfg else 'configs/*.py'}; it is locked, so "
        "only keys it defines can be set, with values of their type).")
    run_output.exit_on_user_error(err, verbose=run_output.verbose_in(argv), cause=e)
    raise  # not reached


def main(argv):
  del argv
  verbose = logging.get_verbosity() > logging.INFO
  run_output.quiet_third_party(verbose=verbose)
  try:
    import jax
    from tda import distributed
    from tda import pipeline
    distributed.initialize(_CONFIG.value)
    jax.config.update("jax_threefry_partitionable", True)
    config, workdir = _CONFIG.value, _WORKDIR.value
    run_output.print_header(config, workdir, config_arg=flags.FLAGS["config"].config_filename)
    timings = pipeline.run(config, workdir)
    logging.debug("timings (s): %s", timings)
    run_output.write_config(config, workdir)
    run_output.print_footer(workdir, timings)
  except errors.UserError as e:
    run_output.exit_on_user_error(e, verbose=verbose)


if __name__ == "__main__":
  # TF/XLA C++ logs are configured when those libraries load: before any import of them.
  if not run_output.verbose_in(sys.argv):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    run_output.filter_native_logs()
  app.run(main, flags_parser=_parse_flags)

"""Errors a user causes (a config, a data file, a workdir, a checkpoint) and how they end a run.

`UserError` is the one type for them: its message says what is wrong, where, and
how to fix it. Entry points (`tda.run`) catch it and exit with status 2 after
one line on stderr, without a traceback (`--verbosity=1` keeps the traceback).
It subclasses ValueError, so callers that catch ValueError still do.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(ValueError):
  """A mistake in the run's inputs, explained: what, where, how to fix."""


class MissingInput(UserError, FileNotFoundError):
  """A file or folder the run was pointed at (data, checkpoint, vocabulary) is not there."""

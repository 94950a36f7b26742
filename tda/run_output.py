"""What `python -m tda.run` prints: header, footer, user errors, and the log filter.

* Header (stdout): config name, devices, workdir, the stages to run and those
  already committed there (skipped when their inputs match). The full config is
  written to `<workdir>/config.json`, not printed.
* Footer (stdout): the result table with the paper's Table 1 numbers beside it
  (`results/table.md`, from `tda.result_tables`; the paper's numbers live in
  `tda.methods`), each of the paper's claims and the trend by size with its
  verdict, then the paths of the figures and the viewer.
* A user error (`tda.errors.UserError`): one line on stderr, exit status 2; with
  `--verbosity=1` the traceback too.
* Quiet by default: log records from outside this package below ERROR (orbax,
  TensorFlow, absl, jax) and Python warnings from outside it are dropped at the
  default verbosity; `--verbosity=1` shows everything. This package's own INFO
  lines and warnings stay.

Imports here stay light (no jax / TensorFlow at module level): `tda.run` sets
the C++ log level environment before those load.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import sys
import traceback
import warnings
from typing import Any

from absl import logging as absl_logging

from tda import errors
from tda import fs

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def verbose_in(argv: list[str]) -> bool:
  """Whether argv asks for `--verbosity` >= 1 (readable before flags are parsed)."""
  for i, a in enumerate(argv):
    m = re.fullmatch(r"--(?:verbosity|v)=(-?\d+)", a)
    if m is None and a in ("--verbosity", "-v", "--v") and i + 1 < len(argv):
      m = re.fullmatch(r"(-?\d+)", argv[i + 1])
    if m is not None and int(m.group(1)) >= 1:
      return True
  return False


class _OwnOrSevere(logging.Filter):
  """Keeps records logged from this package, and ERROR or worse from anywhere."""

  def filter(self, record: logging.LogRecord) -> bool:
    return (record.levelno >= logging.ERROR
            or os.path.abspath(record.pathname).startswith(_PACKAGE_DIR + os.sep))


def quiet_third_party(*, verbose: bool) -> None:
  """Silences other libraries' INFO/WARNING logs and warnings unless `verbose`."""
  if verbose:
    return
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
  for handler in logging.getLogger().handlers:
    if not any(isinstance(f, _OwnOrSevere) for f in handler.filters):
      handler.addFilter(_OwnOrSevere())
  warnings.simplefilter("ignore")
  warnings.filterwarnings("default", module=r"tda(\.|$)")
  try:
    import sentencepiece  # Its C++ INFO lines ("precompiled_charsmap is empty") on each load.
    sentencepiece.set_min_log_level(2)
  except (ImportError, AttributeError):
    pass


# Lines of C++ logging (absl / glog / tsl style, and SentencePiece's) that libraries
# write straight to fd 2: "I1202 00:00:00.0 123 file.cc:31] ...", "normalizer.cc(51)
# LOG(INFO) ...", absl's "WARNING: All log messages before absl::InitializeLog() ...".
_NATIVE_LOG = re.compile(r"^(?:[IW]\d{4} |E0000 .*cuda|\S+\.cc\(\d+\) LOG\((?:INFO|WARNING)\)"
                         r"|WARNING: All log messages before absl::InitializeLog)")
_FILTER: dict[str, Any] = {}


def filter_native_logs() -> None:
  """Drops other libraries' C++ INFO/WARNING lines written to fd 2, for this process.

  TensorFlow, XLA, CUDA probes and TensorFlow Text's SentencePiece log from C++
  straight to file descriptor 2, before anything can configure them. Python's
  `sys.stderr` (our logs, tqdm) is moved to a copy of the original stderr, and fd 2
  to a pipe that a thread copies back line by line, leaving out the lines in those
  C++ log formats (ERROR lines stay, except the CUDA probe's on CPU machines). Call
  once, at start-up, unless `--verbosity` >= 1.
  """
  if _FILTER:
    return
  import threading
  sys.stderr.flush()
  orig_fd = os.dup(2)
  tty = os.isatty(2)
  sys.stderr = os.fdopen(os.dup(orig_fd), "w", buffering=1, errors="backslashreplace")
  # absl's Python log lines look like C++ ones: they go to the new stderr, unfiltered.
  absl_logging.get_absl_handler().python_handler.setStream(sys.stderr)
  read_fd, write_fd = os.pipe()
  os.dup2(write_fd, 2)
  os.close(write_fd)

  def pump():
    with os.fdopen(read_fd, "rb") as r:
      for raw in r:
        line = raw.decode("utf-8", "replace")
        if not _NATIVE_LOG.match(line):
          os.write(orig_fd, raw)

  thread = threading.Thread(target=pump, name="native-log-filter", daemon=True)
  thread.start()
  _FILTER.update(thread=thread, orig_fd=orig_fd, tty=tty)

  def restore():
    sys.stderr.flush()
    os.dup2(orig_fd, 2)  # Closes the pipe's last write end: the pump drains and ends.
    thread.join(timeout=5)

  atexit.register(restore)


def stderr_is_tty() -> bool:
  """Whether the run's stderr is a terminal (also once `filter_native_logs` moved fd 2)."""
  return _FILTER["tty"] if _FILTER else sys.stderr.isatty()


def exit_on_user_error(err: BaseException, *, verbose: bool,
                       cause: BaseException | None = None) -> None:
  """Prints `err` (with the traceback when `verbose`) and exits with status 2."""
  if verbose:
    traceback.print_exception(cause or err, file=sys.stderr)
  sys.stderr.write(f"error: {err}\n")
  if not verbose:
    sys.stderr.write("(run with --verbosity=1 for the traceback)\n")
  sys.stderr.flush()
  sys.exit(errors.EXIT_USER_ERROR)


def _stage_plan(config, workdir: str) -> tuple[list[str], list[str]]:
  from tda import pipeline
  from tda import workdir as wd
  names = [s.STAGE for s in pipeline.stages_of(config)]
  committed = [n for n in names if wd.committed(workdir, n) is not None]
  return names, committed


def header_lines(config, workdir: str, *, config_arg: str | None) -> list[str]:
  """The run's header: config, devices, workdir, stages to run / committed."""
  import jax
  devices = jax.devices()
  kinds = sorted({d.device_kind for d in devices})
  names, committed = _stage_plan(config, workdir)
  todo = [n for n in names if n not in committed]
  lines = [
      f"tda.run  config {config_arg or '?'}",
      f"  devices  {jax.device_count()} x {', '.join(kinds)} ({devices[0].platform}), "
      f"{jax.process_count()} process(es)",
      f"  workdir  {fs.abspath(workdir)}  (full config: "
      f"{os.path.join(fs.abspath(workdir), 'config.json')})",
      f"  stages   to run: {', '.join(todo) or 'none'}",
  ]
  if committed:
    lines.append(f"           committed (skipped when their inputs match): {', '.join(committed)}")
  lines.append(f"  methods  {', '.join(config.eval.methods)}")
  return lines


def print_header(config, workdir: str, *, config_arg: str | None) -> None:
  from tda import distributed
  if not distributed.is_leader():
    return
  fs.makedirs(workdir)
  if not fs.exists(os.path.join(workdir, "config.json")):
    write_config(config, workdir)
  print("\n".join(header_lines(config, workdir, config_arg=config_arg)), flush=True)


def write_config(config, workdir: str) -> None:
  """`<workdir>/config.json`: the config of the run that last finished (or started first)."""
  from tda import distributed
  from tda import workdir as wd
  if not distributed.is_leader():
    return
  path = os.path.join(workdir, "config.json")
  new = json.loads(config.to_json_best_effort())
  if fs.exists(path):
    try:
      if wd.read_json(path) == new:
        return  # A rerun of the same config rewrites nothing.
    except ValueError:
      pass
  wd.write_json(path, new)


def footer_lines(workdir: str, timings: dict[str, float]) -> list[str]:
  """The result table (with the paper's numbers), the paper's claims and the trend with
  their verdicts, and the paths of figures and viewer."""
  results = os.path.join(fs.abspath(workdir), "results")
  lines = [f"done in {sum(timings.values()):.0f} s "
           f"({', '.join(f'{k} {v:.0f}s' for k, v in timings.items())})"]
  table = os.path.join(results, "table.md")
  if fs.isfile(table):
    rows = [l for l in fs.read_text(table).splitlines() if l.startswith("|")]
    lines += ["", f"Results ({table}; 'Paper' columns: Chang et al. 2025, Table 1, T-REx):"]
    lines += rows
  lines += _claim_lines(workdir, results)
  figs = [os.path.join(results, n) for n in fs.listdir(results) if n.endswith(".png")]
  if figs:
    lines += ["", "Figures:"] + [f"  {p}" for p in figs]
  viewer = os.path.join(results, "viewer.html")
  if fs.isfile(viewer):
    lines += ["", f"Viewer:  {viewer}"]
  props = os.path.join(results, "proponents")
  if fs.isdir(props):
    lines += [f"Per-method JSONL (PAIR-code/pretraining-tda viewer schema): {props}/<method>.jsonl"]
  return lines


def _claim_lines(workdir: str, results: str) -> list[str]:
  """The paper's claims with their verdicts (`tda.claims`, judged on the test split by
  paired bootstrap CIs), and the trend's (`tda.trend.size_claims`), when written."""
  from tda import workdir as wd
  lines = []
  metrics = os.path.join(results, "metrics.json")
  orderings = (wd.read_json(metrics).get("paper_orderings") or {}) if fs.isfile(metrics) else {}
  if orderings:
    lines += ["", f"The paper's claims on the test queries (paired 95% CIs; why each that "
                  f"does not hold: {os.path.join(results, 'paper_comparison.md')}):"]
    lines += [f"  {c['verdict']:<12} {c['claim']}" for c in orderings.values()]
  path = os.path.join(wd.stage_dir(fs.abspath(workdir), "trend"), wd.SUMMARY)
  summary = wd.read_json(path) if fs.isfile(path) else {}
  judged = summary.get("claims")
  if judged is None and summary.get("points"):  # Committed before the trend was judged.
    from tda import trend  # pylint: disable=g-import-not-at-top
    judged = trend.size_claims(summary["points"])
  judged = judged or []
  if judged:
    lines += ["", "The trend by model size (TrackStar MRR, larger − smaller, paired 95% CI; "
                  f"{os.path.join(results, 'trend.md')}):"]
    lines += [f"  {c['verdict']:<12} {c['larger']} − {c['smaller']}: {c['diff']:+.3f} "
              f"[{c['lo']:+.3f}, {c['hi']:+.3f}]" for c in judged]
  return lines


def print_footer(workdir: str, timings: dict[str, Any]) -> None:
  from tda import distributed
  if distributed.is_leader():
    print("\n".join(footer_lines(workdir, timings)), flush=True)

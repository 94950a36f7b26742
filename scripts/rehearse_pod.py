"""A pod rehearsal on one machine: the C4 config's `:runlocal` shape as 2 processes ×
2 forced host devices on localhost, the workdir on a local GCS emulator, one process
SIGKILLed during the tables stage and the run resumed, ScaNN retrieval at the end.

    python scripts/rehearse_pod.py [--rows N] [--json] [--keep=DIR]

Steps (nothing is downloaded):

  1. Trains one small model (`configs/trackstar_8b.py:runlocal`'s world, vocabulary
     and train stages, `--train_steps`) in a local workdir: the checkpoint the
     rehearsal takes through `model.checkpoint`, and its SentencePiece file
     (`data.vocab_path`).
  2. Builds a local TFDS dataset in C4's format (`text`, `url`, `timestamp`) of N
     passages of real text with heavy-tailed lengths (`tda.standin.c4_rows`: the
     Python documentation shipped with Python), read by `data.source='tfds'` from
     its folder; the T-REx-format queries and sentences are the stand-in's
     (`data.local_standin`), the sentences appended to the corpus.
  3. Starts the GCS emulator (`tests/gcs_emulator.py`) and runs, with the workdir
     `gs://<bucket>/run`, 2 processes (`TDA_COORDINATOR`, `TDA_NUM_PROCESSES`,
     `TDA_PROCESS_ID`) of 2 host devices each: the stages up to 'gradients'; then
     the tables stage, SIGKILLing process 1 once two table shards are committed
     (process 0 is SIGKILLed too if it has not exited 20 s later: a pod loses the
     job when one host dies); then the tables stage again (it resumes), sampling
     each process's peak RSS (VmHWM) when a quarter of the rows left at the kill
     are committed, and at its exit; then retrieval with ScaNN (`index.method='scann'`).
  4. Copies the committed upstream stages to a local workdir and runs the tables
     stage there uninterrupted as 1 process (2 devices): the reference.

The `--json` line: `processes`, `devices_per_process`, `workdir`, `rows` (the
corpus: N passages plus the T-REx sentences), `passages`, `rows_per_s_per_process`
(the resumed tables run: rows committed from its first new shard to its end, per
second and process; start-up and compilation excluded), `peak_rss_mb_quarter` and `peak_rss_mb_full`
(the largest over processes of the resumed tables run's peak RSS (VmHWM) once a
quarter of the rows it featurises are committed, and at its exit), `rss_ratio` (full / quarter), `killed_and_resumed`
(process 1 died by SIGKILL mid-stage with committed shards, the rerun skipped them
and committed the stage), `tables_equal` (ids and bytes of every table identical to
the 1-process run's), `scann_recall_at_10` (the retrieval stage's ScaNN top 10 vs
exact search over the same table and queries), and the wall times of each step.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tda import cli  # pylint: disable=g-import-not-at-top
from tests import gcs_emulator

_ROWS = flags.DEFINE_integer("rows", 200_000, "C4-format passages in the local dataset.")
_JSON = cli.define_json_flag()
_KEEP = flags.DEFINE_string("keep", None, "Keep the local files here (default: a temp dir, "
                            "deleted at the end).")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 20, "Steps of the small model trained first.")
_PRETRAINED = flags.DEFINE_string(
    "pretrained", None, "Reuse this workdir's committed vocab and train stages (a run of "
    f"{'configs/trackstar_8b.py:runlocal'}) instead of training a small model first.")
_TIMEOUT = flags.DEFINE_integer("timeout", 3600, "Seconds any one step may take.")

CONFIG = "configs/trackstar_8b.py:runlocal"
PROCESSES, DEVICES = 2, 2
TABLE = "trackstar"


def log(msg: str) -> None:
  print(f"[rehearse_pod {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- The local TFDS dataset -------------------------------------------------------

def build_tfds(folder: str, rows: int) -> str:
  """A TFDS dataset in C4's format of `rows` stand-in passages; returns its folder."""
  from tda import standin  # pylint: disable=g-import-not-at-top
  return standin.build_c4_tfds(folder, standin.c4_rows(rows), name="rehearsal_c4")


# --- Processes ----------------------------------------------------------------------

def _env(extra: dict[str, str], devices: int) -> dict[str, str]:
  return {**os.environ, "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **extra}


class Job:
  """`tda.run` as `n` processes on localhost (1: no coordinator), logs in files."""

  def __init__(self, *, workdir: str, stages: str, overrides: list[str], n: int,
               env: dict[str, str], logdir: str, name: str):
    self.logs = [os.path.join(logdir, f"{name}.p{i}.log") for i in range(n)]
    port = _free_port()
    self.procs = []
    for i in range(n):
      dist = ({"TDA_COORDINATOR": f"localhost:{port}", "TDA_NUM_PROCESSES": str(n),
               "TDA_PROCESS_ID": str(i)} if n > 1 else {})
      with open(self.logs[i], "w") as f:
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "tda.run", f"--config={CONFIG}", f"--workdir={workdir}",
             f"--config.stages={stages}", *overrides],
            cwd=ROOT, env=_env({**env, **dist}, DEVICES), stdout=f, stderr=subprocess.STDOUT))
    self.t0 = time.time()
    self.rc: list[int | None] = [None] * n
    self.maxrss_mb: list[float | None] = [None] * n

  def poll(self) -> bool:
    """Reaps exited processes (with their peak RSS); True when all have exited."""
    for i, p in enumerate(self.procs):
      if self.rc[i] is None:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
          p.returncode = self.rc[i] = os.waitstatus_to_exitcode(status)
          self.maxrss_mb[i] = ru.ru_maxrss / 1024  # KiB on Linux.
    return all(r is not None for r in self.rc)

  def hwm_mb(self) -> list[float | None]:
    """Each live process's peak RSS so far (VmHWM)."""
    out = []
    for i, p in enumerate(self.procs):
      try:
        with open(f"/proc/{p.pid}/status") as f:
          line = next(l for l in f if l.startswith("VmHWM:"))
        out.append(int(line.split()[1]) / 1024 if self.rc[i] is None else None)
      except (OSError, StopIteration):
        out.append(None)
    return out

  def wait(self, timeout: float) -> None:
    deadline = time.time() + timeout
    while not self.poll():
      if time.time() > deadline:
        self.kill()
        raise RuntimeError(f"timed out after {timeout} s; logs: {self.logs}")
      time.sleep(0.2)
    self.check()

  def check(self) -> None:
    bad = [i for i, r in enumerate(self.rc) if r != 0]
    if bad:
      with open(self.logs[bad[0]]) as f:
        tail = f.read()[-3000:]
      raise RuntimeError(f"process {bad[0]} exited with {self.rc[bad[0]]}:\n{tail}")

  def kill(self) -> None:
    for i, p in enumerate(self.procs):
      if self.rc[i] is None:
        p.send_signal(signal.SIGKILL)
    while not self.poll():
      time.sleep(0.1)

  @property
  def wall_s(self) -> float:
    return time.time() - self.t0


def _free_port() -> int:
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def committed_shards(emulator: dict[str, str], prefix: str) -> list[str] | None:
  """Committed shard folders of the table under `prefix` in the emulator's bucket
  (None when the emulator, busy serving the run, does not answer in time)."""
  url = (f"{emulator['STORAGE_EMULATOR_HOST']}/storage/v1/b/{gcs_emulator.BUCKET}/o?"
         + urllib.parse.urlencode({"prefix": prefix}))
  names = []
  try:
    while True:
      with urllib.request.urlopen(url, timeout=30) as r:
        page = json.load(r)
      names += [o["name"] for o in page.get("items", [])]
      if not page.get("nextPageToken"):
        break
      url = url.split("&pageToken=")[0] + "&pageToken=" + page["nextPageToken"]
  except OSError:
    return None
  from tda import tables as tables_lib  # pylint: disable=g-import-not-at-top
  return sorted(n.rsplit("/", 2)[-2] for n in names if n.endswith("/" + tables_lib.COMMIT))


# --- The rehearsal ------------------------------------------------------------------

def rehearse(*, rows: int, local: str, train_steps: int, timeout: float,
             pretrained: str | None = None) -> dict:
  from tda import fs  # pylint: disable=g-import-not-at-top
  from tda import index as index_lib
  from tda import tables as tables_lib
  from tda import workdir as wd
  import numpy as np

  logs = os.path.join(local, "logs")
  os.makedirs(logs, exist_ok=True)
  walls = {}

  t0 = time.time()
  if pretrained:
    pre = pretrained
    for stage in ("vocab", "train"):
      if wd.committed(pre, stage) is None:
        raise ValueError(f"--pretrained={pre} has no committed {stage!r} stage")
    log(f"1. reusing the model and vocabulary of {pre}")
  else:
    pre = os.path.join(local, "pretrain")
    log(f"1. training a small model ({train_steps} steps) in {pre}")
    Job(workdir=pre, stages="world,vocab,train", n=1, env={}, logdir=logs, name="pretrain",
        overrides=[f"--config.train.steps={train_steps}",
                   f"--config.train.checkpoint_every={train_steps}"]).wait(timeout)
  walls["pretrain"] = time.time() - t0

  t0 = time.time()
  log(f"2. building a C4-format TFDS dataset of {rows} passages")
  tfds_folder = build_tfds(os.path.join(local, "tfds"), rows)
  walls["tfds_build"] = time.time() - t0

  rows_per_shard = max(64, rows // 32)
  leaves = max(4, int(round((rows + 2000) ** 0.5)))
  overrides = [
      "--config.data.source=tfds", f"--config.data.tfds_name={tfds_folder}",
      f"--config.data.vocab_path={os.path.join(pre, 'vocab', 'spm.model')}",
      f"--config.model.checkpoint={os.path.join(pre, 'train', 'checkpoints')}",
      "--config.eval.methods=('trackstar',)", "--config.trend.sizes=()",
      f"--config.tables.rows_per_shard={rows_per_shard}",
      "--config.index.method=scann", f"--config.index.num_leaves={leaves}",
      f"--config.index.num_leaves_to_search={max(1, leaves // 5)}",
      "--config.index.reorder=100"]

  with gcs_emulator.running() as emu:
    os.environ.update(emu)  # This process reads the bucket too.
    run = f"gs://{gcs_emulator.BUCKET}/run"
    common = dict(overrides=overrides, env=emu, logdir=logs)

    t0 = time.time()
    log(f"3a. {PROCESSES} processes x {DEVICES} devices: world .. gradients on {run}")
    Job(workdir=run, stages="world,vocab,train,gradients", n=PROCESSES, name="upstream",
        **common).wait(timeout)
    walls["upstream"] = time.time() - t0

    t0 = time.time()
    log("3b. tables, SIGKILLing process 1 once two shards are committed")
    job = Job(workdir=run, stages="tables", n=PROCESSES, name="tables_killed", **common)
    prefix = f"run/tables/{TABLE}/shards/"
    done: list[str] = []
    while len(done) < 2:
      if job.poll():
        job.check()
        raise RuntimeError("the tables stage finished before two shards were committed: "
                           "raise --rows")
      if job.wall_s > timeout:
        job.kill()
        raise RuntimeError("no two shards committed in time")
      done = committed_shards(emu, prefix) or done
      time.sleep(0.2)
    job.procs[1].send_signal(signal.SIGKILL)
    deadline = time.time() + 20
    while job.rc[0] is None and time.time() < deadline:
      job.poll()
      time.sleep(0.2)
    other = ("exited by itself" if job.rc[0] is not None else "SIGKILLed after 20 s")
    job.kill()
    killed_ok = job.rc[1] == -signal.SIGKILL
    at_kill = committed_shards(emu, prefix) or []
    stage_committed_at_kill = wd.committed(run, "tables") is not None
    walls["tables_until_kill"] = time.time() - t0
    log(f"   killed: {len(at_kill)} shards committed; process 0 {other} (rc {job.rc[0]})")
    mtimes = {}
    for s in at_kill:
      with fs.open(f"{run}/tables/{TABLE}/shards/{s}/{tables_lib.COMMIT}") as f:
        mtimes[s] = f.read()

    t0 = time.time()
    log("3c. tables again (resume), sampling peak RSS at a quarter of its rows and at the end")
    job = Job(workdir=run, stages="tables", n=PROCESSES, name="tables_resumed", **common)
    quarter, quarter_shards = None, None
    progress = []  # (time, committed shards) while new shards appear.
    while not job.poll():
      hwm = job.hwm_mb()
      c = committed_shards(emu, prefix)
      if c is not None and len(c) > (progress[-1][1] if progress else len(at_kill)):
        progress.append((time.time(), len(c)))
      if quarter is None:
        if c is not None and (len(c) - len(at_kill)) * rows_per_shard >= (
            rows - len(at_kill) * rows_per_shard) / 4:
          quarter, quarter_shards = list(hwm), len(c)
          log(f"   a quarter of the remaining rows committed ({len(c)} shards): VmHWM "
              f"{quarter} MB")
      if job.wall_s > timeout:
        job.kill()
        raise RuntimeError("the resumed tables stage did not finish in time")
      time.sleep(0.5)
    job.check()
    walls["tables_resumed"] = time.time() - t0
    c = committed_shards(emu, prefix) or []
    progress.append((time.time(), len(c)))
    # Throughput once both processes compute: from the first shard the resumed run
    # committed to the end (compilation and start-up excluded), per process.
    (ta, ca), (tb, cb) = progress[0], progress[-1]
    rate = (cb - ca) * rows_per_shard / max(tb - ta, 1e-9) / PROCESSES if cb > ca else None
    full = job.maxrss_mb
    summary = wd.read_json(f"{run}/tables/{wd.SUMMARY}")
    resumed_ok = (killed_ok and 2 <= len(at_kill) and not stage_committed_at_kill
                  and wd.committed(run, "tables") is not None)
    for s, rec in mtimes.items():  # Committed shards were not rewritten.
      with fs.open(f"{run}/tables/{TABLE}/shards/{s}/{tables_lib.COMMIT}") as f:
        resumed_ok &= f.read() == rec

    t0 = time.time()
    log("3d. retrieval with ScaNN")
    Job(workdir=run, stages="retrieval", n=PROCESSES, name="retrieval", **common).wait(timeout)
    walls["retrieval"] = time.time() - t0
    scann = wd.read_json(f"{run}/retrieval/{TABLE}.json")["top_ids"]
    table = tables_lib.Table.open(f"{run}/tables/{TABLE}")
    table.verify()
    queries = fs.load_npy(f"{run}/gradients/queries_final_{TABLE}.npy")
    exact = index_lib.search_table(table=table, queries_qd=queries, k=10, method="exact")
    excluded = set(summary["excluded_ids"])
    recall = float(np.mean([
        len(set(s[:10]) & {i for i in e if i not in excluded}) / 10
        for s, e in zip(scann, exact.top_ids)]))
    ids_2p, x_2p = table.read_all()

    t0 = time.time()
    ref = os.path.join(local, "reference")
    log(f"4. the reference: upstream copied to {ref}, tables as 1 process")
    for stage in ("world", "vocab", "train", "gradients"):
      fs.copy_tree(f"{run}/{stage}", os.path.join(ref, stage))
    Job(workdir=ref, stages="tables", n=1, name="reference", overrides=overrides, env={},
        logdir=logs).wait(timeout)
    walls["reference_tables"] = time.time() - t0
    ref_summary = wd.read_json(os.path.join(ref, "tables", wd.SUMMARY))
    ids_1p, x_1p = tables_lib.Table.open(os.path.join(ref, "tables", TABLE)).read_all()

  q_mb = max(x for x in quarter if x is not None) if quarter else None
  f_mb = max(x for x in full if x is not None)
  return {
      "processes": PROCESSES, "devices_per_process": DEVICES, "workdir": run,
      "rows": int(summary["rows"]), "passages": rows, "rows_per_shard": rows_per_shard,
      "rows_per_s_per_process": rate,
      "rows_per_s_one_process_incl_compile": ref_summary["rows_per_s_process0"],
      "peak_rss_mb_quarter": q_mb, "peak_rss_mb_full": f_mb,
      "peak_rss_mb_per_process": {"quarter": quarter, "full": full},
      "shards_committed_at_quarter": quarter_shards,
      "rss_ratio": None if not q_mb else f_mb / q_mb,
      "killed_and_resumed": bool(resumed_ok),
      "shards_committed_at_kill": len(at_kill), "other_process_after_kill": other,
      "rows_featurised_after_resume_process0": summary["featurised_rows_this_run_process0"],
      "tables_equal": bool(ids_2p == ids_1p and x_2p.shape == x_1p.shape
                           and x_2p.tobytes() == x_1p.tobytes()),
      "scann_recall_at_10": recall, "scann_leaves": leaves,
      "scann_leaves_searched": max(1, leaves // 5),
      "n_truncated_passages": summary["n_truncated_passages"],
      "wall_s": {k: round(v, 1) for k, v in walls.items()},
  }


def _report(rep) -> None:
  """The report, a line a field."""
  for k, v in rep.items():
    print(f"{k:40s} {v}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _ROWS.value < 256:
    raise app.UsageError(f"--rows must be at least 256 (two table shards before the kill), "
                         f"got {_ROWS.value}")
  local = _KEEP.value or tempfile.mkdtemp(prefix="rehearse_pod_")
  os.makedirs(local, exist_ok=True)
  try:
    cli.emit(as_json=_JSON.value,
             measure=lambda: rehearse(rows=_ROWS.value, local=local,
                                      train_steps=_TRAIN_STEPS.value,
                                      timeout=_TIMEOUT.value, pretrained=_PRETRAINED.value),
             report=_report)
  finally:
    if not _KEEP.value:
      shutil.rmtree(local, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)

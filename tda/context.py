"""What a stage reads: the run's config, its workdir, and typed accessors to the
committed outputs of earlier stages (each loaded lazily, once per run).

A stage never opens another stage's files or imports its internals; it asks the
context (`ctx.world`, `ctx.arrays`, `ctx.trained`, `ctx.second_moments`, `ctx.gradients`, `ctx.table(...)`,
`ctx.rankings`, ...). Each accessor calls the owning stage module's `load`, so a
stage's file layout is written and read in one module.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import ml_collections

from tda import fs
from tda import verify
from tda import workdir as wd


@dataclasses.dataclass
class Context:
  """One run's config, workdir, stage timings and lazily loaded upstream outputs."""
  config: ml_collections.ConfigDict
  workdir: str
  timings: dict[str, float] = dataclasses.field(default_factory=dict)
  _cache: dict[str, Any] = dataclasses.field(default_factory=dict)

  def cached(self, key: str, make: Callable[[], Any]) -> Any:
    """`make()`, computed once per run under `key`."""
    if key not in self._cache:
      self._cache[key] = make()
    return self._cache[key]

  # --- Committed stages --------------------------------------------------------

  def stage_dir(self, stage: str) -> str:
    """The committed folder of `stage` (a clear error when it is not committed),
    checked once per run against its commit record (`tda.verify.check_stage`)."""
    if wd.committed(self.workdir, stage) is None:
      raise FileNotFoundError(
          f"stage '{stage}' is not committed in {self.workdir}: run it first "
          f"(--config.stages must include it, or an earlier run must have).")
    self.cached(f"verified:{stage}", lambda: verify.check_stage(self.workdir, stage))
    return wd.stage_dir(self.workdir, stage)

  def summary(self, stage: str) -> dict[str, Any]:
    """The committed `summary.json` of `stage`."""
    return verify.read_json(self.stage_dir(stage), wd.SUMMARY)

  def upstream(self, *stages: str) -> dict[str, str]:
    """{stage: digest of its committed fingerprint}: for a downstream fingerprint,
    so a stage reruns (or is refused) when anything it was computed from changed."""
    def fp(s):
      marker = wd.committed(self.workdir, s)
      return {"fingerprint": marker["fingerprint"]} if marker else {}
    return {s: wd.digest(fp(s)) for s in stages}

  @property
  def results_dir(self) -> str:
    """`<workdir>/results/`: where committed stages publish their `results/` files."""
    return os.path.join(self.workdir, "results")

  # --- Typed accessors ---------------------------------------------------------

  @property
  def world(self):
    """The committed `tda.world.World`."""
    from tda.stages import world
    return self.cached("world", lambda: world.load(self))

  @property
  def vocab_path(self) -> str:
    """The vocabulary of this run: a SentencePiece model file, or a Hugging Face
    checkpoint folder whose tokenizer it is (`tda.data.get_vocabulary`)."""
    from tda.stages import vocab
    # A local file: SentencePiece reads local files only (a gs:// workdir's copy).
    return self.cached("vocab_path", lambda: fs.local_file(vocab.load(self)))

  @property
  def vocab(self):
    """The run's seqio vocabulary."""
    from tda import data
    return self.cached("vocab", lambda: data.get_vocabulary(self.vocab_path))

  @property
  def arrays(self):
    """(CorpusArrays, QueryArrays): the world tokenised with the run's vocabulary.
    With a streamed corpus (`tda.corpus`): (None, QueryArrays); read the corpus
    through `ctx.corpus`."""
    from tda import corpus as corpus_lib
    from tda import data
    if corpus_lib.streamed(self.config):
      return self.cached("arrays", lambda: (None, data.world_queries(
          world_dir=self.stage_dir("world"), vocab_path=self.vocab_path,
          seq_len=self.config.data.seq_len)))
    return self.cached("arrays", lambda: data.world_arrays(
        world_dir=self.stage_dir("world"), vocab_path=self.vocab_path,
        seq_len=self.config.data.seq_len))

  @property
  def corpus(self):
    """The training corpus (`tda.corpus.Corpus`): the world's passages in memory, or
    the streamed source `data.source` names."""
    from tda import corpus as corpus_lib

    def make():
      if not corpus_lib.streamed(self.config):
        return corpus_lib.WorldCorpus(
            arrays=self.arrays[0], texts=[p["text"] for p in self.world.passages],
            world_digest=self.upstream("world")["world"])
      from tda.stages import world
      paths = world.trex_paths(self) if self.config.data.local_standin else None
      return corpus_lib.from_config(self.config, paths=paths)
    return self.cached("corpus", make)

  def corpus_rows(self, rows) -> tuple[list[str], "np.ndarray"]:
    """(ids, int32 [n, seq_len] tokens) of the given corpus rows, in that order."""
    r = self.corpus.take(rows, vocab=self.vocab, seq_len=self.config.data.seq_len)
    return r.ids, r.tokens_nt

  @property
  def checkpoint_dir(self) -> str:
    """The orbax checkpoints every model-reading stage uses: the train stage's own,
    or the external `model.checkpoint` it adopted."""
    from tda.stages import train
    return train.load(self).dir

  @property
  def checkpoint_steps(self) -> list[int]:
    """The steps usable (e.g. by the trend): all saved ones, up to the attributed one."""
    from tda.stages import train
    return train.load(self).steps

  @property
  def checkpoint_step(self) -> int:
    """The step of the checkpoint attributed (the final one, or `model.checkpoint_step`)."""
    from tda.stages import train
    return train.load(self).step

  @property
  def trained(self):
    """(model, TrainState, meta) of the final checkpoint."""
    return self.cached("trained", lambda: self.restore(None))

  def restore(self, step: int | None):
    """(model, TrainState, meta) of the checkpoint at `step` (None: the attributed one)."""
    from tda import train as train_lib
    from tda.stages import train
    ckpt = train.load(self)
    return train_lib.load_trained(self.config, ckpt.dir, ckpt.step if step is None else step)

  @property
  def second_moments(self):
    """The optax state V is read from when `gradients.v_source='estimate'` (stage
    'second_moments'); None: the checkpoint's own optimizer state."""
    from tda.stages import second_moments
    return self.cached("second_moments", lambda: second_moments.load(self))

  @property
  def engine(self):
    """The gradient engine (`tda.featurize.Engine`) of the final checkpoint."""
    from tda import featurize
    from tda import methods as methods_lib

    def make():
      model, state, _ = self.trained
      return featurize.make_engine(
          self.config, model=model, state=state,
          variants=tuple(methods_lib.variants(self.config.eval.methods)) or None,
          second_moments=(self.second_moments if self.config.gradients.correction
                          else None))
    return self.cached("engine", make)

  @property
  def predictions(self) -> dict[str, dict[str, Any]]:
    """The model's per-query results (`model_eval`), keyed by example id."""
    from tda.stages import model_eval
    return self.cached("predictions", lambda: model_eval.load(self))

  @property
  def gradients(self):
    """The `gradients` stage's outputs (`tda.stages.gradients.Outputs`)."""
    from tda.stages import gradients
    return self.cached("gradients", lambda: gradients.load(self))

  def table(self, name: str):
    """The committed gradient table `name`, checked against what it must hold."""
    from tda.stages import tables
    return tables.load(self, name)

  @property
  def excluded_ids(self) -> set[str]:
    """Passages whose gradients were non-finite: in no table's results."""
    from tda.stages import tables
    return tables.excluded_ids(self)

  @property
  def rankings(self) -> dict[str, dict[str, Any]]:
    """Every method's proponents and opponents (`retrieval`), keyed by method."""
    from tda.stages import retrieval
    return self.cached("rankings", lambda: retrieval.load(self))

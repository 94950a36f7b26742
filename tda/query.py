"""Trace a prompt of your own: its proponents and opponents in a finished run.

    python -m tda.query --workdir=W --prompt="Ada Laurent was born in the city of" \
        [--target="Paris"] [--k=10] [--method=trackstar] [--per_token] [--json]
    python -m tda.query --workdir=W --queries=file.jsonl [--json]

G(query) is computed exactly as the run computed its evaluation queries' vectors
(DESIGN.md §2): the run's checkpoint, projection (plan and seed), V correction
(`tda.featurize.make_engine`), and the method's R^{-1/2} as the 'gradients'
stage committed it (`ctx.gradients.whitener`: loaded, never refitted); then the
run's table is searched (exact, or ScaNN with exact reordering, as
`index.method` says) with the retrieval stage's rule for excluded passages.
Without a target, the model's greedy continuation of the prompt (up to
`model_eval.max_new_tokens` tokens, cut at the first newline or sentence-ending
period) is the target, and the result says so (`target_source`).

Per-token attribution (`per_token`): the target's loss is a sum over its tokens,
so the projected, corrected gradient φ = P(∇ Σ_t NLL_t ⊘ sqrt(V)) is the sum of
the per-token φ_t = P(∇ NLL_t ⊘ sqrt(V)) (gradient, correction and projection
are linear), and so is its whitened form: R^{-1/2} φ = Σ_t R^{-1/2} φ_t. A
proponent's score is ⟨R^{-1/2} φ, G(z_m)⟩ / ‖R^{-1/2} φ‖ (unit methods; no
division otherwise); its per-token score is ⟨R^{-1/2} φ_t, G(z_m)⟩ divided by
the same sequence norm, so the per-token scores sum to the score shown.

The run's config comes from `--config` (the run's config file and overrides),
else is rebuilt from the stages' committed fingerprints (each records the
config sections its output depends on); either way the fingerprints of the
stages read (train, gradients, tables, retrieval) are recomputed and must equal
the committed ones, so a query never mixes a model, projection or R from
different setups.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from tda import config as config_lib
from tda import context as context_lib
from tda import featurize
from tda import hessian
from tda import index as index_lib
from tda import methods as methods_lib
from tda import model as model_lib
from tda import model_eval
from tda import sharding
from tda import tables as tables_lib
from tda import workdir as wd

# Stages a query reads; all must be committed (a finished run through retrieval).
NEEDED_STAGES = ("world", "vocab", "train", "gradients", "tables", "retrieval")
TIMING_KEYS = ("tokenise", "generate", "gradient", "whitening", "search", "text")
TARGET_GIVEN, TARGET_GREEDY = "given", "greedy_continuation"


class QueryError(ValueError):
  """A request that cannot be answered as asked (bad prompt, method, k, ...)."""


class WorkdirNotReady(RuntimeError):
  """The workdir lacks committed stages a query reads."""


# --- The run's config ----------------------------------------------------------

def _set(node: ml_collections.ConfigDict, values: dict[str, Any]) -> None:
  for k, v in values.items():
    if k not in node:
      continue  # A key of another code version: the fingerprint check decides.
    if isinstance(node[k], ml_collections.ConfigDict) and isinstance(v, dict):
      _set(node[k], v)
    elif isinstance(node[k], tuple) and isinstance(v, list):
      node[k] = tuple(tuple(x) if isinstance(x, list) else x for x in v)
    else:
      with node.ignore_type():
        node[k] = v


def config_from_workdir(workdir: str) -> ml_collections.ConfigDict:
  """The run's config, rebuilt from its stages' committed fingerprints.

  Each stage's fingerprint records the config sections its output depends on;
  keys no stage read (mesh, plan) keep their defaults. `check_workdir` then
  recomputes the fingerprints from this config and compares.
  """
  fp = {s: (wd.committed(workdir, s) or {}).get("fingerprint") for s in
        ("world", "vocab", "train", "second_moments", "model_eval", "gradients",
         "tables", "retrieval", "evaluation")}
  c = config_lib.base_config()
  if fp["world"]:
    _set(c.world, fp["world"])
  if fp["vocab"]:
    if "vocab_path" in fp["vocab"]:
      c.data.vocab_path = fp["vocab"]["vocab_path"]
    else:
      c.data.vocab_size = fp["vocab"]["vocab_size"]
  if fp["train"]:
    t = fp["train"]
    model = dict(t.get("model", {}))
    if model.get("vocab_size") == c.data.vocab_size:
      model["vocab_size"] = -1  # The config's "take data.vocab_size".
    _set(c.model, model)
    _set(c.train, t.get("train", {}))
    if "seed" in t:
      c.seed = t["seed"]
    c.data.seq_len = t.get("data.seq_len", c.data.seq_len)
    ext = t.get("external_checkpoint")
    if ext:
      c.model.checkpoint, c.model.checkpoint_step = ext["path"], ext["step"]
  if fp["second_moments"]:
    c.gradients.v_source = fp["second_moments"].get("v_source", c.gradients.v_source)
  if fp["model_eval"]:
    _set(c.model_eval, fp["model_eval"]["model_eval"])
  if fp["gradients"]:
    _set(c.gradients, fp["gradients"]["gradients"])
    _set(c.hessian, fp["gradients"]["hessian"])
  if fp["tables"]:
    _set(c.tables, fp["tables"]["tables"])
  if fp["evaluation"]:
    _set(c.eval, fp["evaluation"]["eval"])
  if fp["retrieval"]:
    _set(c.index, fp["retrieval"]["index"])
    c.eval.methods = tuple(fp["retrieval"]["methods"])
  return config_lib.finalize(c)


def check_finished(workdir: str) -> None:
  """Raises WorkdirNotReady unless every stage a query reads is committed."""
  missing = [s for s in NEEDED_STAGES if wd.committed(workdir, s) is None]
  if missing:
    raise WorkdirNotReady(
        f"{workdir} is not a finished run: stage(s) {', '.join(missing)} not "
        "committed. Run `python -m tda.run --config=... --workdir=W` to the end "
        "(at least through 'retrieval') first.")


def check_workdir(ctx: context_lib.Context) -> None:
  """Raises WorkdirNotReady (a stage is not committed) or WorkdirConflict (the
  config does not reproduce a committed fingerprint, naming the keys)."""
  from tda import stages as stages_lib
  check_finished(ctx.workdir)
  by_name = {s.STAGE: s for s in stages_lib.STAGES}
  for name in ("train", "gradients", "tables", "retrieval"):
    try:
      wd.check_fingerprint(ctx.workdir, name, by_name[name].fingerprint(ctx))
    except wd.WorkdirConflict as e:
      raise wd.WorkdirConflict(
          f"the config does not reproduce the run in {ctx.workdir}: {e} Pass the run's "
          "own --config (file and overrides).") from e


# --- Requests and results --------------------------------------------------------

@dataclasses.dataclass
class Request:
  """One prompt to trace."""
  prompt: str
  target: str | None = None
  method: str = "trackstar"
  k: int = 10
  per_token: bool = False
  id: str | None = None  # Echoed in the result (e.g. a --queries line's id).


def _hit(rank: int, pid: str, score: float, text: str) -> dict[str, Any]:
  return {"rank": rank, "id": pid, "score": float(score), "text": text}


# --- The engine ----------------------------------------------------------------

def _cut_continuation(text: str) -> str:
  """The greedy continuation up to its first newline or sentence-ending period."""
  text = text.split("\n", 1)[0]
  for i, ch in enumerate(text):
    if ch == "." and (i + 1 == len(text) or text[i + 1].isspace()):
      return text[:i].strip()
  return text.strip()



class _PassageTexts(dict):
  """Passage id -> text: the world's in memory, or read from a streamed corpus on
  first use (`tda.corpus.Corpus.lookup`) and kept."""

  def __init__(self, ctx):
    from tda import corpus as corpus_lib  # pylint: disable=g-import-not-at-top
    super().__init__()
    self._ctx = ctx
    self._streamed = corpus_lib.streamed(ctx.config)
    if not self._streamed:
      self.update((p["id"], p["text"]) for p in ctx.world.passages)

  def __missing__(self, pid: str) -> str:
    if not self._streamed:
      raise KeyError(pid)
    self.update(self._ctx.corpus.lookup([pid]))
    return dict.__getitem__(self, pid)

class Engine:
  """A finished run, loaded once: model, projection, V correction, whiteners and
  tables; `trace` answers requests in batches through the run's own kernel.

  Thread safety: `trace` holds a lock, so device work is serialized.
  """

  def __init__(self, *, workdir: str, config: ml_collections.ConfigDict | None = None,
               batch_size: int = 8, max_prompt_chars: int = 2000, max_k: int = 100,
               length_bucket: int = 0):
    self.workdir = workdir
    self.strict_meta = config is not None
    config = config if config is not None else config_from_workdir(workdir)
    self.ctx = context_lib.Context(config=config, workdir=workdir)
    check_workdir(self.ctx)
    self.config = config
    self.max_prompt_chars, self.max_k = max_prompt_chars, max_k
    self._lock = threading.Lock()
    self.methods = methods_lib.gradient(config.eval.methods)
    self.tables = {m: t for t, ms in methods_lib.table_groups(self.methods).items() for m in ms}
    t0 = time.time()
    import sentencepiece as spm
    self.sp = spm.SentencePieceProcessor(model_file=self.ctx.vocab_path)
    model, state, _ = self.ctx.trained
    self.seq_len = min(config.data.seq_len, model_lib.model_config(config).max_len)
    self.batch_size = max(1, batch_size)
    self.length_bucket = length_bucket or self.seq_len
    self.engine = featurize.make_engine(
        config, model=model, state=state,
        variants=tuple(methods_lib.variants(self.methods)) or None,
        second_moments=self.ctx.second_moments if config.gradients.correction else None)
    self.max_new_tokens = config.model_eval.max_new_tokens
    self._params = sharding.gather(state.params)
    self._decode = model_eval.make_decoder(model, steps=self.max_new_tokens)
    self.passages = _PassageTexts(self.ctx)
    self._excluded = self.ctx.excluded_ids
    self._whiteners: dict[str, np.ndarray | None] = {}
    self._searchers: dict[str, index_lib.TableSearcher] = {}
    self.load_s = time.time() - t0

  # --- Loading --------------------------------------------------------------
  def _table(self, table: str) -> tables_lib.Table:
    if self.strict_meta:
      return self.ctx.table(table)
    from tda.stages import tables as tables_stage
    meta = tables_stage.meta(self.ctx, table)
    # Rebuilt configs may differ in keys no stage read (the hash covers whole
    # sections); the fingerprints were checked, the rest of the meta is here.
    meta.pop("config_hash")
    return tables_lib.Table.open(os.path.join(self.ctx.stage_dir("tables"), table),
                                 expect=meta)

  def searcher(self, method: str) -> index_lib.TableSearcher:
    """The method's table searcher (loaded on first use)."""
    table = self.tables[method]
    if table not in self._searchers:
      ix = self.config.index
      self._searchers[table] = index_lib.TableSearcher(
          table=self._table(table), excluded=self._excluded, method=ix.method,
          index_params=index_lib.index_params_from_config(ix))
      w = self.ctx.gradients.whitener(table)
      # On the device once (not per request); float64 on the host for per-token scores.
      self._whiteners[table] = (None if w is None else
                                (jax.device_put(w), w.astype(np.float64)))
    return self._searchers[table]

  def warm_up(self, methods: Sequence[str] | None = None, *,
              all_lengths: bool = False) -> float:
    """Loads tables and compiles the kernels (for one-row requests; with
    `all_lengths`, at every length bucket up to the sequence length); seconds."""
    t0 = time.time()
    lengths = (range(self.length_bucket, self.seq_len + 1, self.length_bucket)
               if all_lengths else [self.length_bucket])
    with self._lock:
      self._greedy(["The"])
      for t in lengths:  # A request's rows: loss on its target's last tokens only.
        mask = np.zeros((1, t), np.float32)
        mask[:, -1] = 1.0
        self._featurize(np.full((1, t), 3, np.int32), mask)
    for m in methods or self.methods:
      self.trace([Request(prompt="The", target="a", method=m, k=1)])
    return time.time() - t0

  # --- Validation -----------------------------------------------------------
  def check(self, r: Request) -> None:
    """Raises QueryError naming what is wrong with a request."""
    check_request(r, methods=self.methods, max_k=self.max_k,
                  max_prompt_chars=self.max_prompt_chars)

  # --- Tokenisation ---------------------------------------------------------
  def _tokens(self, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Prompt and target tokens as `tda.data.tokenized_queries` makes them (the
    model sees `prompt + " " + target`), with its consistency check."""
    p, t = self.sp.encode(prompt), self.sp.encode(target)
    if not t:
      raise QueryError(f"the target {target!r} tokenises to nothing")
    if len(p) + len(t) > self.seq_len:
      raise QueryError(f"prompt + target is {len(p) + len(t)} tokens, longer than the "
                       f"run's sequence length {self.seq_len}")
    if p + t != self.sp.encode(f"{prompt} {target}"):
      raise QueryError(f"the tokens of the prompt and target taken apart differ from "
                       f"those of {prompt + ' ' + target!r}")
    return p, t

  def _greedy(self, prompts: list[str]) -> list[str]:
    """Each prompt's greedy continuation, cut at the first newline/period."""
    toks = [self.sp.encode(p) for p in prompts]
    longest = max(len(t) for t in toks)
    if longest + self.max_new_tokens > self.seq_len:
      raise QueryError(f"the prompt is {longest} tokens; with {self.max_new_tokens} "
                       f"generated tokens it exceeds the sequence length {self.seq_len}")
    # Few compiled shapes: the prompt buffer rounded up to the length bucket, rows
    # to a power of two.
    length = min(-(-longest // self.length_bucket) * self.length_bucket,
                 self.seq_len - self.max_new_tokens)
    out = []
    for sl, _ in _batches(len(toks), self.batch_size):
      bs = 1 << (sl.stop - sl.start - 1).bit_length()
      buf = np.zeros((bs, length), np.int32)
      lens = np.ones((bs,), np.int32)
      for j, t in enumerate(toks[sl]):
        buf[j, :len(t)] = t
        lens[j] = len(t)
      gen = np.asarray(self._decode(self._params, buf, lens, jax.random.key(0)))
      for j in range(sl.stop - sl.start):
        g = [int(x) for x in gen[j]]
        if 1 in g:  # EOS.
          g = g[:g.index(1)]
        out.append(_cut_continuation(self.sp.decode([x for x in g if x > 2])))
    return out

  # --- Tracing --------------------------------------------------------------
  def trace(self, requests: Sequence[Request]) -> list[dict[str, Any]]:
    """Answers every request (one batch through the kernel); see the module doc.

    Returns:
      One dict per request: prompt, target, target_source, method, k,
      proponents and opponents ([{rank, id, score, text}], per_token scores
      when asked), target_tokens (per_token), timings (seconds, per batch).

    Raises:
      QueryError: a request is malformed (checked before any work).
    """
    requests = list(requests)
    if not requests:
      raise QueryError("no requests")
    for r in requests:
      self.check(r)
    with self._lock:
      return self._trace(requests)

  def _featurize(self, tokens_nt: np.ndarray, mask_nt: np.ndarray) -> dict[str, Any]:
    """Every row's projected gradients ('raw'/'corrected', 'loss', 'bad_rows':
    non-finite rows) through the run's jitted kernel (`Featurizer.run_batch`) at
    few shapes: at most `batch_size` rows a call, padded to a power of two (and
    to the data axis), all at the longest row's length rounded up to
    `length_bucket`. A request is one row (plus one per target token)."""
    feat = self.engine.featurizer
    n = len(tokens_nt)
    used = (tokens_nt != 0).any(axis=0)
    longest = int(np.flatnonzero(used)[-1]) + 1 if used.any() else 2
    t = int(model_lib.bucket_lengths([longest], multiple=self.length_bucket,
                                     max_len=tokens_nt.shape[1])[0])
    out: dict[str, Any] = {}
    for s in range(0, n, self.batch_size):
      m = min(self.batch_size, n - s)
      b = sharding.pad_to_multiple(1 << (m - 1).bit_length(), feat.mesh)
      tok = np.zeros((b, t), np.int32)
      msk = np.zeros((b, t), np.float32)
      tok[:m], msk[:m] = tokens_nt[s:s + m, :t], mask_nt[s:s + m, :t]
      for key, v in feat.run_batch(tok, msk).items():
        if key not in out:
          out[key] = np.zeros((n,) + v.shape[1:], np.float32)
        out[key][s:s + m] = np.asarray(v)[:m]
    finite = np.ones(n, bool)
    for v in out.values():
      finite &= np.isfinite(v.reshape(n, -1)).all(axis=1)
    out["bad_rows"] = np.flatnonzero(~finite)
    return out

  def _trace(self, requests: list[Request]) -> list[dict[str, Any]]:
    tm = dict.fromkeys(TIMING_KEYS, 0.0)
    t_all = time.perf_counter()
    prompts = [r.prompt.rstrip() for r in requests]
    greedy = [i for i, r in enumerate(requests) if r.target is None]
    targets = [None if r.target is None else r.target.strip() for r in requests]
    if greedy:
      t0 = time.perf_counter()
      for i, cont in zip(greedy, self._greedy([prompts[i] for i in greedy])):
        if not cont:
          raise QueryError(f"the model's greedy continuation of {prompts[i]!r} is empty "
                           "before its first newline/period; give a target")
        targets[i] = cont
      tm["generate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    toks = [self._tokens(p, t) for p, t in zip(prompts, targets)]
    # Rows: each request's sequence, then (per_token) one row per target token.
    rows, masks, owner = [], [], []
    for i, ((p, t), r) in enumerate(zip(toks, requests)):
      seq = p + t
      full = [0.0] * len(p) + [1.0] * len(t)
      rows.append(seq), masks.append(full), owner.append((i, -1))
      if r.per_token:
        for j in range(len(t)):
          one = [0.0] * len(seq)
          one[len(p) + j] = 1.0
          rows.append(seq), masks.append(one), owner.append((i, j))
    width = self.seq_len  # `_featurize` trims to the length bucket.
    tokens_nt = np.zeros((len(rows), width), np.int32)
    mask_nt = np.zeros((len(rows), width), np.float32)
    for n, (s, m) in enumerate(zip(rows, masks)):
      tokens_nt[n, :len(s)], mask_nt[n, :len(m)] = s, m
    tm["tokenise"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    feats = self._featurize(tokens_nt, mask_nt)
    tm["gradient"] = time.perf_counter() - t0
    bad = set(int(b) for b in feats["bad_rows"])

    out: list[dict[str, Any] | None] = [None] * len(requests)
    by_table: dict[str, list[int]] = {}
    for i, r in enumerate(requests):
      by_table.setdefault(self.tables[r.method], []).append(i)
    seq_row = {i: n for n, (i, j) in enumerate(owner) if j < 0}
    for table, idx in by_table.items():
      t0 = time.perf_counter()
      searcher = self.searcher(requests[idx[0]].method)
      tm["search"] += time.perf_counter() - t0  # Loading counts as search (first use).
      spec = methods_lib.switches(table)
      w_dev, w64 = self._whiteners[table] or (None, None)
      t0 = time.perf_counter()
      phi = feats[spec.variant]
      final = hessian.apply(vectors_nd=phi[[seq_row[i] for i in idx]], whitener=w_dev,
                            unit=spec.unit)
      tm["whitening"] += time.perf_counter() - t0
      for i in idx:
        if seq_row[i] in bad:
          raise QueryError(f"the gradient of {prompts[i]!r} -> {targets[i]!r} is not finite")
      t0 = time.perf_counter()
      k = max(requests[i].k for i in idx)
      k = min(k, searcher.n_valid)
      ti, ts, bi, bs = searcher.search(final, k)
      tm["search"] += time.perf_counter() - t0
      t0 = time.perf_counter()
      for a, i in enumerate(idx):
        r = requests[i]
        kk = min(r.k, k)
        res = {"prompt": prompts[i], "target": targets[i],
               "target_source": TARGET_GIVEN if r.target is not None else TARGET_GREEDY,
               "method": r.method, "k": kk,
               "proponents": [_hit(n + 1, searcher.ids[row], s, self.passages[searcher.ids[row]])
                              for n, (row, s) in enumerate(zip(ti[a, :kk], ts[a, :kk]))],
               "opponents": [_hit(n + 1, searcher.ids[row], s, self.passages[searcher.ids[row]])
                             for n, (row, s) in enumerate(zip(bi[a, :kk], bs[a, :kk]))]}
        if r.per_token:
          # In float64 on the host: R^{-1/2} φ_t per token and the sequence's norm.
          tok_rows = [n for n, (o, j) in enumerate(owner) if o == i and j >= 0]
          white = lambda x: x if w64 is None else x @ w64
          scale = (np.linalg.norm(white(phi[seq_row[i]].astype(np.float64)))
                   if spec.unit else 1.0)
          white_td = white(phi[tok_rows].astype(np.float64))
          res["target_tokens"] = [self.sp.id_to_piece(int(x)) for x in toks[i][1]]
          for side, rows_k in (("proponents", ti[a, :kk]), ("opponents", bi[a, :kk])):
            x_kd = searcher.x_nd[np.asarray(rows_k)].astype(np.float64)
            contrib_jk = white_td @ x_kd.T / max(scale, 1e-300)
            for n, hit in enumerate(res[side]):
              hit["per_token"] = [float(v) for v in contrib_jk[:, n]]
        if r.id is not None:
          res["id"] = r.id
        out[i] = res
      tm["text"] += time.perf_counter() - t0
    tm["total"] = time.perf_counter() - t_all
    for res in out:
      res["timings"] = {f"{k}_s": round(v, 6) for k, v in tm.items()}
    return out


def check_request(r: Request, *, methods: Sequence[str], max_k: int,
                  max_prompt_chars: int) -> None:
  """Raises QueryError naming what is wrong with a request (before any work)."""
  if not isinstance(r.prompt, str) or not r.prompt.strip():
    raise QueryError("the prompt is empty")
  for name, text in (("prompt", r.prompt), ("target", r.target)):
    if text is not None and len(text) > max_prompt_chars:
      raise QueryError(f"the {name} is {len(text)} characters long; the limit is "
                       f"{max_prompt_chars}")
  if r.target is not None and (not isinstance(r.target, str) or not r.target.strip()):
    raise QueryError("the target is empty (omit it to trace the model's greedy "
                     "continuation)")
  if r.method not in methods:
    known = (f"; it is a {methods_lib.get(r.method).kind} baseline, not traced here"
             if r.method in methods_lib.METHODS and not methods_lib.get(r.method).is_gradient
             else "")
    raise QueryError(f"method {r.method!r} is not a gradient method of this run{known}; "
                     f"this run has {list(methods)}")
  if isinstance(r.k, bool) or not isinstance(r.k, int) or not 1 <= r.k <= max_k:
    raise QueryError(f"k must be an integer in [1, {max_k}], got {r.k!r}")


def _batches(n: int, bs: int):
  for s in range(0, n, bs):
    yield slice(s, min(s + bs, n)), bs - (min(s + bs, n) - s)


def request_from_json(obj: Any, *, default_method: str = "trackstar",
                      default_k: int = 10) -> Request:
  """A Request from a JSON object {prompt, target?, method?, k?, per_token?};
  QueryError naming the problem for anything else."""
  if not isinstance(obj, dict):
    raise QueryError(f"a request must be a JSON object, got {type(obj).__name__}")
  allowed = {"prompt", "target", "method", "k", "per_token", "id"}
  unknown = sorted(set(obj) - allowed)
  if unknown:
    raise QueryError(f"unknown field(s) {unknown}; allowed: {sorted(allowed)}")
  if "prompt" not in obj:
    raise QueryError("the request has no 'prompt'")
  for key, typ in (("prompt", str), ("target", str), ("method", str)):
    if obj.get(key) is not None and not isinstance(obj[key], typ):
      raise QueryError(f"'{key}' must be a string, got {type(obj[key]).__name__}")
  k = obj.get("k", default_k)
  if isinstance(k, bool) or not isinstance(k, int):
    raise QueryError(f"'k' must be an integer, got {json.dumps(k)}")
  pt = obj.get("per_token", False)
  if not isinstance(pt, bool):
    raise QueryError(f"'per_token' must be true or false, got {json.dumps(pt)}")
  return Request(prompt=obj["prompt"], target=obj.get("target"),
                 method=obj.get("method") or default_method, k=k, per_token=pt,
                 id=None if obj.get("id") is None else str(obj["id"]))


def format_text(res: dict[str, Any]) -> str:
  """A result as readable text (the CLI's default output)."""
  src = ("given" if res["target_source"] == TARGET_GIVEN
         else "the model's greedy continuation")
  lines = [f"prompt: {res['prompt']}", f"target ({src}): {res['target']}",
           f"method: {res['method']}"]
  if "target_tokens" in res:
    lines.append("target tokens: " + " | ".join(res["target_tokens"]))
  for side in ("proponents", "opponents"):
    lines.append(f"{side}:")
    for h in res[side]:
      text = " ".join(h["text"].split())
      lines.append(f"  {h['rank']:>3}  {h['score']:+.4f}  {h['id']}  {text[:160]}")
      if "per_token" in h:
        lines.append("       per token: " + "  ".join(
            f"{t}={v:+.4f}" for t, v in zip(res["target_tokens"], h["per_token"])))
  t = res["timings"]
  lines.append("timings (s): " + ", ".join(f"{k[:-2]} {v:.3f}" for k, v in t.items()))
  return "\n".join(lines)


def engine_from_flags(workdir: str, config=None) -> Engine:
  """An Engine with the `query` limits of the config (rebuilt or given)."""
  cfg = config if config is not None else config_from_workdir(workdir)
  q = cfg.query
  return Engine(workdir=workdir, config=config, batch_size=q.batch_size,
                max_prompt_chars=q.max_prompt_chars, max_k=q.max_k,
                length_bucket=q.length_bucket)


def _fail(message: str) -> None:
  import sys
  sys.stderr.write(f"tda.query: error: {message}\n")
  sys.exit(2)


def main(argv) -> None:
  from absl import app
  from absl import flags
  from tda import cli
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  fv = flags.FLAGS
  if not fv.workdir:
    _fail("--workdir is required")
  if (fv.prompt is None) == (fv.queries is None):
    _fail("give exactly one of --prompt or --queries")
  with cli.stdout_to_stderr(fv.json):
    try:
      if fv.queries is None:
        reqs = [Request(prompt=fv.prompt, target=fv.target, method=fv.method, k=fv.k,
                        per_token=fv.per_token)]
      else:
        reqs = []
        for n, obj in wd.iter_jsonl(fv.queries):
          try:
            r = request_from_json(obj, default_method=fv.method, default_k=fv.k)
          except QueryError as e:
            raise QueryError(f"{fv.queries} line {n}: {e}") from e
          r.per_token = r.per_token or fv.per_token
          reqs.append(r)
      if not reqs:
        raise QueryError(f"{fv.queries} holds no queries")
      check_finished(fv.workdir)
      given = _CONFIG.value if _CONFIG is not None else None
      config = given if given is not None else config_from_workdir(fv.workdir)
      for n, r in enumerate(reqs):  # Bad requests fail before the model loads.
        try:
          check_request(r, methods=methods_lib.gradient(config.eval.methods),
                        max_k=config.query.max_k,
                        max_prompt_chars=config.query.max_prompt_chars)
        except QueryError as e:
          raise QueryError(f"query {n + 1}: {e}" if fv.queries else str(e)) from e
      engine = engine_from_flags(fv.workdir, given)
      t0 = time.time()
      results = engine.trace(reqs)
      wall = time.time() - t0
    except (ValueError, WorkdirNotReady, wd.WorkdirConflict, FileNotFoundError) as e:
      _fail(str(e))
  if fv.json:
    if fv.queries is None:
      cli.print_json(results[0])
    else:
      cli.print_json({"results": results, "wall_s": wall, "load_s": engine.load_s})
  else:
    print("\n\n".join(format_text(r) for r in results))


_CONFIG = None


def _define_flags() -> None:
  global _CONFIG
  from absl import flags
  from ml_collections import config_flags
  from tda import cli
  flags.DEFINE_string("workdir", None, "A finished run's workdir.")
  flags.DEFINE_string("prompt", None, "The prompt to trace.")
  flags.DEFINE_string("target", None, "The target; default: the model's greedy "
                      "continuation of the prompt (to its first newline/period).")
  flags.DEFINE_integer("k", 10, "Proponents and opponents to return.")
  flags.DEFINE_string("method", "trackstar", "A gradient method of the run.")
  flags.DEFINE_bool("per_token", False, "Also score each proponent per target token.")
  flags.DEFINE_string("queries", None, "A JSONL file of {prompt, target?, method?, k?, "
                      "per_token?} objects, traced in one batch.")
  _CONFIG = config_flags.DEFINE_config_file(
      "config", None, "The run's config (file and overrides); default: rebuilt from "
      "the workdir's committed fingerprints.", lock_config=True)
  cli.define_json_flag()


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)

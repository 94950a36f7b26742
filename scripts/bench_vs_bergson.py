"""Side by side with bergson (EleutherAI's PyTorch TrackStar): speed and agreement.

One run, on this machine's CPU (or both sides on CUDA, `--device`):
  1. prep: the fact world (`tda.world.generate_world`, default config), a
     SentencePiece vocab trained on it, and our Llama-style model
     (`block='sequential'`, `scale_embeddings=False`; default 4 layers, d_model
     256, d_ff 688, 4 heads (MHA), tied vocab 8192 ≈ a 7.4M-parameter
     Llama, whose untied head we share) trained for `--steps` Adafactor steps on
     the world's passages (128-token documents);
  2. conversion (`tda.convert_hf.save_hf`): LlamaForCausalLM + tokenizer +
     transformers-Adafactor `optimizer.pt`; logits checked against ours;
  3. agreement: `python -m bergson build` (its CLI, through this interpreter)
     over the passages and over fact queries (prompt tokens labelled -100), and
     our factored kernel with *bergson's own* projection matrices on the same
     module set (every nn.Linear in the transformer body = our `kind == 'dense'`
     members; embeddings and LM head left out, bergson's default), the same
     Adafactor normaliser (eps 1e-30, as bergson's hooks) and the same summed
     token NLL (bergson's default `loss_reduction='sum'`). Per-example relative
     error and a norm-aware one (relative error × min(1, mean target-token NLL):
     a confident example's gradient is ~NLL times smaller than float32's
     rounding scale; see `check_agreement`) and, with `--fp64_check`, both sides
     against bergson in float64 (queries and passages); `max_score_diff` of
     unit-normalised query·passage scores, top-10 sets. Passes when passages' and
     queries' norm-aware errors are <= 1e-4 and every top-10 set is equal;
  4. speed: one long-lived worker process per side (peak RSS = its VmHWM), with
     the same thread budget (`--threads`, default 1: on a shared CPU torch's
     OpenMP threads spin against other jobs and lose ~5x, which would flatter
     us), driven in `--repeats` (>= 5) rounds of one pass per side, the order
     alternating, the 1-minute load average read around every pass. Examples/s
     of the steady state: ours after compiling every length bucket, bergson
     after a warm-up collection of 2 x batch documents (its projection matrices
     cached), then one untimed full pass on each side (the first pass also
     grows each process's heap). Excluded on both sides: imports (not timed),
     model load and data setup (`setup_s`), compilation or warm-up and the
     untimed pass (`warmup_s`). Ours runs the production `Featurizer` (length buckets, fixed
     batch shapes, the corrected variant only, as bergson computes), bergson its
     `collect_gradients` (token-budget batches of `batch * seq_len` tokens).
     The ratio is the median of the per-round ratios, with their min and max;
     when those spread by more than 25% of the median the script prints no
     ratio and says why (`ratio_refused`).

Needs the `.[bench]` extra and bergson (README). Usage:
  python scripts/bench_vs_bergson.py [--json] [--workdir=/tmp/bvb] [--device=auto]
`--json` prints every figure as one JSON object on stdout; without it, a summary.
On a GPU machine `--install_cuda` first installs jax's and torch's CUDA builds.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags
from absl import logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tda import cli  # noqa: E402
from tda import host_memory  # noqa: E402

_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false", "TF_CPP_MIN_LOG_LEVEL": "3",
        "JAX_PLATFORMS": "cpu"}
os.environ.update({k: v for k, v in _ENV.items() if k not in os.environ})

EPS = 1e-30  # bergson's Adafactor hooks add 1e-30 to row and column statistics.


flags.DEFINE_string("workdir", "/tmp/bench_vs_bergson", "Where prep, runs and caches go.")
flags.DEFINE_integer("steps", 300, "Adafactor training steps.")
flags.DEFINE_integer("vocab", 8192, "Vocabulary size.")
flags.DEFINE_integer("d_model", 256, "Model width.")
flags.DEFINE_integer("n_layers", 4, "Layers.")
flags.DEFINE_integer("d_ff", 688, "MLP width.")
flags.DEFINE_integer("seq_len", 128, "Tokens per document.")
flags.DEFINE_integer("proj", 16, "Projection size per side.")
flags.DEFINE_integer("batch", 16, "Documents per batch (ours); bergson's --token_batch_size "
                     "= batch * seq_len.")
flags.DEFINE_integer("bucket", 16, "Our length bucket (tokens).")
flags.DEFINE_integer("threads", 1, "Compute threads per side in the timed runs (0: library "
                     "defaults).")
flags.DEFINE_integer("n_time", 512, "Passages timed per pass.")
flags.DEFINE_integer("n_check", 256, "Passages in the agreement check.")
flags.DEFINE_integer("n_queries", 32, "Fact queries in the agreement check.")
flags.DEFINE_integer("repeats", 5, "Timed rounds, each one pass per side (order alternating); "
                     "a ratio needs at least 5.")
flags.DEFINE_bool("retrain", False, "Ignore a cached trained model.")
flags.DEFINE_bool("fp64_check", True, "Also run bergson in float64 on the queries and the "
                  "passages: which side's float32 rounding the error is.")
flags.DEFINE_enum("device", "auto", ["auto", "cpu", "cuda"],
                  "Where both sides run: 'auto' is 'cuda' when `nvidia-smi` sees a GPU.")
flags.DEFINE_bool("install_cuda", False, "Before anything else, install jax's CUDA build "
                  "(jax[cuda12] at this jax's version) and torch's CUDA build (this torch's "
                  "version, from --torch_cuda_index) into this interpreter; needs --device "
                  "cuda or a GPU under auto.")
flags.DEFINE_string("torch_cuda_index", "https://download.pytorch.org/whl/cu128",
                    "The package index of torch's CUDA builds (--install_cuda).")
flags.DEFINE_enum("worker", None, ["ours", "bergson"],
                  "Internal: serve one side's timed passes (one per 'run' line on stdin).")
flags.DEFINE_integer("reply_fd", None, "Internal: the worker's reply pipe.")
_JSON = cli.define_json_flag()


def _rss_mb() -> tuple[float, float]:
  """(current RSS, peak RSS) of this process in MiB, from /proc/self/status.

  VmHWM, not `ru_maxrss`: the latter survives exec, so a worker started from
  this (large) parent would report the parent's peak.
  """
  with open("/proc/self/status") as f:
    kv = dict(l.split(":", 1) for l in f if ":" in l)
  return int(kv["VmRSS"].split()[0]) / 1024, int(kv["VmHWM"].split()[0]) / 1024


def _config(a):
  from tda import config as config_lib
  c = config_lib.base_config()
  m = c.model
  m.block, m.scale_embeddings = "sequential", False
  m.d_model, m.n_layers, m.n_heads, m.head_dim, m.n_kv_heads = a.d_model, a.n_layers, 4, a.d_model // 4, 4
  m.d_ff, m.vocab_size, m.max_len = a.d_ff, a.vocab, a.seq_len
  c.data.vocab_size, c.data.seq_len = a.vocab, a.seq_len
  c.train.steps = a.steps
  return c


# ---------------------------------------------------------------------------
# 1-2. World, vocab, training, conversion.


def prepare(a) -> dict:
  import pickle
  import jax
  import numpy as np
  import sentencepiece as spm
  from tda import batches
  from tda import convert_hf
  from tda import data as data_lib
  from tda import model as model_lib
  from tda import train as train_lib
  from tda import synthetic_world

  os.makedirs(a.workdir, exist_ok=True)
  config = _config(a)
  world = synthetic_world.generate_from_config(config)
  sp_path = data_lib.train_vocab(texts=[p["text"] for p in world.passages],
                                 vocab_size=a.vocab, model_prefix=os.path.join(a.workdir, "sp"))
  sp = spm.SentencePieceProcessor(model_file=sp_path)
  t = a.seq_len
  rows = [(sp.encode(p["text"]) + [data_lib.EOS_ID])[:t] for p in world.passages]
  tokens_nt = np.zeros((len(rows), t), np.int32)
  for i, r in enumerate(rows):
    tokens_nt[i, :len(r)] = r
  queries = []  # (tokens, labels with -100 on the prompt)
  for f in world.facts[:a.n_queries]:
    p = sp.encode(f["inputs_plaintext"])
    full = sp.encode(f["inputs_plaintext"] + " " + f["targets_plaintext"])
    if full[:len(p)] != p or len(full) == len(p):
      raise ValueError(f"query {f['fact_id']}: prompt tokens are not a prefix")
    queries.append((full, [-100] * len(p) + full[len(p):]))

  cache = os.path.join(a.workdir, "trained.pkl")
  model = model_lib.Transformer(model_lib.model_config(config))
  t0 = time.time()
  if os.path.exists(cache) and not a.retrain:
    with open(cache, "rb") as f:
      params, opt_state, losses = pickle.load(f)
  else:
    tx = train_lib.make_optimizer(config)
    params = model_lib.init_params(model, jax.random.key(config.seed), t)
    opt_state = tx.init(params)
    step = jax.jit(train_lib.make_train_step(model, tx))
    losses = []
    for s in range(a.steps):
      batch = batches.batch_at(tokens_nt=tokens_nt, step=s, batch_size=config.train.batch_size,
                               seed=config.seed)
      params, opt_state, loss = step(params, opt_state, batch)
      if s % 50 == 0 or s == a.steps - 1:
        losses.append((s + 1, float(loss)))
    params, opt_state = jax.device_get((params, opt_state))
    with open(cache, "wb") as f:
      pickle.dump((params, opt_state, losses), f)
  train_s = time.time() - t0

  cfg = model_lib.model_config(config)
  hf_dir = os.path.join(a.workdir, "hf")
  max_pos = max(2048, a.batch * t)  # bergson caps --token_batch_size at this; RoPE ignores it.
  convert_hf.save_hf(params=params, opt_state=opt_state, cfg=cfg, out_dir=hf_dir,
                     step=a.steps, sp_model_path=sp_path, max_position_embeddings=max_pos,
                     decay_rate=config.train.adafactor_decay_rate,
                     learning_rate=0.1 * config.train.learning_rate)
  import torch
  import transformers
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
  logit_diff = convert_hf.max_logit_diff(model=model, params=params, hf_model=hf_model,
                                         tokens_bt=tokens_nt[:8])
  if logit_diff > 1e-3:
    raise AssertionError(f"converted model's logits differ by {logit_diff}")

  def write_jsonl(path, recs):
    with open(path, "w") as f:
      for r in recs:
        f.write(json.dumps(r) + "\n")

  lens = (tokens_nt != 0).sum(1)
  for name, n in (("time", a.n_time), ("check", a.n_check)):
    n = min(n, len(rows))
    write_jsonl(os.path.join(a.workdir, f"passages_{name}.jsonl"),
                [{"input_ids": tokens_nt[i, :lens[i]].tolist()} for i in range(n)])
  write_jsonl(os.path.join(a.workdir, "queries.jsonl"),
              [{"input_ids": q, "labels": l} for q, l in queries])
  q_len = max(len(q) for q, _ in queries)
  q_tok = np.zeros((len(queries), q_len), np.int32)
  q_mask = np.zeros((len(queries), q_len), np.float32)
  for i, (q, l) in enumerate(queries):
    q_tok[i, :len(q)] = q
    q_mask[i, :len(q)] = [x != -100 for x in l]
  np.savez(os.path.join(a.workdir, "arrays.npz"), tokens_nt=tokens_nt, q_tok=q_tok, q_mask=q_mask)
  return {"passages": len(rows), "facts": len(world.facts), "sp_pieces": sp.get_piece_size(),
          "params": model_lib.count_params(params), "train_steps": a.steps,
          "train_loss": losses, "train_s": round(train_s, 1),
          "mean_passage_tokens": float(lens.mean()), "max_logit_diff": logit_diff,
          "hf_dir": hf_dir}


# ---------------------------------------------------------------------------
# 3. Agreement.


def _bergson_cli(a, run, dataset, extra=()):
  # bergson's CLI through this interpreter (`python -m bergson`), not a `bergson` on PATH.
  cmd = [sys.executable, "-m", "bergson", "build", run, "--model", os.path.join(a.workdir, "hf"), "--dataset", dataset,
         "--projection_dim", str(a.proj), "--optimizer_state", os.path.join(a.workdir, "hf"),
         "--token_batch_size", str(a.batch * a.seq_len), "--overwrite", "true", *extra]
  env = dict(os.environ)
  env.update(_device_env(a, "bergson"))
  r = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if r.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
  return cmd


def _dense_setup(a):
  """Our dense-only plan (bergson's module set) and corrections with eps = 1e-30."""
  import pickle
  from tda import correction as corr_lib
  from tda import model as model_lib
  from tda import projection as proj
  config = _config(a)
  model = model_lib.Transformer(model_lib.model_config(config))
  with open(os.path.join(a.workdir, "trained.pkl"), "rb") as f:
    params, opt_state, _ = pickle.load(f)
  plan = proj.make_plan(param_shapes=params, pooling="layer", k_in=a.proj, k_out=a.proj)
  plan = plan.restrict(lambda m: m.kind == proj.DENSE)
  corrs = corr_lib.member_corrections(opt_state=opt_state, plan=plan, eps=EPS)
  kinds = {c.kind for c in corrs.values()}
  if kinds != {corr_lib.FactoredCorrection.kind}:
    raise AssertionError(f"every dense member must be Adafactor-factored, got {kinds}")
  return model, params, plan, corrs


def _featurizer(a, model, params, plan, mats, corrs):
  from tda import featurize
  from tda import sharding
  return featurize.Featurizer(model=model, params=params, plan=plan, mats=mats, corrs=corrs,
                              mesh=sharding.make_mesh(), batch_size=a.batch, bucket=a.bucket,
                              variants=("corrected",))  # bergson computes this one only.


def check_agreement(a) -> dict:
  import numpy as np
  import torch
  from bergson.collector.collector import create_module_projection_matrix
  from bergson.data import load_gradients
  from tda import convert_hf

  runs = {}
  todo = [("passages", "passages_check.jsonl", ()), ("queries", "queries.jsonl", ())]
  if a.fp64_check:  # bergson's float64 model: the rounding-free reference.
    todo += [("queries_fp64", "queries.jsonl", ("--precision", "fp64")),
             ("passages_fp64", "passages_check.jsonl", ("--precision", "fp64"))]
  for name, ds, extra in todo:
    run = os.path.join(a.workdir, f"bergson_{name}")
    t0 = time.time()
    cmd = _bergson_cli(a, run, os.path.join(a.workdir, ds), extra)
    if name == "queries":
      bergson_cmd = "python " + " ".join(cmd[1:]).replace(a.workdir, "$W")
    with open(os.path.join(run, "info.json")) as f:
      info = json.load(f)
    runs[name] = (np.array(load_gradients(run), np.float64), info, time.time() - t0)
  order = list(runs["passages"][1]["grad_sizes"])
  if order != list(runs["queries"][1]["grad_sizes"]):
    raise AssertionError("bergson's module order differs between the two runs")

  model, params, plan, corrs = _dense_setup(a)
  ours_names = {convert_hf.hf_module_name(m.path): m for m in plan.members}
  if set(ours_names) != set(order):
    raise AssertionError(f"module sets differ: {sorted(set(ours_names) ^ set(order))}")
  mats = {}
  for hf_name, m in ours_names.items():
    n_in, n_out = m.shape
    mk = lambda role, n: create_module_projection_matrix(
        hf_name, role, a.proj, n, torch.float32, torch.device("cpu"), "rademacher", "jl",
        None).numpy()
    mats[m.name] = (mk("right", n_in), mk("left", n_out))  # P_in [k, n_in], P_out [k, n_out].
  feat = _featurizer(a, model, params, plan, mats, corrs)
  arrays = np.load(os.path.join(a.workdir, "arrays.npz"))
  n = runs["passages"][0].shape[0]
  p_tok = arrays["tokens_nt"][:n]
  outs = {"passages": feat(tokens_nt=p_tok, mask_nt=(p_tok != 0).astype(np.float32),
                           ids=list(range(n))),
          "queries": feat(tokens_nt=arrays["q_tok"], mask_nt=arrays["q_mask"],
                          ids=list(range(len(arrays["q_tok"]))))}

  # Ours: blocks in plan order, each [k_in, k_out] (in side first); bergson's:
  # modules in info.json order, each [p_left (out side), p_right (in side)].
  offsets = dict(zip([b.members[0].name for b in plan.blocks], plan.offsets()))
  k = a.proj

  def to_bergson_layout(x):
    cols = []
    for hf_name in order:
      o = offsets[ours_names[hf_name].name]
      cols.append(x[:, o:o + k * k].reshape(-1, k, k).transpose(0, 2, 1).reshape(-1, k * k))
    return np.concatenate(cols, axis=1).astype(np.float64)

  # The relative error ||ours - bergson|| / ||bergson|| of each example, and a
  # norm-aware one: that times min(1, mean target-token NLL). A confident example's
  # gradient is small (its logit cotangent p - onehot is ~ 1 - p ~ the token NLL), but
  # float32 rounds 1 - p with an absolute error of ~1e-7 whatever p is, so both sides'
  # rounding error stays at the scale of a unit-cotangent gradient, ||g|| / NLL; the
  # norm-aware error measures it on that scale (= the relative error when NLL >= 1).
  # The float64 bergson run (`--fp64_check`) shows which side the rounding is on.
  res = {}
  arr_mask = {"passages": (p_tok[:, 1:] != 0).sum(1), "queries": arrays["q_mask"][:, 1:].sum(1)}
  for name in ("passages", "queries"):
    ours = to_bergson_layout(outs[name]["corrected"])
    theirs = runs[name][0]
    rel = np.linalg.norm(ours - theirs, axis=1) / np.linalg.norm(theirs, axis=1)
    token_nll = outs[name]["loss"] / np.maximum(arr_mask[name], 1)
    aware = rel * np.minimum(1.0, token_nll)
    res[f"{name}_max_rel_err"] = float(rel.max())
    res[f"{name}_median_rel_err"] = float(np.median(rel))
    res[f"{name}_max_norm_aware_err"] = float(aware.max())
    res[f"{name}_token_nll_of_max_rel_err"] = float(token_nll[rel.argmax()])
    res[f"{name}_min_token_nll"] = float(token_nll.min())
    res[f"{name}_bergson_build_s"] = round(runs[name][2], 1)
    outs[name]["bergson_layout"] = ours
    if f"{name}_fp64" in runs:
      ref = runs[f"{name}_fp64"][0]
      err = lambda x: np.linalg.norm(x - ref, axis=1) / np.linalg.norm(ref, axis=1)
      res[f"{name}_ours_vs_bergson_fp64_max_rel_err"] = float(err(ours).max())
      res[f"{name}_bergson_vs_bergson_fp64_max_rel_err"] = float(err(theirs).max())
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  s_ours = unit(outs["queries"]["bergson_layout"]) @ unit(outs["passages"]["bergson_layout"]).T
  s_theirs = unit(runs["queries"][0]) @ unit(runs["passages"][0]).T
  top = lambda s: [set(np.argsort(-row, kind="stable")[:10]) for row in s]
  same_top = sum(x == y for x, y in zip(top(s_ours), top(s_theirs)))
  # bergson's per-document summed loss (data.hf "loss") against our kernel's.
  import datasets
  b_loss = np.array(datasets.load_from_disk(
      os.path.join(a.workdir, "bergson_passages", "data.hf"))["loss"])
  res.update({
      "max_score_diff": float(np.abs(s_ours - s_theirs).max()),
      "top10_sets_equal": f"{same_top}/{len(s_ours)}",
      "max_loss_rel_diff": float(np.max(np.abs(outs["passages"]["loss"] - b_loss) / b_loss)),
      "n_passages": int(n), "n_queries": int(len(arrays["q_tok"])),
      "dim": int(sum(runs["passages"][1]["grad_sizes"].values())),
      "modules": len(order), "bergson_cli": bergson_cmd})
  return res


# ---------------------------------------------------------------------------
# 4. Speed, one side per subprocess.


def _serve(a, setup: dict, one_pass) -> None:
  """A worker's loop: report `setup`, then one timed pass per 'run' line on stdin.

  The worker stays up across rounds, so the parent can interleave the sides
  round by round without paying imports, model load and compilation each time.
  Each reply is one JSON line on the worker's real stdout (`a.reply_fd`).
  """
  reply = os.fdopen(a.reply_fd, "w")

  def send(obj):
    reply.write(json.dumps(obj) + "\n")
    reply.flush()

  send(setup)
  for line in sys.stdin:
    if line.strip() == "quit":
      return
    if line.strip() != "run":
      raise ValueError(f"worker: unknown command {line.strip()!r}")
    rss_before, _ = _rss_mb()
    t0 = time.perf_counter()
    res = one_pass()
    res.update(wall_s=time.perf_counter() - t0, rss_before_mb=rss_before,
               peak_rss_mb=_rss_mb()[1])
    send(res)


def worker_ours(a) -> None:
  import jax
  import numpy as np
  from tda import model as model_lib
  from tda import projection as proj
  t0 = time.time()
  model, params, plan, corrs = _dense_setup(a)
  mats = proj.plan_matrices(seed=0, plan=plan)  # Speed only: any matrices of the same shape.
  feat = _featurizer(a, model, params, plan, mats, corrs)
  toks = np.load(os.path.join(a.workdir, "arrays.npz"))["tokens_nt"][:a.n_time]
  mask = (toks != 0).astype(np.float32)
  lengths = (toks != 0).sum(1)
  setup_s = time.time() - t0
  t0 = time.time()
  for t in np.unique(model_lib.bucket_lengths(lengths, multiple=a.bucket, max_len=toks.shape[1])):
    jax.block_until_ready(feat.run_batch(np.ones((feat.batch_size, t), np.int32),
                                         np.ones((feat.batch_size, t), np.float32)))

  def one_pass():
    out = feat(tokens_nt=toks, mask_nt=mask, ids=list(range(len(toks))))
    assert out["corrected"].shape == (len(toks), plan.dim) and not out["bad_ids"]
    return {"examples": len(toks), "tokens": int(lengths.sum())}

  one_pass()  # Untimed, as bergson's: the steady state (allocator at its high water).
  compile_s = time.time() - t0

  _serve(a, {"setup_s": setup_s, "warmup_s": compile_s, "device": str(jax.devices()[0]),
             "host_malloc": host_memory.STATUS,
             "threads": a.threads or os.cpu_count(),
             "compiled_shapes": feat.compiled_shapes}, one_pass)


def worker_bergson(a) -> None:
  import torch
  from bergson.collection import collect_gradients
  from bergson.config.config import DataConfig, IndexConfig, PreprocessConfig
  from bergson.data import allocate_batches
  from bergson.utils.worker_utils import create_processor, setup_data_pipeline, setup_model_and_peft
  if a.threads:
    torch.set_num_threads(a.threads)
  t0 = time.time()
  hf = os.path.join(a.workdir, "hf")
  run = os.path.join(a.workdir, "bergson_time")
  cfg = IndexConfig(run_path=run + "_warm", model=hf, overwrite=True,
                    data=DataConfig(dataset=os.path.join(a.workdir, "passages_time.jsonl")),
                    projection_dim=a.proj, optimizer_state=hf,
                    token_batch_size=a.batch * a.seq_len, **_bergson_device_kwargs(a))
  cfg.partial_run_path.mkdir(parents=True, exist_ok=True)
  ds, _ = setup_data_pipeline(cfg)
  model, target_modules = setup_model_and_peft(cfg)
  processor = create_processor(model, cfg, target_modules)
  setup_s = time.time() - t0

  def collect(data, run_path):
    cfg.run_path = run_path
    cfg.partial_run_path.mkdir(parents=True, exist_ok=True)
    batches = allocate_batches(data["length"][:], cfg.token_batch_size,
                               max_batch_size=cfg.max_batch_size)
    collect_gradients(model=model, data=data, processor=processor, cfg=cfg, batches=batches,
                      target_modules=target_modules, attention_cfgs={},
                      preprocess_cfg=PreprocessConfig())
    if torch.cuda.is_available():
      torch.cuda.synchronize()

  t0 = time.time()
  collect(ds.select(range(min(2 * a.batch, len(ds)))), run + "_warm")  # Caches projections.
  n_tokens = int(sum(ds["length"]))

  def one_pass():
    collect(ds, run)
    return {"examples": len(ds), "tokens": n_tokens}

  one_pass()  # Untimed, as ours: the steady state (allocator at its high water).
  warm_s = time.time() - t0

  _serve(a, {"setup_s": setup_s, "warmup_s": warm_s, "device": str(model.device),
             "host_malloc": host_memory.STATUS,
             "threads": torch.get_num_threads(), "modules": len(processor.normalizers)},
         one_pass)


def _bergson_device_kwargs(a) -> dict:
  return {}


class _Worker:
  """One side's worker process (`--worker=side`), driven round by round."""

  def __init__(self, a, side: str):
    cmd = [sys.executable, os.path.abspath(__file__), f"--worker={side}",
           f"--workdir={a.workdir}", "--json"]
    for k in ("vocab", "d_model", "n_layers", "d_ff", "seq_len", "proj", "batch", "bucket",
              "n_time", "steps", "threads", "device"):
      cmd.append(f"--{k}={getattr(a, k)}")
    env = dict(os.environ)
    env.update(_device_env(a, side))
    # One host allocator policy for both sides (tda.host_memory; each worker imports
    # tda first): 'retain' where both compute on the host, glibc's default on a GPU,
    # unless the caller chose.
    env.setdefault(host_memory.ENV, "retain" if a.device == "cpu" else "system")
    if a.threads:  # The same thread budget on both sides (torch: OpenMP; XLA: Eigen pool).
      env.update(OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
      if a.threads == 1:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                            " intra_op_parallelism_threads=1").strip()
    self.side = side
    self._log = open(os.path.join(a.workdir, f"worker_{side}.log"), "w")
    r, w = os.pipe()
    cmd.append(f"--reply_fd={w}")
    self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=self._log,
                                  stderr=subprocess.STDOUT, text=True, env=env, pass_fds=(w,))
    os.close(w)
    self._replies = os.fdopen(r)

  def _reply(self) -> dict:
    line = self._replies.readline()
    if not line:
      self._proc.wait()
      with open(self._log.name) as f:
        tail = f.read()[-3000:]
      raise RuntimeError(f"{self.side} worker failed (exit {self._proc.returncode}):\n{tail}")
    return json.loads(line)

  def ready(self) -> dict:
    return self._reply()

  def run(self) -> dict:
    self._proc.stdin.write("run\n")
    self._proc.stdin.flush()
    return self._reply()

  def close(self):
    if self._proc.poll() is None:
      try:
        self._proc.stdin.write("quit\n")
        self._proc.stdin.flush()
      except BrokenPipeError:  # It died meanwhile; its error is already raised.
        pass
      self._proc.wait()
    self._log.close()
    self._replies.close()


def _gpu_present() -> bool:
  import shutil
  smi = shutil.which("nvidia-smi")
  if not smi:
    return False
  r = subprocess.run([smi, "-L"], capture_output=True, text=True)
  return r.returncode == 0 and "GPU" in r.stdout


def resolve_device(a) -> str:
  """'cpu' or 'cuda' for both sides (`--device`; 'auto' asks `nvidia-smi`)."""
  if a.device != "auto":
    return a.device
  return "cuda" if _gpu_present() else "cpu"


def install_cuda_builds(a) -> list[str]:
  """pip-installs jax's and torch's CUDA builds matching the installed versions."""
  from importlib import metadata
  jax_v = metadata.version("jax")
  torch_v = metadata.version("torch").split("+")[0]
  cmds = [[sys.executable, "-m", "pip", "install", "-q", f"jax[cuda12]=={jax_v}"],
          [sys.executable, "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps",
           f"torch=={torch_v}", "--index-url", a.torch_cuda_index]]
  for cmd in cmds:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
      raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
  return [" ".join(c[2:]) for c in cmds]


def _device_env(a, side: str) -> dict:
  """The environment that puts `side` on `a.device` (resolved: 'cpu' or 'cuda')."""
  if side == "ours":
    return {"JAX_PLATFORMS": a.device}
  return {"CUDA_VISIBLE_DEVICES": ""} if a.device == "cpu" else {}  # bergson: CUDA if visible.


MAX_SPREAD = 0.25  # Refuse a ratio when the per-round ratios spread wider than this.


def ratio_summary(ratios: list[float], max_spread: float = MAX_SPREAD) -> dict:
  """Median, min, max of the per-round ratios; the median only when they agree.

  The spread is (max - min) / median. Above `max_spread` the rounds disagree
  (the machine's load changed between them, typically) and no ratio is given:
  `ours_over_bergson_examples_per_s` is None and `ratio_refused` says why.
  """
  med = statistics.median(ratios)
  spread = (max(ratios) - min(ratios)) / med
  out = {"ratio_per_round": [round(r, 3) for r in ratios], "ratio_median": round(med, 3),
         "ratio_min": round(min(ratios), 3), "ratio_max": round(max(ratios), 3),
         "ratio_spread": round(spread, 3), "ratio_refused": None,
         "ours_over_bergson_examples_per_s": round(med, 2)}
  if len(ratios) < 5:
    out["ratio_refused"] = f"{len(ratios)} rounds: a ratio needs at least 5"
  elif spread > max_spread:
    out["ratio_refused"] = (f"the rounds disagree: per-round ratios {min(ratios):.2f} to "
                            f"{max(ratios):.2f}, a spread of {spread:.0%} of the median "
                            f"(the limit is {max_spread:.0%}); rerun on a quieter machine")
  if out["ratio_refused"]:
    out["ours_over_bergson_examples_per_s"] = None
  return out


def timed(a) -> dict:
  """`a.repeats` rounds, each one pass of each side (the order alternating), every
  pass with the same thread budget; the load average before and after each pass."""
  workers = {side: _Worker(a, side) for side in ("ours", "bergson")}
  try:
    ready = {side: w.ready() for side, w in workers.items()}
    rounds = {"ours": [], "bergson": []}
    loads = []
    for i in range(a.repeats):
      order = ("ours", "bergson") if i % 2 == 0 else ("bergson", "ours")
      load = {"before": round(os.getloadavg()[0], 2)}
      for side in order:
        rounds[side].append(workers[side].run())
        load[f"after_{side}"] = round(os.getloadavg()[0], 2)
      loads.append(load)
  finally:
    for w in workers.values():
      w.close()
  summary = {}
  for side, rs in rounds.items():
    eps = [r["examples"] / r["wall_s"] for r in rs]
    summary[side] = {
        "examples_per_s": [round(x, 2) for x in eps],
        "examples_per_s_median": round(statistics.median(eps), 2),
        "tokens_per_s": [round(r["tokens"] / r["wall_s"], 1) for r in rs],
        "peak_rss_mb": round(max(r["peak_rss_mb"] for r in rs), 1),
        # As the first timed round starts: after the untimed pass grew the heap.
        "rss_before_timed_mb": round(rs[0]["rss_before_mb"], 1),
        "setup_s": round(ready[side]["setup_s"], 1),
        "warmup_s": round(ready[side]["warmup_s"], 1),
        "threads": ready[side]["threads"], "device": ready[side]["device"],
        # The allocator policy each worker ran under (`_Worker` sets one for both).
        "host_malloc": ready[side]["host_malloc"],
        "examples": rs[0]["examples"], "tokens": rs[0]["tokens"]}
  ratios = [o["examples"] / o["wall_s"] / (b["examples"] / b["wall_s"])
            for o, b in zip(rounds["ours"], rounds["bergson"])]
  summary.update(ratio_summary(ratios))
  summary["load_average_1min"] = loads
  return summary


def run(a) -> dict:
  """Prep, agreement and speed; every figure, and whether the two sides agree."""
  t0 = time.time()
  installed = install_cuda_builds(a) if a.install_cuda else []
  res = {"setup": {"device": a.device, "installed": installed,"model": f"Llama-style, {a.n_layers} layers, d_model {a.d_model}, d_ff "
                            f"{a.d_ff}, 4 heads, vocab {a.vocab}, tied", "seq_len": a.seq_len,
                   "projection_per_side": a.proj, "batch_docs": a.batch, "bucket": a.bucket,
                   "threads_per_side": a.threads or "library default",
                   "module_set": "every nn.Linear in the body (q,k,v,o,gate,up,down); "
                                 "no embedding / LM head (bergson's default)",
                   "normaliser": "Adafactor factored V (eps 1e-30)",
                   "loss": "summed token NLL (bergson loss_reduction='sum')",
                   "cpu_count": os.cpu_count()}}
  logging.info("[1/3] world, vocab, training, conversion ...")
  res["prep"] = prepare(a)
  logging.info("[2/3] agreement (bergson build CLI vs our kernel) ...")
  res["agreement"] = check_agreement(a)
  logging.info("[3/3] speed, A B interleaved ...")
  res["speed"] = timed(a)
  res["total_s"] = round(time.time() - t0, 1)
  ag, sp = res["agreement"], res["speed"]
  res["ours_over_bergson_examples_per_s"] = sp["ours_over_bergson_examples_per_s"]
  res["max_score_diff"] = ag["max_score_diff"]
  ok = (ag["passages_max_norm_aware_err"] <= 1e-4 and ag["queries_max_norm_aware_err"] <= 1e-4
        and ag["top10_sets_equal"].split("/")[0] == ag["top10_sets_equal"].split("/")[1])
  res["agreement_ok"] = bool(ok)
  return res


def _summary(res: dict) -> str:
  ag, sp = res["agreement"], res["speed"]
  return "\n".join([
      f"{res['setup']['model']}, seq_len {res['setup']['seq_len']}, projection "
      f"{res['setup']['projection_per_side']} per side, {res['setup']['threads_per_side']} "
      "thread(s) per side",
      f"agreement: {'ok' if res['agreement_ok'] else 'FAILED'}; relative error passages "
      f"{ag['passages_max_rel_err']:.2e} (norm-aware {ag['passages_max_norm_aware_err']:.2e}), "
      f"queries {ag['queries_max_rel_err']:.2e} (norm-aware "
      f"{ag['queries_max_norm_aware_err']:.2e}, the worst query's token NLL "
      f"{ag['queries_token_nll_of_max_rel_err']:.1e}); "
      f"max score diff {ag['max_score_diff']:.2e}; top-10 sets equal {ag['top10_sets_equal']}",
      f"speed ({sp['ours']['device']} / {sp['bergson']['device']}): ours "
      f"{sp['ours']['examples_per_s']} vs bergson {sp['bergson']['examples_per_s']} examples/s",
      (f"ours / bergson {sp['ours_over_bergson_examples_per_s']}x (median of rounds "
       f"{sp['ratio_per_round']}, min {sp['ratio_min']}, max {sp['ratio_max']})"
       if sp["ratio_refused"] is None else f"no ratio: {sp['ratio_refused']}"),
      "load average (1 min) per round: " + "; ".join(
          " ".join(f"{k} {v}" for k, v in r.items()) for r in sp["load_average_1min"]),
      f"peak RSS: ours {sp['ours']['peak_rss_mb']} MiB, bergson "
      f"{sp['bergson']['peak_rss_mb']} MiB; total {res['total_s']} s"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  a = flags.FLAGS
  if a.worker:
    if a.reply_fd is None:
      raise app.UsageError("--worker is internal: it needs --reply_fd")
    with cli.stdout_to_stderr(True):
      (worker_ours if a.worker == "ours" else worker_bergson)(a)
    return
  a.device = resolve_device(a)
  if a.install_cuda and a.device != "cuda":
    raise app.UsageError("--install_cuda: no GPU here (nvidia-smi sees none); pass "
                         "--device=cuda to install anyway")
  with cli.stdout_to_stderr(_JSON.value):
    res = run(a)
  if _JSON.value:
    cli.print_json(res)
  else:
    print(_summary(res))
  if not res["agreement_ok"]:
    sys.exit("agreement check failed (see 'agreement')")


if __name__ == "__main__":
  app.run(main)

"""The one registry of attribution methods (DESIGN.md §2's ablation table).

Every module that needs to know which methods exist, how a gradient method
transforms its vectors, how a method is labelled, or where it sits in the paper's
Table 1 reads it here; `config.eval.methods` names methods from this registry and
an unknown name is a clear error (`check`).

A gradient method is G(z) = [unit](R^{-1/2} P (∇L(z) [/ sqrt(V)])): its switches
are `correction` (divide by sqrt(V), the optimizer's second moment), `r` (no R,
R_train only, or the task-specific mix λ R_eval + (1-λ) R_train) and `unit`
(normalise, so the score is a cosine). A lexical or dense method ranks passages
by text alone (`tda.baselines`).

To add a method: one `Method(...)` line in `METHODS` (and, for a new kind of
baseline, its ranking function in `tda.baselines`).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

from tda import errors

GRADIENT, LEXICAL, DENSE = "gradient", "lexical", "dense"
KINDS = (GRADIENT, LEXICAL, DENSE)
R_NONE, R_TRAIN, R_MIXED = "none", "train", "mixed"
RAW, CORRECTED = "raw", "corrected"


@dataclasses.dataclass(frozen=True)
class Switches:
  """How a gradient method turns a projected gradient into its vector."""
  correction: bool   # Divide by sqrt(V) (optimizer second moment).
  r: str             # R_NONE | R_TRAIN | R_MIXED.
  unit: bool         # Unit-normalise after whitening (score = cosine).

  @property
  def variant(self) -> str:
    """The kernel output this method starts from: RAW or CORRECTED."""
    return CORRECTED if self.correction else RAW


@dataclasses.dataclass(frozen=True)
class Method:
  """One attribution method.

  Attributes:
    name: the name configs, files and tables use.
    label: its row label in reports (the paper's naming).
    kind: GRADIENT, LEXICAL or DENSE.
    switches: the gradient transform (gradient methods only).
    paper: (MRR, recall@10, tail-patch in percentage points) of the paper's
      Table 1 on T-REx, or None where the paper has no such row.
  """
  name: str
  label: str
  kind: str
  switches: Switches | None = None
  paper: tuple[float, float, float] | None = None

  @property
  def is_gradient(self) -> bool:
    return self.kind == GRADIENT

  @property
  def family(self) -> str:
    """'gradient' or 'baseline' (lexical and dense), as reports group them."""
    return "gradient" if self.is_gradient else "baseline"


def _g(name, label, correction, r, unit, paper=None) -> Method:
  return Method(name, label, GRADIENT, Switches(correction, r, unit), paper)


# Table 1's rows in the paper's order. 'trackstar_no_task_r' is TrackStar with
# R_train only, which by the table's columns is the same computation as Exp. 5
# (it shares Exp. 5's table). Dense compares against the paper's Gecko.
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("bm25", "BM25", LEXICAL, paper=(0.592, 0.773, 0.41)),
    Method("dense", "Dense (Gecko stand-in)", DENSE, paper=(0.620, 0.794, 0.31)),
    _g("trak", "TRAK", False, R_TRAIN, False, (0.001, 0.001, -0.02)),
    _g("exp1", "Exp. 1 (Pruthi et al., 2020)", False, R_NONE, False, (0.064, 0.114, 0.35)),
    _g("exp2", "Exp. 2 (Han & Tsvetkov, 2022)", False, R_NONE, True, (0.266, 0.358, 0.65)),
    _g("exp3", "Exp. 3 (Choe et al., 2024)", False, R_TRAIN, True, (0.290, 0.399, 0.85)),
    _g("exp4", "Exp. 4 (Akyürek et al., 2022; Xia et al., 2024)", True, R_NONE, True,
       (0.300, 0.413, 0.71)),
    _g("exp5", "Exp. 5", True, R_TRAIN, True),
    _g("trackstar", "TrackStar", True, R_MIXED, True, (0.365, 0.496, 0.90)),
    _g("trackstar_no_task_r", "TrackStar w/o task-specific R", True, R_TRAIN, True),
)}

# The paper's ablation ladder: each step adds one ingredient (MRR should rise).
LADDER = ("exp1", "exp2", "exp3", "exp4", "exp5", "trackstar")
# Methods listed first in the viewer's selectors, in this order; others follow.
VIEWER_ORDER = ("trackstar", "bm25", "dense", "gecko", "exp5", "exp4", "exp3", "exp2", "exp1", "trak")


def get(name: str) -> Method:
  """The registered method `name`; an unknown name is a ValueError naming the known ones."""
  if name not in METHODS:
    raise errors.UserError(f"unknown method {name!r}; known methods: {sorted(METHODS)}")
  return METHODS[name]


def check(names: Iterable[str], where: str = "eval.methods") -> list[str]:
  """`names` as a list, after checking every name is registered (names `where`)."""
  names = list(names)
  unknown = [n for n in names if n not in METHODS]
  if unknown:
    raise errors.UserError(f"unknown method(s) {unknown} in {where}; known: {sorted(METHODS)}")
  return names


def switches(name: str) -> Switches:
  """The gradient transform of `name` (a ValueError for a non-gradient method)."""
  m = get(name)
  if not m.is_gradient:
    raise ValueError(f"method {name!r} is {m.kind}, not a gradient method")
  return m.switches


def gradient(names: Iterable[str]) -> list[str]:
  """The gradient methods among `names`, in order."""
  return [n for n in check(names) if METHODS[n].is_gradient]


def baselines(names: Iterable[str]) -> list[str]:
  """The lexical and dense methods among `names`, in order."""
  return [n for n in check(names) if not METHODS[n].is_gradient]


def label(name: str) -> str:
  """A report label: the registered one, else the name itself."""
  return METHODS[name].label if name in METHODS else name


def in_table_order(names: Sequence[str]) -> list[str]:
  """`names` with registered methods in Table 1's order first, the rest by name."""
  order = {n: i for i, n in enumerate(METHODS)}
  return sorted(names, key=lambda n: (order.get(n, len(order)), n))


def in_viewer_order(names: Iterable[str]) -> list[str]:
  rank = {m: i for i, m in enumerate(VIEWER_ORDER)}
  return sorted(names, key=lambda m: (rank.get(m, len(rank)), m))


def variants(names: Iterable[str]) -> list[str]:
  """The kernel outputs (RAW, CORRECTED) the gradient methods among `names` need."""
  need = {switches(n).variant for n in gradient(names)}
  return [v for v in (RAW, CORRECTED) if v in need]


def table_groups(names: Iterable[str]) -> dict[str, list[str]]:
  """Table name -> the gradient methods it serves (identical switches share a table)."""
  groups: dict[Switches, list[str]] = {}
  for n in gradient(names):
    groups.setdefault(switches(n), []).append(n)
  return {ms[0]: ms for ms in groups.values()}

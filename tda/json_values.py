"""JSON-safe numbers: JSON has no NaN or infinity, so they become null."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def finite_or_none(x: Any) -> float | None:
  """`x` as a float, or None for None, NaN and +-inf."""
  if x is None:
    return None
  x = float(x)
  return x if math.isfinite(x) else None


def to_jsonable(obj: Any) -> Any:
  """`obj` with numpy values as Python ones and non-finite floats as None."""
  if isinstance(obj, dict):
    return {str(k): to_jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_jsonable(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return [to_jsonable(v) for v in obj.tolist()]
  if isinstance(obj, (bool, np.bool_)):
    return bool(obj)
  if isinstance(obj, (int, np.integer)):
    return int(obj)
  if isinstance(obj, (float, np.floating)):
    return finite_or_none(obj)
  return obj

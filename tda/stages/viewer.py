"""Stage 'viewer': the offline, self-contained results page (`tda.viewer`), from
the evaluation's per-method proponent files; published as `results/viewer.html`."""

from __future__ import annotations

import os
from typing import Any

from tda import fs
from tda import viewer

STAGE = "viewer"


def fingerprint(ctx) -> dict[str, Any]:
  return {"upstream": ctx.upstream("evaluation")}


def run(ctx, out_dir: str) -> dict[str, Any]:
  path = viewer.write_viewer(workdir=ctx.workdir,
                             out_path=os.path.join(out_dir, "results", "viewer.html"))
  return {"path": os.path.relpath(path, out_dir), "bytes": fs.getsize(path)}

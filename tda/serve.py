"""A small local HTTP JSON API over one finished run, and the results viewer with
its "trace a prompt" box live.

    python -m tda.serve --workdir=W [--host=127.0.0.1] [--port=8080]

One `tda.query.Engine` is loaded once (model, projection, V correction, R^{-1/2},
tables) and shared by all requests; device work is serialized by its lock, so
the threaded server stays responsive for bad requests and the page while a
query runs.

    GET  /             the run's results viewer (`tda.viewer`) with the trace box
    GET  /api/health   {"ok", "methods", "default_method", "max_k", "max_prompt_chars", ...}
    POST /api/trace    {"prompt", "target"?, "method"?, "k"?, "per_token"?}
                       -> the `tda.query --json` object (prompt, target,
                       target_source, method, proponents, opponents, timings)

A bad request (malformed JSON, empty or over-long prompt, unknown method, k out
of range, unknown field, a body over the size limit) gets a 4xx with
{"error": message naming the problem}; an unexpected failure a 500 with its
message; nothing stops the server.
"""

from __future__ import annotations

import http.server
import json
import logging
import os
import threading
from typing import Any

from tda import json_values
from tda import query as query_lib

MAX_BODY_BYTES = 64 * 1024
TRACE_PATH, HEALTH_PATH = "/api/trace", "/api/health"


class App:
  """What the handler serves: the engine and the rendered viewer page."""

  def __init__(self, engine: query_lib.Engine, *, default_method: str | None = None):
    self.engine = engine
    methods = engine.methods
    self.default_method = (default_method if default_method in methods else
                           "trackstar" if "trackstar" in methods else methods[0])
    self.page = self._render_page()

  def _render_page(self) -> bytes | None:
    from tda import viewer
    try:
      results = viewer.load_results(workdir=self.engine.workdir)
    except FileNotFoundError as e:
      logging.warning("no viewer page: %s", e)
      return None
    payload = viewer.build_payload(results=results)
    payload["trace"] = {"api": TRACE_PATH, "health": HEALTH_PATH}
    name = os.path.basename(os.path.abspath(self.engine.workdir))
    return viewer.render_html(payload=payload, title=f"TrackStar results: {name}",
                              served=True).encode("utf-8")

  def health(self) -> dict[str, Any]:
    e = self.engine
    return {"ok": True, "methods": e.methods, "default_method": self.default_method,
            "max_k": e.max_k, "default_k": min(10, e.max_k),
            "max_prompt_chars": e.max_prompt_chars,
            "max_new_tokens": e.max_new_tokens, "index": e.config.index.method}

  def trace(self, body: bytes) -> dict[str, Any]:
    """Raises query.QueryError for a bad request."""
    try:
      obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise query_lib.QueryError(f"malformed JSON: {e}") from e
    req = query_lib.request_from_json(obj, default_method=self.default_method,
                                      default_k=min(10, self.engine.max_k))
    return self.engine.trace([req])[0]


def make_handler(app: App):
  """The request handler class bound to `app`."""

  class Handler(http.server.BaseHTTPRequestHandler):
    server_version = "tda-serve"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # Through logging, not raw stderr.
      logging.info("%s %s", self.address_string(), fmt % args)

    def _send(self, code: int, body: bytes, ctype: str) -> None:
      self.send_response(code)
      self.send_header("Content-Type", ctype)
      self.send_header("Content-Length", str(len(body)))
      self.send_header("Cache-Control", "no-store")
      self.end_headers()
      self.wfile.write(body)

    def _json(self, code: int, obj: Any) -> None:
      body = json.dumps(json_values.to_jsonable(obj), allow_nan=False).encode("utf-8")
      self._send(code, body, "application/json; charset=utf-8")

    def _error(self, code: int, message: str) -> None:
      self._json(code, {"error": message})

    def do_GET(self):  # noqa: N802 (http.server's naming)
      path = self.path.split("?", 1)[0]
      if path in ("/", "/index.html", "/viewer.html"):
        if app.page is None:
          return self._error(404, "this run has no results viewer yet (no "
                             "results/proponents: run the evaluation stage); "
                             f"POST {TRACE_PATH} works")
        return self._send(200, app.page, "text/html; charset=utf-8")
      if path == HEALTH_PATH:
        return self._json(200, app.health())
      if path == TRACE_PATH:
        return self._error(405, f"use POST {TRACE_PATH} with a JSON body")
      return self._error(404, f"no such path {path!r}; try GET /, GET {HEALTH_PATH} "
                         f"or POST {TRACE_PATH}")

    def do_POST(self):  # noqa: N802
      path = self.path.split("?", 1)[0]
      try:
        n = int(self.headers.get("Content-Length", ""))
      except ValueError:
        self.close_connection = True
        return self._error(411, "a Content-Length header is required")
      if n > MAX_BODY_BYTES:
        self.close_connection = True
        if n <= 64 * MAX_BODY_BYTES:  # Drained, so the client reads the answer.
          self.rfile.read(n)
        return self._error(413, f"the request body is {n} bytes; the limit is "
                           f"{MAX_BODY_BYTES}")
      body = self.rfile.read(n) if n > 0 else b""
      if path != TRACE_PATH:
        return self._error(404, f"no such path {path!r}; POST to {TRACE_PATH}")
      try:
        return self._json(200, app.trace(body))
      except query_lib.QueryError as e:
        return self._error(400, str(e))
      except Exception as e:  # pylint: disable=broad-except
        logging.exception("trace failed")
        return self._error(500, f"internal error: {type(e).__name__}: {e}")

  return Handler


class Server(http.server.ThreadingHTTPServer):
  """One thread per connection; `app` is what it serves."""
  daemon_threads = True
  app: App


def make_server(app: App, *, host: str = "127.0.0.1", port: int = 0) -> Server:
  """A bound (not yet serving) server; port 0 picks a free port
  (`server.server_address[1]`)."""
  server = Server((host, port), make_handler(app))
  server.app = app
  return server


def serve_in_thread(app: App, *, host: str = "127.0.0.1", port: int = 0):
  """(server, thread): serving in a daemon thread; `server.shutdown()` stops it."""
  server = make_server(app, host=host, port=port)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  return server, thread


def main(argv) -> None:
  import sys
  from absl import app as absl_app
  from absl import flags
  if len(argv) > 1:
    raise absl_app.UsageError(f"unexpected arguments: {argv[1:]}")
  fv = flags.FLAGS
  if not fv.workdir:
    raise absl_app.UsageError("--workdir is required")
  try:
    engine = query_lib.engine_from_flags(fv.workdir, _CONFIG.value if _CONFIG is not None else None)
  except (ValueError, query_lib.WorkdirNotReady, FileNotFoundError, RuntimeError) as e:
    sys.stderr.write(f"tda.serve: error: {e}\n")
    sys.exit(2)
  logging.info("loaded %s in %.1f s; compiling ...", fv.workdir, engine.load_s)
  logging.info("warm-up %.1f s", engine.warm_up(all_lengths=True))
  server = make_server(App(engine), host=fv.host, port=fv.port)
  host, port = server.server_address[:2]
  print(f"tda.serve: http://{host}:{port}/  (POST {TRACE_PATH}; Ctrl-C stops)",
        flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()


_CONFIG = None


def _define_flags() -> None:
  global _CONFIG
  from absl import flags
  from ml_collections import config_flags
  flags.DEFINE_string("workdir", None, "A finished run's workdir.")
  flags.DEFINE_string("host", "127.0.0.1", "Address to bind (loopback by default).")
  flags.DEFINE_integer("port", 8080, "Port to bind (0: any free port).")
  _CONFIG = config_flags.DEFINE_config_file(
      "config", None, "The run's config (file and overrides); default: rebuilt from "
      "the workdir's committed fingerprints.", lock_config=True)


if __name__ == "__main__":
  from absl import app as absl_app
  _define_flags()
  absl_app.run(main)

"""tda.serve: the HTTP JSON API over one loaded run, its bad-request handling, a
bounded load test on loopback, and the viewer's "trace a prompt" box in Chromium.

Every test here is slow (it loads the session's shared `:runlocal` run,
conftest.py `default_run`); the server binds a free loopback port.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import time

import numpy as np
import pytest

from tda import query as query_lib
from tda import serve

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def server(runlocal_engine):
  srv, thread = serve.serve_in_thread(serve.App(runlocal_engine), port=0)
  yield srv
  srv.shutdown()
  srv.server_close()
  thread.join(timeout=10)


def _request(srv, method, path, body=None, headers=None):
  host, port = srv.server_address[:2]
  conn = http.client.HTTPConnection(host, port, timeout=600)
  try:
    if isinstance(body, (dict, list)):
      body = json.dumps(body)
    conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    data = r.read()
    ctype = r.getheader("Content-Type", "")
    return r.status, (json.loads(data) if ctype.startswith("application/json") else data)
  finally:
    conn.close()


def test_trace_answers_with_the_query_fields(server):
  app = server.app
  f = app.engine.ctx.world.facts[1]
  status, out = _request(server, "POST", serve.TRACE_PATH,
                         {"prompt": f["inputs_plaintext"], "target": f["targets_plaintext"],
                          "k": 4, "per_token": True})
  assert status == 200, out
  want = app.engine.trace([query_lib.Request(prompt=f["inputs_plaintext"],
                                             target=f["targets_plaintext"], k=4)])[0]
  assert set(out) >= {"prompt", "target", "method", "proponents", "opponents", "timings"}
  assert out["method"] == "trackstar" and len(out["proponents"]) == 4
  assert [h["id"] for h in out["proponents"]] == [h["id"] for h in want["proponents"]]
  np.testing.assert_allclose([h["score"] for h in out["proponents"]],
                             [h["score"] for h in want["proponents"]], rtol=1e-5, atol=1e-6)
  assert all(abs(sum(h["per_token"]) - h["score"]) < 1e-5 for h in out["proponents"])
  status, health = _request(server, "GET", serve.HEALTH_PATH)
  assert status == 200 and health["ok"] and "trackstar" in health["methods"]


@pytest.mark.parametrize("body,status,message", [
    (b"{not json", 400, "malformed JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    ({"prompt": ""}, 400, "the prompt is empty"),
    ({"prompt": "x" * 3000}, 400, "3000 characters long; the limit is 2000"),
    ({"prompt": "a", "method": "no_such"}, 400, "method 'no_such' is not a gradient method"),
    ({"prompt": "a", "k": 0}, 400, r"k must be an integer in [1, 100], got 0"),
    ({"prompt": "a", "k": 1000}, 400, "got 1000"),
    ({"prompt": "a", "k": "ten"}, 400, "'k' must be an integer"),
    ({"prompt": "a", "colour": "red"}, 400, "unknown field(s) ['colour']"),
    (b"x" * (serve.MAX_BODY_BYTES + 1), 413, "the limit is 65536"),
])
def test_bad_requests_get_a_4xx_naming_the_problem(server, body, status, message):
  got, out = _request(server, "POST", serve.TRACE_PATH, body,
                      headers={"Content-Type": "application/json"})
  assert got == status, out
  assert message in out["error"]
  # The server is still up and answering.
  assert _request(server, "GET", serve.HEALTH_PATH)[0] == 200


def test_other_paths_and_verbs_are_refused_clearly(server):
  status, out = _request(server, "GET", "/nope")
  assert status == 404 and "no such path" in out["error"]
  status, out = _request(server, "GET", serve.TRACE_PATH)
  assert status == 405 and "POST" in out["error"]
  status, out = _request(server, "POST", "/nope", {"prompt": "a"})
  assert status == 404


def test_load_200_requests_8_concurrent_without_errors(server):
  facts = server.app.engine.ctx.world.facts
  bodies = [{"prompt": facts[i % len(facts)]["inputs_plaintext"],
             "target": facts[i % len(facts)]["targets_plaintext"],
             "method": ("trackstar", "exp1")[i % 2], "k": 10} for i in range(200)]

  def one(body):
    t0 = time.perf_counter()
    status, out = _request(server, "POST", serve.TRACE_PATH, body)
    return status, out, time.perf_counter() - t0

  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
    results = list(pool.map(one, bodies))
  wall = time.perf_counter() - t0
  errors = [(s, o) for s, o, _ in results if s != 200]
  assert not errors, errors[:3]
  assert all(len(o["proponents"]) == 10 for _, o, _ in results)
  lat = np.array([t for _, _, t in results])
  print(f"\nload test: 200 requests, 8 concurrent, {wall:.1f} s ({200 / wall:.1f} req/s); "
        f"latency p50 {np.percentile(lat, 50):.3f} s, p95 {np.percentile(lat, 95):.3f} s, "
        f"p99 {np.percentile(lat, 99):.3f} s, max {lat.max():.3f} s")




def test_viewer_trace_box_shows_proponents_of_a_typed_prompt(server, browser):
  app = server.app
  host, port = server.server_address[:2]
  origin = f"http://{host}:{port}"
  page = browser.new_page(viewport={"width": 1500, "height": 1000})
  problems = []
  refused = "the server responded with a status of 400"  # The request refused below.
  page.on("console", lambda m: m.type == "error" and refused not in m.text and
          problems.append(m.text))
  page.on("pageerror", lambda e: problems.append(str(e)))
  page.on("request", lambda r: r.url.startswith(origin) or problems.append(r.url))
  page.goto(origin + "/")
  page.wait_for_selector("body[data-ready='1']")
  page.wait_for_selector("[data-testid=trace-controls]:not([hidden])")
  assert "trackstar" in page.eval_on_selector_all(
      "[data-testid=trace-method] option", "els => els.map(e => e.value)")
  f = app.engine.ctx.world.facts[4]
  page.fill("[data-testid=trace-prompt]", f["inputs_plaintext"])
  page.fill("[data-testid=trace-target]", f["targets_plaintext"])
  page.fill("[data-testid=trace-k]", "5")
  page.click("[data-testid=trace-run]")
  page.wait_for_selector("[data-testid=trace-proponent]", timeout=60_000)
  shown = page.eval_on_selector_all("[data-testid=trace-proponent]",
                                    "els => els.map(e => e.dataset.passageId)")
  want = app.engine.trace([query_lib.Request(prompt=f["inputs_plaintext"],
                                             target=f["targets_plaintext"], k=5)])[0]
  assert shown == [h["id"] for h in want["proponents"]]
  assert page.text_content("[data-testid=trace-out-target]").startswith(f["targets_plaintext"])
  # A refused request is shown, not thrown.
  page.fill("[data-testid=trace-prompt]", "")
  page.click("[data-testid=trace-run]")
  page.wait_for_selector("[data-testid=trace-status].error")
  assert "the prompt is empty" in page.text_content("[data-testid=trace-status]")
  page.close()
  assert not problems, problems

"""Tests for tda.viewer: payload building in Python, the page in real Chromium.

Browser tests drive Debian's /usr/bin/chromium through Playwright for Python
(never `playwright install`); they skip, with the reason, when either is absent.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time

import pytest

from tda import viewer
from tda import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))




def _demo_module():
  """scripts/gen_viewer_demo.py, the source of large synthetic result files."""
  spec = importlib.util.spec_from_file_location(
      "gen_viewer_demo", os.path.join(ROOT, "scripts", "gen_viewer_demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# --- The hand-checked fixture -----------------------------------------------
# 8 queries x 2 methods, 12 proponents each. Per query: relation, bucket,
# c4_frequency, model_correct, model_confidence, and the 1-based rank of the
# first correct proponent for trackstar and bm25 (0: none). A second correct
# proponent sits after the first one to check that only the first counts.
HAND = [
    # rel,             bucket, freq, model, conf, ts, bm
    ("place_of_birth", "1",    1, True,  0.9, 1,  3),
    ("place_of_birth", "1",    1, False, 0.2, 2,  1),
    ("place_of_birth", "2-3",  3, True,  0.7, 0,  1),
    ("place_of_birth", "4-10", 7, False, 0.1, 4,  0),
    ("citizenship",    "1",    1, True,  0.8, 11, 2),
    ("citizenship",    "2-3",  2, False, 0.3, 1,  10),
    ("citizenship",    "4-10", 5, True,  0.6, 0,  11),
    ("citizenship",    "4-10", 9, False, 0.4, 5,  1),
]
N_PROPS = 12
SUBJECTS = ["Ada Laurent", "Omar Haddad", "Mei Tanaka", "Ines Silva", "Kofi Mensah",
            "Lena Berg", "Ravi Novak", "Zara Rossi"]
OBJECTS = ["Paris", "Lagos", "Osaka", "Lima", "Ghana", "Norway", "Czechia", "Italy"]


def qid(i):
  return f"trex_synth:{i:015d}"


def hand_rows(method):
  col = 5 if method == "trackstar" else 6
  rows = []
  for i, spec in enumerate(HAND):
    rel, bucket, freq, model_ok, conf = spec[:5]
    first = spec[col]
    subj, obj = SUBJECTS[i], OBJECTS[i]
    correct = [False] * N_PROPS
    if first:
      correct[first - 1] = True
      if first < N_PROPS:
        correct[N_PROPS - 1] = True
    texts, ids = [], []
    for k in range(N_PROPS):
      ids.append(f"{method}-q{i}-p{k:02d}")
      texts.append(f"{subj} was born in {obj.upper()}, said source {k}." if correct[k]
                   else f"{subj} toured widely; passage {k} of {method}.")
    prompt = (f"{subj} was born in the city of" if rel == "place_of_birth"
              else f"{subj} is a citizen of")
    rows.append({
        "example_id": qid(i), "fact_id": f"fact{i}", "relation": rel,
        "inputs_plaintext": prompt, "targets_plaintext": " " + obj,
        "groundtruth": {"subject": subj, "relation": rel, "object": obj},
        "subject": subj, "object": obj,
        "c4_frequency": freq, "c4_frequency_bucket": bucket,
        "model_prediction": obj if model_ok else "Nowhere", "model_correct": model_ok,
        "model_confidence": conf, "temperature_samples": [obj, "Nowhere"],
        "proponents": texts, "proponent_ids": ids,
        "proponent_scores": [round(1.0 - 0.05 * k, 4) for k in range(N_PROPS)],
        "proponent_correct": correct,
        "opponents": [f"Opponent text {j} for {subj}." for j in range(2)],
        "opponent_ids": [f"{method}-q{i}-o{j}" for j in range(2)],
        "opponent_scores": [-0.5, -0.25],
    })
  return rows


def write_hand(workdir, page_size=50):
  folder = os.path.join(workdir, "results", "proponents")
  os.makedirs(folder, exist_ok=True)
  for m in ("trackstar", "bm25"):
    workdir_lib.write_jsonl(os.path.join(folder, f"{m}.jsonl"), hand_rows(m))
  return viewer.write_viewer(workdir=workdir, page_size=page_size)


# Expected values, by hand from HAND (rr = 1/first, 0 if none; hit = 0<first<=10).
# trackstar rr: 1, 1/2, 0, 1/4, 1/11, 1, 0, 1/5      hits: q0 q1 q3 q5 q7
# bm25 rr:      1/3, 1, 1, 0, 1/2, 1/10, 1/11, 1     hits: q0 q1 q2 q4 q5 q7
TS_ALL_MRR = (1 + 1 / 2 + 0 + 1 / 4 + 1 / 11 + 1 + 0 + 1 / 5) / 8
BM_ALL_MRR = (1 / 3 + 1 + 1 + 0 + 1 / 2 + 1 / 10 + 1 / 11 + 1) / 8


# --- Python-side tests ------------------------------------------------------

def test_first_correct_rank_is_one_based_zero_if_none_none_if_unlabelled():
  assert viewer.first_correct_rank([False, False, True, True]) == 3
  assert viewer.first_correct_rank([False, False]) == 0
  assert viewer.first_correct_rank(None) is None
  assert viewer.first_correct_rank([False, None]) is None


def test_embed_json_cannot_break_out_and_round_trips():
  nasty = {"t": "</script><script>x=1</script> <!-- --> </SCRIPT a&b \u2028"}
  blob = viewer.embed_json(nasty)
  assert "<" not in blob and ">" not in blob and "&" not in blob
  assert json.loads(blob) == nasty


def test_payload_merges_methods_and_dedups_passages(tmp_path):
  write_hand(str(tmp_path))
  payload = viewer.build_payload(results=viewer.load_results(workdir=str(tmp_path)))
  assert payload["methods"] == ["trackstar", "bm25"]
  assert (payload["default_a"], payload["default_b"]) == ("trackstar", "bm25")
  assert [q["id"] for q in payload["queries"]] == [qid(i) for i in range(8)]
  assert [r["first"] for r in payload["results"]["trackstar"]] == [1, 2, 0, 4, 11, 1, 0, 5]
  assert [r["first"] for r in payload["results"]["bm25"]] == [3, 1, 1, 0, 2, 10, 11, 1]
  # 8 queries x 2 methods x (12 proponents + 2 opponents), ids all distinct.
  assert len(payload["passages"]) == 8 * 2 * 14
  q3 = payload["queries"][3]
  assert (q3["relation"], q3["bucket"], q3["freq"], q3["correct"]) == (
      "place_of_birth", "4-10", 7, False)


def test_malformed_results_raise_errors_that_name_the_problem(tmp_path):
  rows = hand_rows("trackstar")
  bad = [dict(rows[0], proponent_scores=[0.1])]
  with pytest.raises(ValueError, match=r"'proponent_scores' has 1 entries but 'proponents' has 12"):
    viewer.build_payload(results={"trackstar": bad})
  with pytest.raises(ValueError, match="appears twice"):
    viewer.build_payload(results={"trackstar": [rows[0], rows[0]]})
  other = hand_rows("bm25")
  other[0]["inputs_plaintext"] = "something else"
  with pytest.raises(ValueError, match="'inputs_plaintext' is 'something else'"):
    viewer.build_payload(results={"trackstar": rows, "bm25": other})
  with pytest.raises(ValueError, match="missing field.*proponents"):
    viewer.build_payload(results={"trackstar": [{"example_id": "x", "inputs_plaintext": "",
                                                 "targets_plaintext": ""}]})
  with pytest.raises(FileNotFoundError, match="results/proponents"):
    viewer.write_viewer(workdir=str(tmp_path / "empty"))


def test_result_rows_carry_ranks_correctness_and_tailpatch_per_query():
  facts = [{"example_id": "q0", "fact_id": "f0", "relation": "r", "subject": "S",
            "object": "O", "inputs_plaintext": "S r", "targets_plaintext": " O",
            "frequency": 2, "bucket": "2-3", "passage_ids": ["p1"]},
           {"example_id": "q1", "fact_id": "f1", "relation": "r", "subject": "T",
            "object": "P", "inputs_plaintext": "T r", "targets_plaintext": " P",
            "frequency": 0, "bucket": "0", "passage_ids": []}]
  passages = {"p0": "zero", "p1": "one", "p2": "two"}
  nan = float("nan")
  rows = viewer.result_rows(
      facts=facts, passages=passages, predictions={"q0": {"correct": 1, "prediction": "O",
                                                          "model_confidence": nan}},
      top_ids=[["p0", "p1"], ["p2", "p1"]], top_scores=[[0.5, 0.25], [0.75, nan]],
      bottom_ids=[["p2"], ["p0"]], bottom_scores=[[-1.0], [-2.0]],
      tailpatch_abs=[[0.1, nan], [nan, nan]], tailpatch_rel=[[0.5, nan], [nan, nan]])
  q0, q1 = rows
  assert q0["proponents"] == ["zero", "one"] and q0["proponent_correct"] == [False, True]
  assert viewer.first_correct_rank(q0["proponent_correct"]) == 2
  assert q0["opponents"] == ["two"] and q0["opponent_scores"] == [-1.0]
  assert q0["proponent_tailpatch_abs"] == [0.1, None]  # NaN: JSON null.
  assert q0["model_correct"] is True and q0["model_confidence"] is None
  assert q0["has_trex_sentence"] and not q1["has_trex_sentence"]
  assert q1["proponent_scores"] == [0.75, None]
  assert q1["proponent_tailpatch_abs"] is None  # Not tail-patched.
  assert q1["model_prediction"] is None and q1["model_correct"] is None  # No prediction.
  payload = viewer.build_payload(results={"trackstar": rows})
  assert [e["first"] for e in payload["results"]["trackstar"]] == [2, 0]


def test_synthetic_results_are_valid_viewer_input_with_shared_passages(tmp_path):
  paths = _demo_module().write_synthetic_results(
      workdir=str(tmp_path), n_queries=30, n_proponents=6, methods=("bm25", "dense"))
  assert [os.path.basename(p) for p in paths] == ["bm25.jsonl", "dense.jsonl"]
  results = viewer.load_results(workdir=str(tmp_path))
  payload = viewer.build_payload(results=results)
  assert len(payload["queries"]) == 30
  assert all(len(e["p"]) == 6 for m in ("bm25", "dense") for e in payload["results"][m])
  ids = lambda m: {i for r in results[m] for i in r["proponent_ids"]}
  assert ids("bm25") & ids("dense")  # Passages shared across methods.
  # Both methods rank the same fact passages, differently: their ranks differ.
  assert ([e["first"] for e in payload["results"]["bm25"]] !=
          [e["first"] for e in payload["results"]["dense"]])


def test_cli_writes_default_path_and_reports_it_as_one_json_line(tmp_path):
  _demo_module().write_synthetic_results(workdir=str(tmp_path), n_queries=5,
                                         methods=("bm25", "dense"))
  out = subprocess.run([sys.executable, "-m", "tda.viewer", f"--workdir={tmp_path}", "--json"],
                       capture_output=True, text=True, check=True, cwd=ROOT)
  path = tmp_path / "results" / "viewer.html"
  assert out.stdout.count("\n") == 1
  assert json.loads(out.stdout) == {"path": str(path), "bytes": path.stat().st_size}
  page = path.read_text()
  assert page.count("<script") == 2  # The JSON data and the app; nothing external.
  assert not re.search(r"(src|href)=\"https?:", page)


# --- Browser tests ------------------------------------------------------------



class Page:
  """A page that records console errors and any request other than the file."""

  def __init__(self, browser, path, bypass_csp=False):
    self.url = "file://" + os.path.abspath(path)
    self.page = browser.new_page(viewport={"width": 1500, "height": 1000},
                                 bypass_csp=bypass_csp)
    self.problems = []
    self.page.on("console", lambda m: m.type == "error" and self.problems.append(
        f"console error: {m.text}"))
    self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
    self.page.on("requestfailed", lambda r: self.problems.append(f"failed request: {r.url}"))
    self.page.on("request", lambda r: r.url != self.url and self.problems.append(
        f"unexpected request: {r.url}"))
    self.page.goto(self.url)
    self.page.wait_for_selector("body[data-ready='1']")

  def rows(self):
    return self.page.eval_on_selector_all(
        "[data-testid=query-row]", "els => els.map(e => e.dataset.exampleId)")

  def wait_rows(self, n, timeout_s=5.0):
    # Polled from Python: the page's CSP forbids the eval wait_for_function uses.
    deadline = time.monotonic() + timeout_s
    while len(self.rows()) != n and time.monotonic() < deadline:
      time.sleep(0.02)
    return self.rows()

  def metric(self, name):
    return float(self.page.get_attribute(f"[data-testid={name}]", "data-value"))

  def metrics(self):
    return (int(self.page.text_content("[data-testid=metric-count]")),
            self.metric("metric-mrr-a"), self.metric("metric-recall-a"),
            self.metric("metric-mrr-b"), self.metric("metric-recall-b"))

  def select(self, testid, value):
    self.page.select_option(f"[data-testid={testid}]", value)

  def close(self):
    self.page.close()
    assert not self.problems, self.problems


@pytest.fixture
def hand_page(browser, tmp_path):
  page = Page(browser, write_hand(str(tmp_path)))
  yield page
  page.close()


def approx(*xs):
  return pytest.approx(xs, abs=1e-9)


def test_loads_clean_and_shows_all_metrics(hand_page):
  p = hand_page
  assert p.rows() == [qid(i) for i in range(8)]
  assert p.metrics() == approx(8, TS_ALL_MRR, 5 / 8, BM_ALL_MRR, 6 / 8)
  assert p.page.text_content("[data-testid=metric-mrr-a]") == "0.380"  # 3.0409/8.
  # First query auto-selected; its detail holds the query's facts.
  assert p.page.get_attribute("[data-testid=detail]", "data-example-id") == qid(0)
  assert p.page.text_content("[data-testid=detail-target]") == " Paris"
  assert "Ada Laurent — place_of_birth → Paris" in p.page.text_content(
      "[data-testid=detail-groundtruth]")


def test_offline_trace_box_asks_for_the_server_and_makes_no_request(hand_page):
  # The Page records any request but the file itself as a problem (checked at close).
  p = hand_page.page
  assert p.is_hidden("[data-testid=trace-controls]")
  assert "start tda.serve" in p.text_content("[data-testid=trace-status]")


def test_served_page_allows_its_own_origin_only_when_served():
  payload = viewer.build_payload(results={"trackstar": hand_rows("trackstar")})
  offline = viewer.render_html(payload=payload)
  served = viewer.render_html(payload=payload, served=True)
  assert "connect-src" not in offline and "default-src 'none';" in offline
  assert "default-src 'none'; connect-src 'self';" in served


@pytest.mark.parametrize("testid,value,rows,expected", [
    # relation = place_of_birth: q0..q3.
    ("filter-relation", "place_of_birth", [0, 1, 2, 3],
     (4, (1 + 1 / 2 + 0 + 1 / 4) / 4, 3 / 4, (1 / 3 + 1 + 1 + 0) / 4, 3 / 4)),
    # model wrong: q1 q3 q5 q7.
    ("filter-model", "wrong", [1, 3, 5, 7],
     (4, (1 / 2 + 1 / 4 + 1 + 1 / 5) / 4, 1.0, (1 + 0 + 1 / 10 + 1) / 4, 3 / 4)),
    # trackstar has no correct proponent in its top 10: q2 q4 q6.
    ("filter-top10", "no", [2, 4, 6],
     (3, (0 + 1 / 11 + 0) / 3, 0.0, (1 + 1 / 2 + 1 / 11) / 3, 2 / 3)),
    # bucket 4-10: q3 q6 q7.
    ("filter-bucket", "4-10", [3, 6, 7],
     (3, (1 / 4 + 0 + 1 / 5) / 3, 2 / 3, (0 + 1 / 11 + 1) / 3, 1 / 3)),
])
def test_filters_change_rows_and_metrics(hand_page, testid, value, rows, expected):
  hand_page.select(testid, value)
  assert hand_page.rows() == [qid(i) for i in rows]
  assert hand_page.metrics() == approx(*expected)


def test_combined_filters_method_swap_and_reset(hand_page):
  p = hand_page
  p.select("filter-relation", "citizenship")
  p.select("filter-model", "right")  # q4, q6.
  assert p.rows() == [qid(4), qid(6)]
  assert p.metrics() == approx(2, (1 / 11 + 0) / 2, 0.0, (1 / 2 + 1 / 11) / 2, 1 / 2)
  p.page.click("[data-testid=reset]")
  # Top-10 filter follows method A: with A = bm25, "yes" is q0 q1 q2 q4 q5 q7.
  p.select("method-a", "bm25")
  p.select("method-b", "trackstar")
  p.select("filter-top10", "yes")
  assert p.rows() == [qid(i) for i in (0, 1, 2, 4, 5, 7)]
  assert p.metrics() == approx(6, (1 / 3 + 1 + 1 + 1 / 2 + 1 / 10 + 1) / 6, 1.0,
                               (1 + 1 / 2 + 0 + 1 / 11 + 1 + 1 / 5) / 6, 4 / 6)
  p.page.click("[data-testid=reset]")
  assert len(p.rows()) == 8


def test_search_by_passage_id_and_prompt(hand_page):
  p = hand_page
  p.page.fill("[data-testid=filter-search]", "bm25-q5-p03")
  assert p.wait_rows(1) == [qid(5)]
  assert p.metrics() == approx(1, 1.0, 1.0, 1 / 10, 1.0)
  p.page.fill("[data-testid=filter-search]", "CITIZEN OF")
  assert p.wait_rows(4) == [qid(i) for i in (4, 5, 6, 7)]


@pytest.mark.parametrize("key,direction,order", [
    ("rr", "desc", [0, 5, 1, 3, 7, 4, 2, 6]),   # Ties (rr 1, rr 0) by example id.
    ("rr", "asc", [2, 6, 4, 7, 3, 1, 0, 5]),
    ("freq", "asc", [0, 1, 4, 5, 2, 6, 3, 7]),
    ("conf", "desc", [0, 4, 2, 6, 7, 5, 1, 3]),
    ("id", "desc", [7, 6, 5, 4, 3, 2, 1, 0]),
])
def test_sort_orders_rows_by_key_and_direction(hand_page, key, direction, order):
  hand_page.select("sort-key", key)
  hand_page.select("sort-dir", direction)
  assert hand_page.rows() == [qid(i) for i in order]


def test_side_by_side_marks_highlights_and_opponents(hand_page):
  p = hand_page
  p.page.click(f"[data-testid=query-row][data-example-id='{qid(3)}']")
  pg = p.page
  ids = lambda side: pg.eval_on_selector_all(
      f"[data-testid=proponents-{side}] [data-testid=proponent]",
      "els => els.map(e => [e.dataset.passageId, e.dataset.rank, e.dataset.correct])")
  a, b = ids("a"), ids("b")
  assert [x[0] for x in a] == [f"trackstar-q3-p{k:02d}" for k in range(12)]
  assert [x[0] for x in b] == [f"bm25-q3-p{k:02d}" for k in range(12)]
  assert [x[1] for x in a] == [str(k) for k in range(1, 13)]
  assert [k for k, x in enumerate(a, 1) if x[2] == "true"] == [4, 12]
  assert all(x[2] == "false" for x in b)
  assert float(pg.get_attribute("[data-testid=detail-rr-a]", "data-value")) == 0.25
  assert float(pg.get_attribute("[data-testid=detail-rr-b]", "data-value")) == 0.0
  # Rank 4 of trackstar: "Ines Silva was born in LIMA, ..." - case-insensitive marks.
  item = "[data-testid=proponents-a] [data-testid=proponent][data-rank='4']"
  marks = pg.eval_on_selector_all(f"{item} mark", "els => els.map(e => [e.className, e.textContent])")
  assert marks == [["hl-subject", "Ines Silva"], ["hl-target", "LIMA"]]
  assert pg.text_content(f"{item} [data-testid=passage-text]") == (
      "Ines Silva was born in LIMA, said source 3.")
  # Opponents only on demand.
  assert pg.query_selector("[data-testid=opponents-a]") is None
  pg.check("[data-testid=toggle-opponents]")
  opp = pg.eval_on_selector_all("[data-testid=opponents-b] [data-testid=opponent]",
                                "els => els.map(e => e.dataset.passageId)")
  assert opp == ["bm25-q3-o0", "bm25-q3-o1"]
  # Method B off: one column.
  p.select("method-b", "")
  assert pg.query_selector("[data-testid=method-col-b]") is None
  assert pg.query_selector("[data-testid=method-col-a]") is not None


def test_pagination_pages_rows_and_returns_to_page_one_on_filter(browser, tmp_path):
  p = Page(browser, write_hand(str(tmp_path), page_size=3))
  assert p.rows() == [qid(i) for i in (0, 1, 2)]
  assert p.page.text_content("[data-testid=page-info]") == "Page 1 of 3 · rows 1–3 of 8"
  assert p.page.is_disabled("[data-testid=page-prev]")
  p.page.click("[data-testid=page-next]")
  assert p.rows() == [qid(i) for i in (3, 4, 5)]
  p.page.click("[data-testid=page-next]")
  assert p.rows() == [qid(6), qid(7)]
  assert p.page.is_disabled("[data-testid=page-next]")
  p.select("filter-relation", "citizenship")  # A filter change goes back to page 1.
  assert p.rows() == [qid(i) for i in (4, 5, 6)]
  p.close()


XSS_SCRIPT = "</script><script>window.__pwned=1</script>"
XSS_IMG = '<img src=x onerror="window.__pwned=1">'


# bypass_csp=True: the DOM-building alone must keep markup inert, CSP or not.
@pytest.mark.parametrize("bypass_csp", [False, True])
def test_passage_html_renders_as_literal_text(browser, tmp_path, bypass_csp):
  rows = hand_rows("trackstar")[:1]
  rows[0]["proponents"][0] = f"{XSS_SCRIPT} <!-- Ada Laurent {XSS_IMG} & Paris"
  rows[0]["proponents"][1] = XSS_IMG
  rows[0]["opponents"][0] = XSS_SCRIPT
  rows[0]["proponent_ids"][2] = '"><img src=x onerror="window.__pwned=1">'
  rows[0]["inputs_plaintext"] = "<b onmouseover=\"window.__pwned=1\">Ada Laurent</b> was born in"
  folder = tmp_path / "results" / "proponents"
  folder.mkdir(parents=True)
  workdir_lib.write_jsonl(str(folder / "trackstar.jsonl"), rows)
  path = viewer.write_viewer(workdir=str(tmp_path))
  p = Page(browser, path, bypass_csp=bypass_csp)
  pg = p.page
  pg.check("[data-testid=toggle-opponents]")
  pg.hover("[data-testid=detail-prompt]")
  texts = pg.eval_on_selector_all("[data-testid=passage-text]", "els => els.map(e => e.textContent)")
  assert texts[0] == f"{XSS_SCRIPT} <!-- Ada Laurent {XSS_IMG} & Paris"
  assert texts[1] == XSS_IMG
  assert XSS_SCRIPT in texts  # The opponent.
  assert pg.eval_on_selector(
      "[data-testid=proponents-a] [data-testid=proponent][data-rank='3'] [data-testid=passage-id]",
      "e => e.textContent") == '"><img src=x onerror="window.__pwned=1">'
  # Highlighting still worked around the literal markup.
  marks = pg.eval_on_selector_all(
      "[data-testid=proponent][data-rank='1'] mark", "els => els.map(e => e.textContent)")
  assert marks == ["Ada Laurent", "Paris"]
  assert pg.eval_on_selector_all("#detail img, #detail script, #detail b", "els => els.length") == 0
  assert pg.evaluate("typeof window.__pwned") == "undefined"
  assert len(p.rows()) == 1
  p.close()


@pytest.mark.slow  # 10k queries through Chromium.
def test_10k_queries_page_and_filter_over_all_of_them(browser, tmp_path):
  # Timings belong to scripts/gen_viewer_demo.py; this checks what the page shows.
  _demo_module().write_synthetic_results(workdir=str(tmp_path), n_queries=10_000,
                                         n_proponents=10)
  p = Page(browser, viewer.write_viewer(workdir=str(tmp_path)))
  p.page.wait_for_selector("[data-testid=proponents-a] [data-testid=proponent]")
  assert len(p.rows()) == 50
  assert p.page.text_content("[data-testid=page-info]") == "Page 1 of 200 · rows 1–50 of 10000"
  assert p.page.text_content("[data-testid=metric-count]") == "10000"
  n_wrong = sum(not r["model_correct"]
                for r in viewer.load_results(workdir=str(tmp_path))["trackstar"])
  p.select("filter-model", "wrong")
  assert int(p.page.text_content("[data-testid=metric-count]")) == n_wrong
  assert 0 < n_wrong < 10_000
  p.close()

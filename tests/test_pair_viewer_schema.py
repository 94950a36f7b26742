"""Our per-method JSONL (results/proponents/<method>.jsonl) in the types the paper's
public viewer reads.

The viewer is PAIR-code/pretraining-tda's demo (docs/demo, `?jsonl_path=`); what it
reads, and how, is in its sources:
  demo/example_view.ts  renderQueryExample / renderDecoderSamples / renderProponents
  demo/data_loader.ts   getIndex (the sidebar) and its metrics
Each entry of VIEWER_READS names the field, the JSON type that code needs, and how it
uses it (a wrong type is what shows "[object Object]", "undefined" or a crash there).
"""

import json
import numbers

import numpy as np
import pytest

from tda import config as config_lib
from tda import viewer
from tda import workdir as workdir_lib

_STR, _NUM, _BOOL = "string", "number", "boolean"
# field -> (JSON type, element type for arrays or None, how the viewer uses it)
VIEWER_READS = {
    # example_view.ts: renderAttribute('Example ID', ...); `.startsWith('trex')` picks the T-REx view.
    "example_id": (_STR, None, "example_id?.startsWith('trex')"),
    # data_loader.ts getIndex: displayName = ex['trex_id'] (sidebar name and sort key).
    "trex_id": (_STR, None, "sidebar displayName"),
    "inputs_plaintext": (_STR, None, "query prompt text"),
    "targets_plaintext": (_STR, None, "target text, highlighted in proponents"),
    # renderAttribute('Ground Truth', groundtruth) -> String(text): an object shows
    # "[object Object]"; the released files hold "subject | relation | object".
    "groundtruth": (_STR, None, "String(groundtruth)"),
    "relation": (_STR, None, "renderAttribute('Relation') and the index's relation"),
    # Number(model_confidence).toFixed(2) in the 'Prediction' line.
    "model_confidence": (_NUM, None, "Number(x).toFixed(2)"),
    # renderDecoderSamples: samples.length, samples.join(', '), samples.map(s => s).
    "temperature_samples": (list, _STR, "samples.join(', ')"),
    # 'C4 Fact Frequency': `${c4_frequency} (bucket ${c4_frequency_bucket})`.
    "c4_frequency": (_NUM, None, "template string"),
    "c4_frequency_bucket": (_STR, None, "template string"),
    # renderAttribute('Has TREX Sentence'); the index compares it `=== false`.
    "has_trex_sentence": (_BOOL, None, "hasTrexSentence === false"),
    # renderProponents: proponents[i] text, proponent_scores?.[i].toFixed(4),
    # proponent_correct?.[i] (chips, getGroundTruthMetrics); Math.max(...proponent_scores).
    "proponents": (list, _STR, "tagMatchingSpans(text, ...)"),
    "proponent_scores": (list, _NUM, "proponent_scores[i].toFixed(4)"),
    "proponent_correct": (list, _BOOL, "isCorrect ? '✓' : '-'"),
}


def _json_type(v):
  if isinstance(v, bool):
    return _BOOL
  if isinstance(v, numbers.Number):
    return _NUM
  if isinstance(v, str):
    return _STR
  return type(v)


def _rows():
  facts = [{"fact_id": f"F{q}", "example_id": f"trex_synth:{q:015d}", "relation": "city_of_birth",
            "subject": f"Person {q}", "object": f"City{q}",
            "inputs_plaintext": f"Person {q} was born in the city of", "targets_plaintext": f"City{q}",
            "frequency": q, "bucket": str(q), "passage_ids": [f"p{q}"]} for q in range(3)]
  passages = {f"p{i}": f"Person {i} was born in City{i}." for i in range(5)}
  # Predictions as tda.model_eval.evaluate_queries writes them (num_samples > 0).
  preds = {f["example_id"]: {"correct": True, "prediction": f["object"],
                             "temperature_samples": [f["object"], "Paris", f["object"]],
                             "model_confidence": 2 / 3} for f in facts}
  ids = [["p0", "p1", "p2"], ["p1", "p0", "p3"], ["p2", "p4", "p0"]]
  return viewer.result_rows(facts=facts, passages=passages, predictions=preds, top_ids=ids,
                            top_scores=np.array([[.9, .5, .1]] * 3, np.float32),
                            bottom_ids=[["p4"]] * 3, bottom_scores=np.array([[-.2]] * 3))


@pytest.fixture(scope="module")
def written_rows(tmp_path_factory):
  path = tmp_path_factory.mktemp("proponents") / "trackstar.jsonl"
  workdir_lib.write_jsonl(str(path), _rows())
  return [json.loads(line) for line in path.read_text().splitlines() if line]


@pytest.mark.parametrize("field", sorted(VIEWER_READS))
def test_field_has_the_type_the_viewer_reads(written_rows, field):
  kind, elem, use = VIEWER_READS[field]
  for row in written_rows:
    assert field in row, f"{field} missing (the viewer reads it: {use})"
    v = row[field]
    assert _json_type(v) == kind, f"{field}={v!r}: the viewer needs a {kind} ({use})"
    if elem is not None:
      assert v, f"{field} is empty"
      assert all(_json_type(x) == elem for x in v), f"{field}={v!r}: elements must be {elem}"


def test_values_read_as_the_released_files():
  row = _rows()[1]
  assert row["groundtruth"] == "Person 1 | city_of_birth | City1"
  assert row["example_id"].startswith("trex") and row["trex_id"] == row["example_id"]
  assert row["model_confidence"] == pytest.approx(2 / 3)
  assert row["temperature_samples"] == ["City1", "Paris", "City1"]


def test_default_config_samples_the_model():
  # Without samples the viewer shows "Decoder Samples undefined".
  assert config_lib.base_config().model_eval.num_samples > 0

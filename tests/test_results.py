"""The results file's model (docs/results-schema.md): what it accepts, and one line naming the field
of a broken file."""

from __future__ import annotations

import copy
import json

import pytest

from lightkv_cli.errors import UserError
from lightkv_cli.results import SCHEMA, SCHEMA_NAME, SCHEMA_VERSION, check_schema, load_results
from lightkv_cli.scoring.thresholds import Thresholds

RUN = {
    "id": "lightkv@0.5",
    "method": "lightkv",
    "status": "ok",
    "vision_retention": 0.5,
    "kv_bytes": 1024.0,
    "prefill_ms": {"median": 12.0, "p25": 11.0, "p75": 13.0, "min": 10.0, "max": 14.0, "n": 2},
    "decode_ms_per_token": None,
    "quality": {"answer_match": 1.0, "first_token_kl_max": None, "ci": {"accuracy": None}},
    "per_input": [{"input": "a.png", "quality": {"exact_match": 1.0, "first_token_kl": 0.0}}],
}
RESULTS = {
    "schema": SCHEMA,
    "thresholds": Thresholds().to_dict(),
    "runs": [{"id": "uncompressed", "method": "uncompressed", "status": "ok"}, RUN],
    "recommendation": None,
}


def _broken(path: tuple, value) -> dict:
    data = copy.deepcopy(RESULTS)
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


def test_schema_is_one_name_and_version():
    assert SCHEMA == f"{SCHEMA_NAME}/{SCHEMA_VERSION}" == "lightkv.results/2"


def test_minimal_older_and_newer_1x_files_read_unchanged():
    assert check_schema(RESULTS, "r.json") is RESULTS
    # Older: no thresholds, a time as a plain number; a later 1.x: keys this version does not know.
    older = _broken(("runs", 1, "time_to_first_token_ms"), 20.5)
    del older["thresholds"]
    later = _broken(("runs", 1, "energy_joules"), 3.0)
    later["hardware"] = {"racks": 2}
    for data in (older, later, {"schema": SCHEMA, "runs": []}):
        assert check_schema(data, "r.json") == data


@pytest.mark.parametrize(
    "path, value, fragment",
    [
        (("runs", 1, "id"), None, "r.json: field 'runs.1.id': Input should be a valid string (got None)"),
        (("runs", 1, "kv_bytes"), "big", "field 'runs.1.kv_bytes'"),
        (("runs", 1, "quality", "answer_match"), [1], "field 'runs.1.quality.answer_match'"),
        (("runs", 1, "prefill_ms", "median"), "fast", "field 'runs.1.prefill_ms.median'"),
        (("runs", 0), "uncompressed", "field 'runs.0': Input should be a valid dictionary"),
        (("thresholds", "max_kll"), 0.1, "unknown field 'thresholds.max_kll'; did you mean 'max_kl'?"),
        (("thresholds", "max_kl"), "high", "field 'thresholds.max_kl': must be a number"),
        (("thresholds", "min_answer_match"), 2.0, "field 'thresholds.min_answer_match'"),
        (("recommendation",), {"run": 3}, "field 'recommendation.run'"),
    ],
)
def test_broken_file_is_one_line_naming_the_field(path, value, fragment):
    with pytest.raises(UserError) as e:
        check_schema(_broken(path, value), "r.json")
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_missing_run_id_is_named():
    data = copy.deepcopy(RESULTS)
    del data["runs"][1]["id"]
    with pytest.raises(UserError, match=r"r\.json: missing field 'runs\.1\.id'"):
        check_schema(data, "r.json")


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"hello": 1}, 'r.json is not a lightkv results file (no "schema": "lightkv.results/2")'),
        ([1, 2], "is not a lightkv results file"),
        ({"schema": "lightkv.results/x", "runs": []}, "r.json: unknown schema 'lightkv.results/x'"),
        ({"schema": "lightkv.results/3", "runs": []}, "uses schema lightkv.results/3, newer than this lightkv"),
        ({"schema": "lightkv.results/1", "runs": []}, None),  # version 1 files still read
        ({"schema": SCHEMA, "runs": {}}, "r.json: the results file has no list of runs"),
        ({"schema": SCHEMA}, "has no list of runs"),
    ],
)
def test_not_a_readable_results_file(data, fragment):
    if fragment is None:
        assert check_schema(data, "r.json") == data
        return
    with pytest.raises(UserError) as e:
        check_schema(data, "r.json")
    assert fragment in str(e.value)


def test_load_results_returns_the_plain_dict(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(RESULTS))
    assert load_results(path) == RESULTS
    path.write_text(json.dumps(_broken(("runs", 1, "status"), 1)))
    with pytest.raises(UserError, match=f"{path}: field 'runs.1.status'"):
        load_results(path)

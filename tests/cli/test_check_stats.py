"""``lightkv check`` on results files built to pass or fail: ``--max-drop`` (the paired test against the
uncompressed run), ``--decide-on``, the p-values in the table and the JUnit file; ``--decide-on`` on
``sweep`` and ``profile`` (the request captured before any model loads)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
from cli_output import _all_text, _assert_user_error, _flat

from lightkv_cli.cli import app
from lightkv_cli.results import SCHEMA
from lightkv_cli.scoring.fidelity import InputQuality, summarize


def _run(ident, method, exact, acc):
    items = [InputQuality(e, e, 1.0, 0.0 if e else 0.4, a) for e, a in zip(exact, acc)]
    return {
        "id": ident,
        "method": method,
        "status": "ok",
        "target_retention": 1.0 if method == "uncompressed" else 0.5,
        "vision_retention": 1.0 if method == "uncompressed" else 0.5,
        "kv_bytes": 100.0 if method == "uncompressed" else 50.0,
        "quality": summarize(items).to_dict(),
        "per_input": [{"input": f"in{i}", "quality": q.to_dict()} for i, q in enumerate(items)],
    }


def _write(tmp_path, name, runs, thresholds) -> str:
    data = {
        "schema": SCHEMA,
        "runs": runs,
        "thresholds": thresholds,
        "recommendation": {"run": runs[-1]["id"]},
    }
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.fixture
def files(tmp_path):
    """Two results files of 20 inputs with answers; the uncompressed run is right on 19.

    fail: 7 answers changed; 6 inputs right only uncompressed, 1 right only compressed (accuracy drop 0.25).
    pass: 1 answer changed, on an input that the compressed run then gets wrong (accuracy drop 0.05)."""
    ref = _run("uncompressed", "uncompressed", [1.0] * 20, [1.0] * 19 + [0.0])
    bad = _run("lightkv@0.5", "lightkv", [0.0] * 7 + [1.0] * 13, [0.0] * 6 + [1.0] * 14)
    good = _run("lightkv@0.5", "lightkv", [0.0] + [1.0] * 19, [0.0] + [1.0] * 18 + [0.0])
    loose = {"min_answer_match": 0.5, "decide_on": "mean"}
    return {"fail": _write(tmp_path, "fail", [ref, bad], loose), "pass": _write(tmp_path, "pass", [ref, good], loose)}


def test_max_drop_fails_a_significant_drop_and_passes_a_small_one(runner, files, tmp_path, no_model_load):
    # Without --max-drop both meet the loose threshold.
    assert runner.invoke(app, ["check", files["fail"]]).exit_code == 0
    junit = tmp_path / "gate.xml"
    bad = runner.invoke(app, ["check", files["fail"], "--max-drop", "0.02", "--junit", str(junit)])
    assert bad.exit_code == 1, _all_text(bad)
    flat = _flat(_all_text(bad))
    assert "paired test" in flat and "Tango score" in flat and "exact binomial" in flat
    # Accuracy: drop 0.25, Tango p = 0.039 at the margin, exact McNemar p = 2 · 8/128 = 0.125.
    assert "accuracy drop 0.250 (95% lower bound 0.038 > 0.02; p = 0.039, Tango score; McNemar p = 0.125" in flat
    suite = ET.parse(junit).getroot().find("testsuite")
    case = suite.find("testcase[@name='max_drop.accuracy']")
    props = {p.get("name"): p.get("value") for p in case.find("properties")}
    assert float(props["p_value"]) == pytest.approx(0.0390, abs=2e-4)
    assert float(props["mcnemar_p"]) == pytest.approx(0.125)
    assert props["test"] == "Tango score" and "p = 0.039" in case.find("failure").get("message")
    kl = suite.find("testcase[@name='max_drop.first_token_kl']")
    assert kl.find("failure") is None  # reported, not gated
    assert suite.get("failures") == "2"  # answer match and accuracy

    ok = runner.invoke(app, ["check", files["pass"], "--max-drop", "0.02", "--junit", str(junit)])
    assert ok.exit_code == 0, _all_text(ok)
    assert "PASS" in _flat(_all_text(ok)) and "thresholds and paired tests" in _flat(_all_text(ok))
    suite = ET.parse(junit).getroot().find("testsuite")
    case = suite.find("testcase[@name='max_drop.exact_match']")
    props = {p.get("name"): p.get("value") for p in case.find("properties")}
    # One changed of 20 at margin 0.02: p = 1 − 0.98^20 = 0.3324.
    assert float(props["p_value"]) == pytest.approx(0.3324, abs=1e-4) and suite.get("failures") == "0"
    assert "p = 0.332" in case.find("system-out").text


def test_max_drop_needs_the_uncompressed_run(runner, tmp_path, no_model_load):
    run = _run("lightkv@0.5", "lightkv", [1.0] * 4, [None] * 4)
    path = _write(tmp_path, "alone", [run], {"min_answer_match": 0.5})
    _assert_user_error(runner.invoke(app, ["check", path, "--max-drop", "0.02"]), "compares with the uncompressed run")
    _assert_user_error(runner.invoke(app, ["check", path, "--max-drop", "1"]), "--max-drop must be below 1")


def test_decide_on_lower_bound_fails_what_the_mean_passes(runner, tmp_path, no_model_load):
    # 8 of 8 answers agree: mean 1.0 ≥ 0.95, Wilson lower bound 8/(8 + 3.841459) = 0.676 < 0.95.
    ref = _run("uncompressed", "uncompressed", [1.0] * 8, [None] * 8)
    run = _run("lightkv@0.5", "lightkv", [1.0] * 8, [None] * 8)
    older = _write(tmp_path, "older", [ref, run], {"min_answer_match": 0.95})  # no decide_on: the mean
    ok = runner.invoke(app, ["check", older])
    assert ok.exit_code == 0, _all_text(ok)
    assert "mean" in _flat(_all_text(ok))
    bad = runner.invoke(app, ["check", older, "--decide-on", "lower-bound"])
    assert bad.exit_code == 1
    assert "answer match lower 95% bound 0.676 < 0.950 (mean 1.000 of 8 inputs" in _flat(_all_text(bad))
    newer = _write(tmp_path, "newer", [ref, run], {"min_answer_match": 0.95, "decide_on": "lower-bound"})
    assert runner.invoke(app, ["check", newer]).exit_code == 1
    assert runner.invoke(app, ["check", newer, "--decide-on", "mean"]).exit_code == 0
    _assert_user_error(runner.invoke(app, ["check", newer, "--decide-on", "median"]), "--decide-on must be")


def test_sweep_and_profile_record_decide_on(runner, captured, two_images, tmp_path):
    base = ["--model", "tiny", "--images", str(two_images), "--output", str(tmp_path / "out")]
    _assert_user_error(runner.invoke(app, ["sweep", *base]), "captured")
    _assert_user_error(runner.invoke(app, ["sweep", *base, "--decide-on", "mean"]), "captured")
    _assert_user_error(runner.invoke(app, ["profile", *base]), "captured")
    _assert_user_error(runner.invoke(app, ["profile", *base, "--decide-on", "mean"]), "captured")
    cfg = tmp_path / "sweep.toml"
    cfg.write_text('[thresholds]\ndecide_on = "mean"\n')
    _assert_user_error(runner.invoke(app, ["sweep", "--config", str(cfg), *base]), "captured")
    _assert_user_error(
        runner.invoke(app, ["sweep", "--config", str(cfg), *base, "--decide-on", "lower-bound"]), "captured"
    )
    got = [r.settings.thresholds.decide_on for r in captured]
    assert got == ["lower-bound", "mean", "lower-bound", "mean", "mean", "lower-bound"]
    assert captured[0].settings.thresholds.to_dict()["decide_on"] == "lower-bound"
    _assert_user_error(runner.invoke(app, ["sweep", *base, "--decide-on", "median"]), "--decide-on must be")

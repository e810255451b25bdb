"""Thresholds and the recommendation: cheapest run meeting every threshold, or what failed and by how much."""

from __future__ import annotations

import math

import pytest

from lightkv_cli.errors import UserError
from lightkv_cli.scoring.recommend import recommend
from lightkv_cli.scoring.stats import wilson_interval
from lightkv_cli.scoring.thresholds import THRESHOLDS, Thresholds, evaluate


def _run(ident, method, r, match, top1, kv=100.0, kl=0.01, acc=None, prefill=10.0, status="ok"):
    return {
        "id": ident,
        "method": method,
        "status": status,
        "target_retention": r,
        "vision_retention": r,
        "kv_bytes": kv * r,
        "kv_bytes_vision": 0.9 * kv * r,
        "prefill_ms": {"median": prefill * r},
        "quality": {"answer_match": match, "top1_agreement": top1, "first_token_kl_max": kl, "accuracy": acc},
    }


RUNS = [
    _run("uncompressed", "uncompressed", 1.0, 1.0, 1.0, kl=0.0),
    _run("lightkv@0.9", "lightkv", 0.9, 1.0, 1.0),
    _run("lightkv@0.75", "lightkv", 0.75, 0.96, 0.97, kl=0.2),
    _run("lightkv@0.55", "lightkv", 0.55, 0.99, 0.90),  # top-1 below 0.95
    _run("lightkv@0.4", "lightkv", 0.4, 0.5, 0.5),
    {"id": "lightkv@0.3", "method": "lightkv", "status": "oom", "target_retention": 0.3},
]


def test_recommend_picks_the_cheapest_run_meeting_every_threshold():
    rec = recommend(RUNS, Thresholds())
    assert rec["run"] == "lightkv@0.75" and rec["vision_retention"] == 0.75 and rec["failures"] == []
    assert recommend(RUNS, Thresholds(min_answer_match=0.8, min_top1_agreement=0.8))["run"] == "lightkv@0.55"
    # A KL ceiling excludes 0.75 (KL 0.2), leaving 0.9.
    assert recommend(RUNS, Thresholds(max_kl=0.1))["run"] == "lightkv@0.9"


def test_cheapest_is_fewest_kv_bytes_across_methods():
    runs = RUNS[:3] + [_run("other@0.8", "lightkv-uniform", 0.8, 1.0, 1.0, kv=50.0)]  # 40 bytes < 75
    assert recommend(runs, Thresholds())["run"] == "other@0.8"


def test_equal_kv_bytes_prefer_quality_over_prefill_time():
    # Two methods at the same retention hold the same bytes; the faster one answers worse.
    fast = _run("random@0.4", "random", 0.4, 0.96, 0.97, acc=0.88, prefill=5.0)
    good = _run("lightkv-prompt@0.4", "lightkv-prompt", 0.4, 0.99, 0.99, acc=0.905, prefill=12.0)
    assert recommend([RUNS[0], fast, good], Thresholds())["run"] == "lightkv-prompt@0.4"
    # Without task accuracy, answer match decides; with equal quality, prefill time.
    fast["quality"]["accuracy"] = good["quality"]["accuracy"] = None
    assert recommend([RUNS[0], fast, good], Thresholds())["run"] == "lightkv-prompt@0.4"
    fast["quality"]["answer_match"] = 0.99
    assert recommend([RUNS[0], fast, good], Thresholds())["run"] == "random@0.4"
    # Fewer bytes still win over quality.
    cheaper = _run("random@0.3", "random", 0.3, 0.95, 0.95, acc=0.5)
    assert recommend([RUNS[0], fast, good, cheaper], Thresholds())["run"] == "random@0.3"


def test_cost_thresholds_can_leave_no_run_and_say_by_how_much():
    rec = recommend(RUNS, Thresholds(max_vision_retention=0.5))
    assert rec["run"] is None
    # Closest = fewest failed thresholds, then smallest relative shortfall: lightkv@0.75 misses only
    # the retention ceiling, by 0.25 (0.55 misses two thresholds; 0.9 misses the ceiling by more).
    assert [(f["run"], f["threshold"]) for f in rec["failures"]] == [("lightkv@0.75", "max_vision_retention")]
    assert rec["failures"][0]["short_by"] == pytest.approx(0.25)
    assert "vision retention 0.750 > 0.500 (over by 0.250)" in rec["reason"]


def test_shortfall_is_exact():
    checks = evaluate(
        RUNS[3], Thresholds(min_top1_agreement=0.95, min_answer_match=0.9, max_prefill_ms=5.0, decide_on="mean")
    )
    by = {c.threshold: c for c in checks}
    assert by["min_answer_match"].passed and by["min_answer_match"].short_by == 0.0
    assert not by["min_top1_agreement"].passed
    assert by["min_top1_agreement"].short_by == pytest.approx(0.05)
    assert by["max_prefill_ms"].measured == pytest.approx(5.5) and by["max_prefill_ms"].short_by == pytest.approx(0.5)
    assert by["min_top1_agreement"].describe() == "top-1 agreement 0.900 < 0.950 (short by 0.050)"
    assert by["min_top1_agreement"].basis == "mean" and by["max_prefill_ms"].basis == "measured"
    # On the bound, a run without per-input values or a recorded interval is compared on its mean, and says so.
    (c,) = evaluate(RUNS[3], Thresholds(min_token_agreement=None, min_answer_match=None, min_top1_agreement=0.95))
    assert c.measured == 0.9 and c.basis == "mean"
    assert c.describe() == "top-1 agreement 0.900 < 0.950 (short by 0.050; no interval recorded: compared the mean)"


def test_uncompressed_recommended_names_the_closest_compressed_run():
    runs = [RUNS[0], _run("lightkv@0.9", "lightkv", 0.9, 0.8, 0.99)]
    rec = recommend(runs, Thresholds())
    assert rec["run"] == "uncompressed"
    assert rec["failures"][0]["run"] == "lightkv@0.9" and rec["failures"][0]["short_by"] == pytest.approx(0.15)
    assert "keep the full cache" in rec["reason"]


def test_accuracy_threshold_without_answers_is_unmeasured_and_fails():
    (c,) = evaluate(
        RUNS[1], Thresholds(min_token_agreement=None, min_answer_match=None, min_top1_agreement=None, min_accuracy=0.5)
    )
    assert c.measured is None and not c.passed and math.isinf(c.short_by)


def test_null_kl_reads_as_infinite():
    run = _run("x", "lightkv", 0.5, 1.0, 1.0, kl=None)
    (c,) = evaluate(
        run, Thresholds(min_token_agreement=None, min_answer_match=None, min_top1_agreement=None, max_kl=10.0)
    )
    assert math.isinf(c.measured) and not c.passed


def test_unknown_threshold_name_is_a_user_error_with_a_suggestion():
    with pytest.raises(UserError, match="did you mean 'min_top1_agreement'"):
        Thresholds.from_dict({"min_top1_agrement": 0.9})
    with pytest.raises(UserError, match="must be a number"):
        Thresholds(max_kl="high")


def test_no_finished_run():
    assert recommend([RUNS[-1]], Thresholds())["run"] is None


def test_bounds_are_one_line_each():
    with pytest.raises(UserError, match="threshold max_kl must be ≥ 0, got -1"):
        Thresholds(max_kl=-1)
    with pytest.raises(UserError, match=r"threshold min_top1_agreement must be ≤ 1, got 1\.5"):
        Thresholds().merged(min_top1_agreement=1.5)
    with pytest.raises(UserError, match="must be a number, got True"):
        Thresholds.from_dict({"min_accuracy": True})
    assert Thresholds(max_kv_bytes=3 * 2**30).max_kv_bytes == 3 * 2**30  # bytes are not fractions


def test_keywords_take_the_defaults_a_table_leaves_unset():
    assert Thresholds().set_items() == {
        "min_answer_match": 0.95,
        "min_top1_agreement": 0.95,
        "min_token_agreement": 0.95,
    }
    assert Thresholds.from_dict({"max_kl": 0.5}).set_items() == {"max_kl": 0.5}
    assert Thresholds.unset().to_dict() == {**dict.fromkeys(THRESHOLDS), "decide_on": None}
    assert list(Thresholds().to_dict()) == [*THRESHOLDS, "decide_on"]  # one definition, in declaration order
    assert "decide_on" not in THRESHOLDS and "decide_on" not in Thresholds(decide_on="mean").set_items()


def _with_inputs(run: dict, matches: list[float], top1: list[float] | None = None) -> dict:
    """``run`` with per-input 0/1 scores, and the means over them in ``quality``."""
    top1 = matches if top1 is None else top1
    run["per_input"] = [
        {"input": f"in{i}", "quality": {"exact_match": m, "top1_agreement": t, "first_token_kl": 0.0}}
        for i, (m, t) in enumerate(zip(matches, top1))
    ]
    run["quality"].update({"answer_match": sum(matches) / len(matches), "top1_agreement": sum(top1) / len(top1)})
    return run


def test_lower_bound_and_mean_pick_different_runs():
    # 8 inputs: lightkv@0.5 agrees on all 8 (mean 1.0; Wilson lower 8/(8 + 3.841459) = 0.676);
    # lightkv@0.9 was measured on 100 inputs, 99 agree (mean 0.99; Wilson lower 0.9455).
    ref = _with_inputs(_run("uncompressed", "uncompressed", 1.0, 1.0, 1.0, kl=0.0), [1.0] * 100)
    cheap = _with_inputs(_run("lightkv@0.5", "lightkv", 0.5, 1.0, 1.0), [1.0] * 8)
    dear = _with_inputs(_run("lightkv@0.9", "lightkv", 0.9, 0.99, 0.99), [1.0] * 99 + [0.0])
    t = {"min_answer_match": 0.9, "min_top1_agreement": 0.9}
    assert recommend([ref, cheap, dear], Thresholds(**t, decide_on="mean"))["run"] == "lightkv@0.5"
    rec = recommend([ref, cheap, dear], Thresholds(**t))  # default: lower-bound
    assert Thresholds(**t).decide_on == "lower-bound"
    assert rec["run"] == "lightkv@0.9"
    # With a 0.95 floor neither compressed run's bound passes; the uncompressed run meets its fidelity to itself
    # exactly (1 by definition, not an estimate), so the advice is to keep the full cache.
    rec = recommend([ref, cheap, dear], Thresholds())
    assert rec["run"] == "uncompressed" and "keep the full cache" in rec["reason"]
    (fail, *_) = rec["failures"]
    assert fail["basis"] == "lower-bound" and fail["estimate"] == pytest.approx(0.99)
    assert fail["measured"] == pytest.approx(0.9455, abs=1e-4)
    assert "lower 95% bound 0.946 < 0.950 (mean 0.990 of 100 inputs; short by 0.004; the mean passes" in fail["text"]


def test_the_bound_is_described_and_says_how_many_inputs_would_do():
    run = _with_inputs(_run("lightkv@0.5", "lightkv", 0.5, 1.0, 1.0), [1.0] * 8)
    (c,) = evaluate(run, Thresholds(min_token_agreement=None, min_top1_agreement=None))
    assert (c.basis, c.estimate, c.n_inputs) == ("lower-bound", 1.0, 8)
    assert c.measured == pytest.approx(0.67559, abs=1e-5) and not c.passed
    assert c.describe() == (
        "answer match lower 95% bound 0.676 < 0.950 (mean 1.000 of 8 inputs; short by 0.274; the mean passes; "
        "more inputs narrow the interval (≥ 73 inputs even if every one agrees))"
    )
    (m,) = evaluate(run, Thresholds(min_token_agreement=None, min_top1_agreement=None, decide_on="mean"))
    assert m.passed and m.basis == "mean" and m.describe() == "answer match 1.000 ≥ 0.950"
    # A mean below the floor: no "mean passes" remark.
    low = _with_inputs(_run("x", "lightkv", 0.5, 0.5, 0.5), [1.0, 0.0] * 4)
    (c,) = evaluate(low, Thresholds(min_token_agreement=None, min_top1_agreement=None))
    assert "the mean passes" not in c.describe() and c.measured == pytest.approx(wilson_interval(4, 8)[0])


def test_bound_from_the_recorded_interval_without_per_input_values():
    run = _run("x", "lightkv", 0.5, 0.9, 0.9)
    run["quality"].update({"ci": {"answer_match": [0.8, 0.97]}, "n_inputs": 40})
    (c,) = evaluate(run, Thresholds(min_token_agreement=None, min_answer_match=0.85, min_top1_agreement=None))
    assert c.basis == "lower-bound" and c.measured == 0.8 and c.n_inputs == 40 and not c.passed


def test_cost_thresholds_and_worst_kl_are_compared_as_measured_on_either_basis():
    run = _with_inputs(_run("x", "lightkv", 0.5, 1.0, 1.0, kl=0.3), [1.0] * 8)
    for decide_on in ("lower-bound", "mean"):
        checks = evaluate(run, Thresholds.unset().merged(max_kl=0.5, max_kv_bytes=60.0, decide_on=decide_on))
        assert [(c.basis, c.measured, c.passed) for c in checks] == [("measured", 0.3, True), ("measured", 50.0, True)]


def test_accuracy_floor_uses_the_inputs_with_answers():
    run = _with_inputs(_run("uncompressed", "uncompressed", 1.0, 1.0, 1.0, acc=1.0), [1.0] * 6)
    for i, acc in enumerate([1.0, 1.0, 1.0, None, None, 1.0]):
        run["per_input"][i]["quality"]["accuracy"] = acc
    (c,) = evaluate(run, Thresholds.unset().merged(min_accuracy=0.5, decide_on="lower-bound"))
    # The uncompressed run's accuracy is an estimate (unlike its fidelity to itself): Wilson 4 of 4 → 0.5101.
    assert c.basis == "lower-bound" and c.n_inputs == 4 and c.measured == pytest.approx(0.5101, abs=1e-4)
    assert c.passed


def test_a_file_without_decide_on_reads_as_the_mean():
    older = Thresholds.from_dict({"min_answer_match": 0.95})
    assert older.decide_on is None and not older.on_bound
    run = _with_inputs(_run("x", "lightkv", 0.5, 1.0, 1.0), [1.0] * 8)
    (c,) = evaluate(run, older)
    assert c.passed and c.basis == "mean"
    # As recorded in a results file: the section is validated by the same model.
    from lightkv_cli.results import SCHEMA, check_schema

    data = {"schema": SCHEMA, "runs": [run], "thresholds": {"min_answer_match": 0.95}}
    assert check_schema(data, "r.json") is data
    assert recommend([run], Thresholds.from_dict(data["thresholds"]))["run"] == "x"
    assert recommend([run], Thresholds.from_dict({**data["thresholds"], "decide_on": "lower-bound"}))["run"] is None
    # A new file records it, and a bad value is one line.
    assert Thresholds().to_dict()["decide_on"] == "lower-bound"
    with pytest.raises(UserError, match="decide_on must be lower-bound or mean, got 'median'"):
        Thresholds.from_dict({"decide_on": "median"})
    # merged() keeps decide_on unless given.
    assert Thresholds(decide_on="mean").merged(max_kl=1.0).decide_on == "mean"
    assert Thresholds(decide_on="mean").merged(decide_on="lower-bound").on_bound

"""What changed (``lightkv_cli.report.changes``): the changed inputs of the recommended run and its frontier
neighbours, their order, the cap, and quality per input type and tag, on a synthetic results file (schema
``lightkv.results/1``, docs/results-schema.md) whose numbers are worked out by hand below.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest

from lightkv_cli.report.changes import breakdowns, changed_inputs, frontier, quality_metric
from lightkv_cli.results import check_schema

MIB = 2**20

#: Ground truth of the four inputs; the uncompressed run gets i3 wrong ("blue").
EXPECTED = ["cat", "2", "yes", "red"]
BASE = ["cat", "2", "yes", "blue"]


def _q(exact, f1, kl, acc, **extra):
    q = {"exact_match": exact, "token_f1": f1, "top1_agreement": 1.0, "first_token_kl": kl, "accuracy": acc}
    q.update(extra)
    return {k: v for k, v in q.items() if v is not ...}


def _run(run_id, method, kv, acc, answers, qualities, status="ok"):
    return {
        "id": run_id,
        "method": method,
        "status": status,
        "kv_bytes": kv * MIB,
        "vision_retention": 0.5,
        "quality": {"answer_match": acc, "accuracy": acc, "top1_agreement": 1.0},
        "per_input": [
            {"input": f"i{k}", "answer": a, "quality": q} for k, (a, q) in enumerate(zip(answers, qualities))
        ],
    }


def _junk(run_id, method, kv, acc):
    """A run whose every answer changed (it must not appear unless it is shown)."""
    return _run(run_id, method, kv, acc, ["zzz"] * 4, [_q(0.0, 0.0, 0.9, 0.0)] * 4)


def _results() -> dict:
    """Frontier of (accuracy, KV): fastv@0.1 (0.5 MiB), lightkv@0.25 (1), lightkv@0.5 (2, recommended),
    lightkv@0.75 (3); snapkv@0.5 (2 MiB, 0.4) and random@0.25 (1.5 MiB, 0.2) are dominated."""
    runs = [
        _run("uncompressed", "uncompressed", 4, 0.75, BASE, [_q(1.0, 1.0, 0.0, a) for a in (1.0, 1.0, 1.0, 0.0)]),
        _run(
            "lightkv@0.75",
            "lightkv",
            3,
            0.8,
            ["cat", "2", "yes.", "green"],
            # i3: no KL recorded, no accuracy stored (scored from the ground truth: wrong).
            [_q(1.0, 1.0, 0.0, 1.0), _q(1.0, 1.0, 0.0, 1.0), _q(1.0, 1.0, 0.0, 1.0), _q(0.0, 0.0, ..., ...)],
        ),
        _run(
            "lightkv@0.5",
            "lightkv",
            2,
            0.6,
            # i0 normalises to the uncompressed "cat": not a change.
            ["The cat.", "3", "yes", "red"],
            [
                _q(1.0, 1.0, 0.02, 1.0),
                _q(0.0, 0.0, 0.1, 0.0),
                _q(1.0, 1.0, 0.0, 1.0),
                _q(0.0, 0.0, 0.5, 1.0, continuation_kl=0.05),
            ],
        ),
        _run(
            "lightkv@0.25",
            "lightkv",
            1,
            0.4,
            ["dog", "3", "no", "blue"],
            [_q(0.0, 0.0, 0.2, 0.0), _q(0.0, 0.4, 0.3, 0.0), _q(0.0, 0.1, 0.3, 0.0), _q(1.0, 1.0, 0.0, 0.0)],
        ),
        _junk("snapkv@0.5", "snapkv", 2, 0.4),
        _junk("random@0.25", "random", 1.5, 0.2),
        _junk("fastv@0.1", "fastv", 0.5, 0.0),
        {"id": "lightkv@0.1", "method": "lightkv", "status": "oom", "error": "out of memory"},
    ]
    types = ["a", "a", "b", "b"]
    tags = [["x"], ["x", "y"], None, ["y"]]
    inputs = []
    for k in range(4):
        rec = {"id": f"i{k}", "image": f"/img/{k}.png", "question": f"q{k}?", "answer": EXPECTED[k], "type": types[k]}
        if tags[k]:
            rec["tags"] = tags[k]
        inputs.append(rec)
    return check_schema(
        {
            "schema": "lightkv.results/1",
            "inputs": inputs,
            "runs": runs,
            "recommendation": {"run": "lightkv@0.5", "reason": "cheapest", "failures": []},
        },
        "synthetic",
    )


def _keys(out: dict) -> list[tuple[str, str]]:
    return [(e["run"], e["input"]) for e in out["entries"]]


def test_frontier_is_the_undominated_compressed_runs_cheapest_first():
    res = _results()
    assert quality_metric(res) == "accuracy"
    assert [r["id"] for r in frontier(res)] == ["fastv@0.1", "lightkv@0.25", "lightkv@0.5", "lightkv@0.75"]
    # Without accuracy the frontier ranks by answer match: here snapkv@0.5 (0.7) now beats lightkv@0.5 (0.6).
    for run in res["runs"]:
        (run.get("quality") or {}).pop("accuracy", None)
    next(r for r in res["runs"] if r["id"] == "snapkv@0.5")["quality"]["answer_match"] = 0.7
    assert quality_metric(res) == "answer_match"
    assert [r["id"] for r in frontier(res)] == ["fastv@0.1", "lightkv@0.25", "snapkv@0.5", "lightkv@0.75"]


def test_changed_inputs_of_the_recommended_run_and_its_neighbours_in_order():
    out = changed_inputs(_results())
    # correct → wrong first (KL 0.3, 0.3, 0.2, 0.1; the two at 0.3 by token F1 0.1 < 0.4), then the rest by KL
    # (0.05 continuation KL, then no KL); lightkv@0.5 i0 ("The cat." = "cat") and every dominated or
    # non-neighbouring run (snapkv, random, fastv) are absent.
    assert _keys(out) == [
        ("lightkv@0.25", "i2"),
        ("lightkv@0.25", "i1"),
        ("lightkv@0.25", "i0"),
        ("lightkv@0.5", "i1"),
        ("lightkv@0.5", "i3"),
        ("lightkv@0.75", "i3"),
    ]
    assert out["more"] == 0
    first = out["entries"][0]
    assert first == {
        "run": "lightkv@0.25",
        "method": "lightkv",
        "input": "i2",
        "image": "/img/2.png",
        "question": "q2?",
        "uncompressed_answer": "yes",
        "answer": "no",
        "expected": "yes",
        "kl": 0.3,
        "correct_before": True,
        "correct_after": False,
    }
    by_key = {(e["run"], e["input"]): e for e in out["entries"]}
    fixed = by_key[("lightkv@0.5", "i3")]
    assert (fixed["kl"], fixed["correct_before"], fixed["correct_after"]) == (0.05, False, True)
    unscored = by_key[("lightkv@0.75", "i3")]
    assert (unscored["kl"], unscored["correct_before"], unscored["correct_after"]) == (None, False, False)
    assert unscored["answer"] == "green" and unscored["uncompressed_answer"] == "blue"


def test_cap_keeps_the_first_entries_and_counts_the_rest():
    out = changed_inputs(_results(), cap=2)
    assert _keys(out) == [("lightkv@0.25", "i2"), ("lightkv@0.25", "i1")]
    assert out["more"] == 4
    assert changed_inputs(_results(), cap=0) == {"entries": [], "more": 6}
    with pytest.raises(ValueError, match="cap"):
        changed_inputs(_results(), cap=-1)


def test_without_a_recommendation_every_frontier_run_is_shown():
    res = _results()
    res["recommendation"] = {"run": None, "reason": "no run meets every threshold", "failures": []}
    out = changed_inputs(res, cap=100)
    assert {e["run"] for e in out["entries"]} == {"fastv@0.1", "lightkv@0.25", "lightkv@0.5", "lightkv@0.75"}
    assert len(out["entries"]) == 4 + 3 + 2 + 1 and out["more"] == 0


def test_recommendation_at_the_cheap_end_has_one_neighbour():
    res = _results()
    res["recommendation"]["run"] = "lightkv@0.75"
    assert {e["run"] for e in changed_inputs(res)["entries"]} == {"lightkv@0.75", "lightkv@0.5"}
    res["recommendation"]["run"] = "uncompressed"  # its answers are the reference: only its cheaper neighbour
    assert {e["run"] for e in changed_inputs(res)["entries"]} == {"lightkv@0.75"}


def test_no_uncompressed_run_means_nothing_to_compare():
    res = _results()
    res["runs"] = [r for r in res["runs"] if r["id"] != "uncompressed"]
    assert changed_inputs(res) == {"entries": [], "more": 0}


def test_breakdowns_by_type_and_tag_hand_computed():
    groups = breakdowns(_results())
    assert [(g["group"], g["value"]) for g in groups] == [("type", "a"), ("type", "b"), ("tag", "x"), ("tag", "y")]
    ok_runs = ["uncompressed", "lightkv@0.75", "lightkv@0.5", "lightkv@0.25", "snapkv@0.5", "random@0.25", "fastv@0.1"]
    for g in groups:
        assert [r["run"] for r in g["rows"]] == ok_runs  # the oom run has no row
    rows = {(g["group"], g["value"], r["run"]): r for g in groups for r in g["rows"]}
    # type a = i0, i1. lightkv@0.5: accuracy (1 + 0) / 2, exact match (1 + 0) / 2.
    assert rows[("type", "a", "lightkv@0.5")] == {"run": "lightkv@0.5", "n": 2, "accuracy": 0.5, "answer_match": 0.5}
    # type b = i2, i3. lightkv@0.75: accuracy known for i2 only (1), exact match (1 + 0) / 2.
    assert rows[("type", "b", "lightkv@0.75")] == {
        "run": "lightkv@0.75",
        "n": 2,
        "accuracy": 1.0,
        "answer_match": 0.5,
    }
    # tag y = i1, i3. lightkv@0.5: accuracy (0 + 1) / 2, exact match (0 + 0) / 2.
    assert rows[("tag", "y", "lightkv@0.5")] == {"run": "lightkv@0.5", "n": 2, "accuracy": 0.5, "answer_match": 0.0}
    # tag x = i0, i1. uncompressed: accuracy 1, 1; lightkv@0.25: 0, 0; exact match 0 and (0 + 0) / 2.
    assert rows[("tag", "x", "uncompressed")]["accuracy"] == 1.0
    assert rows[("tag", "x", "lightkv@0.25")] == {"run": "lightkv@0.25", "n": 2, "accuracy": 0.0, "answer_match": 0.0}


def test_breakdowns_empty_without_type_or_tags():
    res = copy.deepcopy(_results())
    for rec in res["inputs"]:
        rec.pop("type")
        rec.pop("tags", None)
    assert breakdowns(res) == []


def test_changes_module_imports_no_torch():
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\nsys.modules['transformers'] = None\n"
        "import lightkv_cli.report.changes, lightkv_cli.report.compare\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
